"""A client of one of our Triton models: named arrays in, one float32 output back.

`TritonModelClient` holds what every model shares: one channel, the model
version pinned at construction, chunking to the server's batch limit,
deadlines, short retries while Triton restarts, and Triton's transport
failures translated into our domain errors. `TritonTextClient` sends strings:
the text encoder (recsys_core.models.triton_encoder.TritonEncoder) and the review
classifier (recsys_core.models.review_classifier.TritonReviewClassifier) subclass it,
and Triton tokenises and runs the model (model_repo/<model>/1/model.py). The
user tower (services/profile/user_tower.py) sends float arrays.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np

from recsys_core import errors

TEXT = "TEXT"
DEFAULT_TIMEOUT = 10.0
# A restarting Triton or a dropped connection is retried a few times with a
# short backoff, always within the caller's budget; a Triton that stays down
# is reported as UNAVAILABLE within a fraction of a second, never a hang.
RETRY_BACKOFF_SECONDS = (0.05, 0.15)

# The exported files (recsys_core.models.encoder) by precision, for models
# that name their file instead of a `precision` parameter (text_encoder_onnx).
PRECISION_OF_FILE = {"model.onnx": "fp32", "model.int8.onnx": "int8"}

_UNAVAILABLE = {"StatusCode.UNAVAILABLE"}
_DEADLINE = {"StatusCode.DEADLINE_EXCEEDED"}


def _translate(exc: Exception, url: str) -> Exception:
    """Our domain error for a transport failure; anything else (a bad config,
    a model error) is returned unchanged so it surfaces as a bug."""
    status = exc.status() if hasattr(exc, "status") else None
    if status in _UNAVAILABLE:
        return errors.Unavailable(f"Triton at {url} unavailable: {exc.message()}")
    if status in _DEADLINE:
        return errors.DeadlineExceeded(f"Triton at {url} did not answer in time: {exc.message()}")
    return exc


class TritonModelClient:
    """Calls model `model_name` on a Triton server at `url` ("host:grpc_port").

    The model version is resolved once, at construction, and every request is
    pinned to it: the fingerprint names that version, so a newer version
    loaded later can never leak differently-trained outputs under it.
    Subclasses name the model's OUTPUT.
    """

    OUTPUT: str

    def __init__(self, url: str, model_name: str, *, version: int | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tracer=None):
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        self.url = url
        self.model_name = model_name
        self.timeout = timeout
        # An OpenTelemetry tracer (the service's, when its tracing is on): each
        # inference is then a client span, its context sent to Triton.
        self._tracer = tracer
        self._client_module = aioclient
        self._server_error = InferenceServerException
        self._triton_dtype = np_to_triton_dtype
        # The asyncio client on a loop of its own: the gRPC server's worker
        # threads hand it their calls, which then share one channel without
        # tying up a thread each while Triton works.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="triton-client", daemon=True)
        self._loop_thread.start()
        self._client = self._call(self._connect(url), timeout)
        try:
            metadata = self._call(self._client.get_model_metadata(model_name, as_json=True, client_timeout=timeout), timeout)
            self.version = str(version) if version is not None else max(metadata["versions"], key=int)
            config = self._call(self._client.get_model_config(
                model_name, self.version, as_json=True, client_timeout=timeout
            ), timeout)["config"]
        except InferenceServerException as exc:
            self.close()
            raise _translate(exc, url) from exc
        # The client chunks to the server's limit: Triton rejects a request
        # whose batch exceeds max_batch_size rather than splitting it.
        self.max_batch_size = int(config.get("max_batch_size") or 0) or 1
        output = next((o for o in config["output"] if o["name"] == self.OUTPUT), None)
        if output is None:
            self.close()
            raise ValueError(f"model {model_name} at {url} has no {self.OUTPUT} output")
        self.output_width = int(np.prod([int(d) for d in output["dims"]]))
        # Which model computes the output and so holds the weights: this one,
        # or for an ensemble the step writing OUTPUT, at the version it pins.
        self.weights_model, self.weights_version = model_name, self.version
        if config.get("platform") == "ensemble":
            step = next((s for s in config["ensemble_scheduling"]["step"]
                         if self.OUTPUT in s.get("output_map", {}).values()), None)
            if step is None:
                self.close()
                raise ValueError(f"ensemble {model_name} at {url} has no step producing {self.OUTPUT}")
            self.weights_model = step["model_name"]
            pinned = int(step.get("model_version", -1))
            try:
                self.weights_version = str(pinned) if pinned > 0 else max(self._call(self._client.get_model_metadata(
                    self.weights_model, as_json=True, client_timeout=timeout), timeout)["versions"], key=int)
                config = self._call(self._client.get_model_config(
                    self.weights_model, self.weights_version, as_json=True, client_timeout=timeout), timeout)["config"]
            except InferenceServerException as exc:
                self.close()
                raise _translate(exc, url) from exc
        self.parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # The weights file a backend other than ours runs (onnxruntime:
        # default_model_filename), else our model.py's `precision` parameter.
        self.weights_file = config.get("default_model_filename", "")
        self.precision = self.parameters.get("precision") or PRECISION_OF_FILE.get(self.weights_file, "int8")
        self.fingerprint = f"triton:{model_name}:{self.version}"

    async def _connect(self, url: str):
        # The aio client binds to the loop it is created on.
        return self._client_module.InferenceServerClient(url)

    def _call(self, coroutine, timeout: float):
        """Run a client coroutine on the client's loop and wait for it; the
        wait is bounded a little beyond the call's own deadline."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise errors.DeadlineExceeded(f"Triton at {self.url} did not answer in {timeout:.1f}s") from None

    def infer_arrays(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> np.ndarray:
        """The model's output for each row of `inputs` (input name -> array,
        rows along the first axis, the same number in each), float32
        [rows, output_width]. `timeout` (seconds, default the constructor's)
        bounds the whole call, across chunks."""
        rows = len(next(iter(inputs.values())))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = np.empty((rows, self.output_width), dtype=np.float32)
        for start in range(0, rows, self.max_batch_size):
            chunk = {name: array[start : start + self.max_batch_size] for name, array in inputs.items()}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(
                    f"{self.model_name} on {rows} rows via Triton at {self.url} timed out")
            stop = min(start + self.max_batch_size, rows)
            out[start:stop] = self._infer(chunk, stop - start, remaining)
        return out

    def is_ready(self, timeout: float = 1.0) -> bool:
        """Whether Triton serves our model version now."""
        try:
            return bool(self._call(
                self._client.is_model_ready(self.model_name, self.version, client_timeout=timeout), timeout
            ))
        except self._server_error:
            return False

    def _tensor(self, name: str, array: np.ndarray):
        datatype = "BYTES" if array.dtype == np.object_ else self._triton_dtype(array.dtype)
        tensor = self._client_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, inputs: dict[str, np.ndarray], rows: int, timeout: float) -> np.ndarray:
        if self._tracer is None:
            return self._infer_once(inputs, rows, timeout, None)
        from opentelemetry import propagate, trace

        # Only as part of a traced call: encoding the catalogue at start would
        # otherwise make one trace per batch.
        if not trace.get_current_span().is_recording():
            return self._infer_once(inputs, rows, timeout, None)

        host, _, port = self.url.rpartition(":")
        attributes = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
                      "server.address": host, "server.port": int(port) if port.isdigit() else 0,
                      "triton.model.name": self.model_name, "triton.model.version": self.version, "triton.rows": rows}
        with self._tracer.start_as_current_span("/inference.GRPCInferenceService/ModelInfer",
                                                kind=trace.SpanKind.CLIENT, attributes=attributes):
            # traceparent in the call's metadata: Triton's own OpenTelemetry
            # tracing (--trace-config mode=opentelemetry) continues this trace.
            headers: dict[str, str] = {}
            propagate.inject(headers)
            return self._infer_once(inputs, rows, timeout, headers)

    def _infer_once(self, inputs: dict[str, np.ndarray], rows: int, timeout: float,
                    headers: dict[str, str] | None) -> np.ndarray:
        tensors = [self._tensor(name, array) for name, array in inputs.items()]
        deadline = time.monotonic() + timeout
        for attempt in range(len(RETRY_BACKOFF_SECONDS) + 1):
            try:
                budget = max(deadline - time.monotonic(), 0.001)
                result = self._call(self._client.infer(
                    self.model_name,
                    tensors,
                    model_version=self.version,
                    outputs=[self._client_module.InferRequestedOutput(self.OUTPUT)],
                    client_timeout=budget,
                    headers=headers,
                ), budget)
                break
            except self._server_error as exc:
                error = _translate(exc, self.url)
                retry_in = RETRY_BACKOFF_SECONDS[attempt] if attempt < len(RETRY_BACKOFF_SECONDS) else None
                if (
                    not isinstance(error, errors.Unavailable)
                    or retry_in is None
                    or time.monotonic() + retry_in >= deadline
                ):
                    raise error from exc
                if headers is not None:
                    from opentelemetry import trace

                    trace.get_current_span().add_event("retry", {"error": str(error)[:200], "attempt": attempt + 1})
                time.sleep(retry_in)
        outputs = result.as_numpy(self.OUTPUT)
        if outputs is None or len(outputs) != rows or outputs.size != rows * self.output_width:
            raise RuntimeError(
                f"Triton at {self.url} returned {None if outputs is None else outputs.shape} "
                f"for {rows} rows"
            )
        return outputs.reshape(rows, self.output_width)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        client = getattr(self, "_client", None)
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TritonTextClient(TritonModelClient):
    """A model that reads one string per row (input TEXT)."""

    def infer(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        """The model's output for each text, float32 [len(texts), output_width].
        `timeout` (seconds, default the constructor's) bounds the whole call,
        across chunks."""
        data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
        return self.infer_arrays({TEXT: data}, timeout)

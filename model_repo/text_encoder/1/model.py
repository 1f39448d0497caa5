"""Triton Python backend for the text encoder.

Tokenises inside Triton so clients send raw strings, then runs the exported
ONNX graph (pooling and L2 normalisation are in the graph) with onnxruntime.
The tokenizer settings come from recsys_core.encoder, so Triton and the
in-process OnnxEncoder produce the same vectors; the launcher
(recsys_core.triton) puts the repo root on PYTHONPATH for this import.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from recsys_core import encoder as enc

TEXT = "TEXT"


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        # Load from the version folder Triton chose, not "the latest": Triton
        # owns version policy and may serve several versions side by side.
        version_dir = Path(args["model_repository"]) / args["model_version"]

        output = pb_utils.get_output_config_by_name(config, enc.EMBEDDING)
        self.dimension = int(output["dims"][-1])
        parameters = config.get("parameters", {})
        precision = parameters.get("precision", {}).get("string_value") or enc.DEFAULT_PRECISION
        weights_file, _, dimension = enc.weights(version_dir, precision)
        if dimension != self.dimension:
            # Fail the load rather than serve vectors the config misdescribes.
            raise ValueError(
                f"config.pbtxt declares {enc.EMBEDDING} dims {self.dimension} but "
                f"{version_dir / enc.METADATA_FILE} says {dimension}"
            )

        options = ort.SessionOptions()
        threads = int(parameters.get("intra_op_threads", {}).get("string_value") or 0)
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        # Only a GPU instance may claim a device, and only if onnxruntime-gpu is
        # installed; otherwise the CPU provider keeps the model loadable.
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args["model_instance_device_id"])
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(str(weights_file), options, providers=providers)
        self.tokenizer = enc.load_tokenizer(version_dir)

    def execute(self, requests):
        # Dynamic batching hands us several requests at once: decode each one
        # separately so a malformed request fails alone, then run the valid
        # texts together in as few forward passes as possible.
        responses: list = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, stop) into texts
        for i, request in enumerate(requests):
            try:
                batch = pb_utils.get_input_tensor_by_name(request, TEXT).as_numpy().reshape(-1)
                decoded = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch]
            except Exception as exc:  # noqa: BLE001 - reported to that client, not raised
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"{TEXT}: cannot decode as UTF-8 strings: {exc}", pb_utils.TritonError.INVALID_ARG
                    )
                )
                continue
            spans.append((i, len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)

        try:
            vectors = self._encode(texts)
        except Exception as exc:  # noqa: BLE001 - every request in the batch shares the failure
            error = pb_utils.TritonError(f"text_encoder inference failed: {exc}")
            for i, _, _ in spans:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses

        for i, start, stop in spans:
            tensor = pb_utils.Tensor(enc.EMBEDDING, vectors[start:stop])
            responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        # Padding is to the longest text of a forward pass, so grouping by
        # length keeps short titles from paying for a long description when a
        # large max_batch_size (e.g. on GPU) splits the batch into passes.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), enc.ENCODE_BATCH):
            chunk = order[start : start + enc.ENCODE_BATCH]
            ids, mask = enc.tokenize(self.tokenizer, [texts[j] for j in chunk])
            (vectors,) = self.session.run([enc.EMBEDDING], {enc.INPUT_IDS: ids, enc.ATTENTION_MASK: mask})
            out[chunk] = vectors
        return out

    def finalize(self):
        self.session = None
        self.tokenizer = None

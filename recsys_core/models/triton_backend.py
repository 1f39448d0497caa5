"""What our Triton Python-backend models share: requests decoded one by one
(a malformed one fails alone), run together through an in-process model of
recsys_core, one FP32 output tensor back per request.

Each model's `<version>/model.py` subclasses `TextModel` (raw strings in: the
text encoder, with OnnxEncoder; the review classifier, with
OnnxReviewClassifier) or `TritonModel` itself (the user tower, float arrays
in), and says how to load its engine from the version folder, so Triton and
the in-process path run the same code. `TokenizerModel` is the first step of
the text encoder's ensemble (model_repo/text_tokenizer): strings in, the
graph's token tensors out, through the tokenizer OnnxEncoder uses. Triton's stub imports model.py from
the version folder and this module through PYTHONPATH: the launcher
(recsys_core.models.triton) puts the repository root there, the production image
(deploy/triton/Dockerfile) copies recsys_core/ to /opt/recsys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from recsys_core.models import encoder as enc
from recsys_core.models.triton_client import TEXT


class TritonModel:
    """Base of a `TritonPythonModel`: subclasses set OUTPUT and implement
    `load`, `decode` and `run`."""

    OUTPUT: str

    def load(self, version_dir: Path, parameters: dict[str, str], providers: list, output_dims: list[int]):
        """The engine `run` uses, loaded from the version folder."""
        raise NotImplementedError

    def decode(self, request) -> tuple[Any, int]:
        """(what `run` takes, rows) of one request; raising marks that request
        as invalid (INVALID_ARG, the exception's message) and no other."""
        raise NotImplementedError

    def run(self, decoded: list) -> np.ndarray:
        """Float32 [sum of rows, *output_dims]: the decoded requests' rows, in order."""
        raise NotImplementedError

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        # Load from the version folder Triton chose, not "the latest": Triton
        # owns version policy and may serve several versions side by side.
        version_dir = Path(args["model_repository"]) / args["model_version"]
        output = pb_utils.get_output_config_by_name(config, self.OUTPUT)
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        providers = ["CPUExecutionProvider"]
        # Only a GPU instance may claim a device, and only if onnxruntime-gpu is
        # installed; otherwise the CPU provider keeps the model loadable.
        import onnxruntime as ort

        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args["model_instance_device_id"])
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.engine = self.load(version_dir, parameters, providers, [int(d) for d in output["dims"]])

    def execute(self, requests):
        # Dynamic batching hands us several requests at once: decode each one
        # separately so a malformed request fails alone, then run the valid
        # ones together in as few forward passes as possible.
        responses: list = [None] * len(requests)
        decoded: list = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, stop) into the rows run
        rows = 0
        for i, request in enumerate(requests):
            try:
                payload, count = self.decode(request)
            except Exception as exc:  # noqa: BLE001 - reported to that client, not raised
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
                continue
            decoded.append(payload)
            spans.append((i, rows, rows + count))
            rows += count
        if not decoded:
            return responses

        try:
            outputs = np.asarray(self.run(decoded), dtype=np.float32).reshape(rows, -1)
        except Exception as exc:  # noqa: BLE001 - every request in the batch shares the failure
            error = pb_utils.TritonError(f"{self.model_name} inference failed: {exc}")
            for i, _, _ in spans:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses

        for i, start, stop in spans:
            tensor = pb_utils.Tensor(self.OUTPUT, outputs[start:stop])
            responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def finalize(self):
        self.engine = None


class TextModel(TritonModel):
    """A model that reads one string per row (input TEXT); `load` returns
    the engine: texts -> float32 array [len(texts), *output_dims]."""

    def load(self, version_dir: Path, parameters: dict[str, str], providers: list,
             output_dims: list[int]) -> Callable[[list[str]], np.ndarray]:
        raise NotImplementedError

    def decode(self, request) -> tuple[list[str], int]:
        texts = decode_texts(request)
        return texts, len(texts)

    def run(self, decoded: list[list[str]]) -> np.ndarray:
        return self.engine([text for texts in decoded for text in texts])


def decode_texts(request) -> list[str]:
    """The TEXT input of one request as strings; ValueError when it is not UTF-8."""
    try:
        batch = pb_utils.get_input_tensor_by_name(request, TEXT).as_numpy().reshape(-1)
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch]
    except Exception as exc:
        raise ValueError(f"{TEXT}: cannot decode as UTF-8 strings: {exc}") from exc


class TokenizerModel:
    """The tokenisation step of the text encoder's ensemble: TEXT [n, 1] in,
    INPUT_IDS and ATTENTION_MASK [n, tokens] (int64) out, with the exported
    tokenizer and `encoder.tokenize`, exactly as OnnxEncoder feeds its graph.

    Each request is tokenised on its own and padded to its own longest text
    (what OnnxEncoder does to a batch), never to another request's: the
    onnxruntime model behind it then batches only requests of one length,
    and a short title never pays for a long one.
    """

    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = enc.load_tokenizer(version_dir)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = decode_texts(request)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            ids, mask = enc.tokenize(self.tokenizer, texts)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(enc.INPUT_IDS, ids), pb_utils.Tensor(enc.ATTENTION_MASK, mask),
            ]))
        return responses

    def finalize(self):
        self.tokenizer = None

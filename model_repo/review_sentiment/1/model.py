"""Triton Python backend for the review sentiment classifier.

Raw review strings in, P(positive) out: the review is cut to head and tail and
tokenised inside Triton exactly as in training (lengths from the export's
classifier.json), and the fine-tuned ONNX graph runs on onnxruntime through
the in-process OnnxReviewClassifier. Request handling is shared with the text
encoder (recsys_core.models.triton_backend).
"""
from __future__ import annotations

from recsys_core.models import review_classifier as rc
from recsys_core.models.triton_backend import TextModel


class TritonPythonModel(TextModel):
    OUTPUT = rc.POSITIVE_PROBABILITY

    def load(self, version_dir, parameters, providers, output_dims):
        if not (version_dir / rc.METADATA_FILE).is_file():
            raise FileNotFoundError(f"no exported review classifier in {version_dir}: run {rc.HOW_TO_EXPORT}")
        if output_dims != [1]:
            raise ValueError(f"config.pbtxt declares {rc.POSITIVE_PROBABILITY} dims {output_dims}, expected [1]")
        precision = parameters.get("precision") or "int8"
        threads = int(parameters.get("intra_op_threads") or 0)
        return rc.OnnxReviewClassifier(version_dir, precision=precision, threads=threads, providers=providers)

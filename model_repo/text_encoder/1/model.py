"""Triton Python backend for the text encoder.

Tokenises inside Triton so clients send raw strings, then runs the exported
ONNX graph (pooling and L2 normalisation are in the graph) with onnxruntime,
through the same OnnxEncoder the services run in process, so Triton and the
in-process encoder produce the same vectors. Request handling is shared with
our other models (recsys_core.models.triton_backend); the launcher
(recsys_core.models.triton) puts the repo root on PYTHONPATH for these imports.
"""
from __future__ import annotations

from recsys_core.models import encoder as enc
from recsys_core.models.triton_backend import TextModel


class TritonPythonModel(TextModel):
    OUTPUT = enc.EMBEDDING

    def load(self, version_dir, parameters, providers, output_dims):
        precision = parameters.get("precision") or enc.DEFAULT_PRECISION
        threads = int(parameters.get("intra_op_threads") or 0)
        spin = (parameters.get("allow_spinning") or "1") != "0"
        encoder = enc.OnnxEncoder(version_dir, threads=threads, precision=precision, providers=providers, spin=spin)
        if output_dims[-1] != encoder.dimension:
            # Fail the load rather than serve vectors the config misdescribes.
            raise ValueError(
                f"config.pbtxt declares {enc.EMBEDDING} dims {output_dims[-1]} but "
                f"{version_dir / enc.METADATA_FILE} says {encoder.dimension}"
            )
        return encoder.encode

"""Triton Python backend for the first step of text_encoder_ensemble: raw
strings in, the encoder graph's INPUT_IDS and ATTENTION_MASK out.

The tokenizer is the one the export writes (tokenizer.json, copied here by
recsys_core.models.export) and the code is the in-process encoder's
(recsys_core.models.triton_backend.TokenizerModel over encoder.tokenize), so
the ensemble feeds the graph exactly what OnnxEncoder feeds it.
"""
from __future__ import annotations

from recsys_core.models.triton_backend import TokenizerModel


class TritonPythonModel(TokenizerModel):
    pass

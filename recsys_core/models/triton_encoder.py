"""The text encoder served by Triton, behind the same `Encoder` protocol as the
in-process OnnxEncoder.

Triton tokenises and runs the model (model_repo/text_encoder/1/model.py); this
client only sends strings and reads vectors back over gRPC (the transport,
deadlines and retries: recsys_core.models.triton_client).
"""
from __future__ import annotations

import numpy as np

from recsys_core.data import paths
from recsys_core.models.encoder import EMBEDDING
from recsys_core.models.triton_client import DEFAULT_TIMEOUT, RETRY_BACKOFF_SECONDS, TEXT, TritonTextClient

__all__ = ["DEFAULT_TIMEOUT", "RETRY_BACKOFF_SECONDS", "TEXT", "TritonEncoder"]


class TritonEncoder(TritonTextClient):
    """Encodes through a Triton server at `url` ("host:grpc_port"), pinned to
    the model version it found at construction."""

    OUTPUT = EMBEDDING

    def __init__(
        self,
        url: str,
        model_name: str = paths.TEXT_ENCODER_MODEL,
        *,
        version: int | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tracer=None,
    ):
        super().__init__(url, model_name, version=version, timeout=timeout, tracer=tracer)
        self.dimension = self.output_width

    def encode(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text. `timeout` (seconds,
        default the constructor's) bounds the whole call, across chunks."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self.infer(texts, timeout)

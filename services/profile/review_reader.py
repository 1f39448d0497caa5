"""The profile service's view of the review classifier served by Triton."""
from __future__ import annotations

import logging
import threading

import numpy as np

from recsys_core.errors import Unavailable

log = logging.getLogger(__name__)


class ReviewReader:
    """P(positive) of review texts from Triton's review_sentiment model.

    Connects on first use rather than at start, and again after a failed
    connection: Triton may come up after the profile service (Kubernetes
    starts them independently), and profiles must not wait for it."""

    def __init__(self, url: str, model_name: str, tracer=None):
        self.url = url
        self.model_name = model_name
        self.tracer = tracer
        self._client = None
        self._lock = threading.Lock()

    def _connected(self):
        with self._lock:
            if self._client is None:
                from recsys_core.models.review_classifier import TritonReviewClassifier

                try:
                    self._client = TritonReviewClassifier(self.url, self.model_name, tracer=self.tracer)
                except Unavailable:
                    raise
                except Exception as error:  # noqa: BLE001 - a model not (yet) loaded, a refused connection
                    raise Unavailable(f"review classifier {self.model_name} at {self.url}: {error}") from error
            return self._client

    def __call__(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        return self._connected().classify(texts, timeout)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def connect(url: str, model_name: str, tracer=None) -> ReviewReader | None:
    return ReviewReader(url, model_name, tracer) if url else None

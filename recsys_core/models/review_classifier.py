"""The review sentiment classifier: MiniLM fine-tuned on review text
(training/reviews.py), exported to ONNX with its tokenizer.

Training, the in-process `OnnxReviewClassifier` and the Triton model
(model_repo/review_sentiment/1/model.py) all cut and tokenise a review through
`ReviewTokenizer`, with the lengths recorded in the export's metadata, so the
served model reads a review exactly as it was trained to. Callers of the
served model use `TritonReviewClassifier`. Torch-free.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from recsys_core.models import encoder as enc
from recsys_core.data import paths
from recsys_core.models.triton_client import DEFAULT_TIMEOUT, TritonTextClient

MODEL_NAME = paths.REVIEW_SENTIMENT_MODEL
POSITIVE_PROBABILITY = "POSITIVE_PROBABILITY"
METADATA_FILE = "classifier.json"
HOW_TO_EXPORT = "`recsys train-reviews --quick` (make setup)"
# 256 tokens cover the whole of four reviews in five; longer ones keep their
# start (title, first impression) and their end, where reviewers sum up.
MAX_TOKENS = 256
HEAD_TOKENS = 64


def keep_head_and_tail(ids: np.ndarray, mask: np.ndarray, max_tokens: int, head_tokens: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Rows longer than `max_tokens` keep their first `head_tokens` tokens after
    [CLS] and their last ones up to [SEP]; the batch is re-padded to its
    longest kept row. `ids`/`mask` are right-padded tokenizer output."""
    if not 0 <= head_tokens <= max_tokens - 2:
        raise ValueError(f"head_tokens must be between 0 and max_tokens - 2, got {head_tokens} of {max_tokens}")
    lengths = mask.sum(axis=1)
    width = int(min(lengths.max(initial=0), max_tokens))
    out_ids = np.zeros((len(ids), width), dtype=np.int64)
    out_mask = np.zeros((len(ids), width), dtype=np.int64)
    tail = max_tokens - 1 - head_tokens  # tokens from the end, [SEP] included
    for row, length in enumerate(lengths):
        if length <= max_tokens:
            out_ids[row, :length] = ids[row, :length]
            out_mask[row, :length] = 1
        else:
            out_ids[row, : 1 + head_tokens] = ids[row, : 1 + head_tokens]
            out_ids[row, 1 + head_tokens : max_tokens] = ids[row, length - tail : length]
            out_mask[row, :max_tokens] = 1
    return out_ids, out_mask


class ReviewTokenizer:
    """Token ids and attention mask of reviews, cut to head and tail."""

    def __init__(self, tokenizer_dir: Path, max_tokens: int = MAX_TOKENS, head_tokens: int = HEAD_TOKENS):
        self.max_tokens = max_tokens
        self.head_tokens = head_tokens
        self._tokenizer = enc.load_tokenizer(tokenizer_dir, max_tokens=None)
        # The tokenizer object is not safe to share between threads.
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            ids, mask = enc.tokenize(self._tokenizer, texts)
        return keep_head_and_tail(ids, mask, self.max_tokens, self.head_tokens)


def metadata(version_dir: Path) -> dict:
    return json.loads((version_dir / METADATA_FILE).read_text())


def latest_version_dir(repo: Path = paths.MODEL_REPO) -> Path:
    return enc.latest_version_dir(MODEL_NAME, repo, METADATA_FILE, HOW_TO_EXPORT)


def check_texts(texts) -> list[str]:
    """The reviews as a list of strings, or a clear error."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts: expected a list of review strings, got a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
    return texts


class OnnxReviewClassifier:
    """P(positive) of reviews with onnxruntime in this process: offline
    evaluation, and the Triton model's engine."""

    def __init__(self, version_dir: Path, precision: str = "fp32", threads: int = 0,
                 providers: list | None = None):
        weights_file, self.fingerprint, _ = enc.weights(version_dir, precision, METADATA_FILE)
        self.precision = precision
        info = metadata(version_dir)
        self.tokenizer = ReviewTokenizer(version_dir, int(info["max_tokens"]), int(info["head_tokens"]))
        self.session = enc.onnx_session(weights_file, threads, providers)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """P(positive), one float32 per text."""
        return enc.in_length_order(check_texts(texts), 1, self._classify_batch)[:, 0]

    def _classify_batch(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer(texts)
        (probability,) = self.session.run([POSITIVE_PROBABILITY], {enc.INPUT_IDS: ids, enc.ATTENTION_MASK: mask})
        return probability


class TritonReviewClassifier(TritonTextClient):
    """P(positive) of reviews from the review_sentiment model on a Triton
    server at `url` ("host:grpc_port"), pinned to the version it found at
    construction. A `classify` for recsys_core.signals.reviews.opinions:

        with TritonReviewClassifier(url) as classify:
            opinions(text, classify)

    Errors: errors.Unavailable (Triton down, after short retries),
    errors.DeadlineExceeded (past `timeout`), TypeError (not a list of str).
    """

    OUTPUT = POSITIVE_PROBABILITY

    def __init__(self, url: str, model_name: str = MODEL_NAME, *, version: int | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tracer=None):
        super().__init__(url, model_name, version=version, timeout=timeout, tracer=tracer)
        if self.output_width != 1:
            self.close()
            raise ValueError(f"model {model_name} at {url}: {POSITIVE_PROBABILITY} must have one value per review")

    def classify(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        """P(positive), one float32 per text; `timeout` bounds the whole call."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return self.infer(texts, timeout)[:, 0]

    __call__ = classify

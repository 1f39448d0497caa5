"""Text encoders behind one interface.

`OnnxEncoder` runs the exported MiniLM in process with onnxruntime: the
embedded default. The Triton-served encoder implements the same `Encoder`
protocol, so callers never know which one they hold.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from recsys_core import paths

MAX_TOKENS = 128
# Sorting a batch by length before padding keeps short titles from paying for
# one long description; 64 is where throughput on 2 cores stops improving.
ENCODE_BATCH = 64
INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"
EMBEDDING = "EMBEDDING"
WEIGHTS_FILE = "model.onnx"
INT8_WEIGHTS_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "encoder.json"
# int8 (per-channel dynamic quantisation) runs several times faster on CPU and
# stays within 0.99 cosine of fp32 (tests/test_export.py); GPUs run fp32.
PRECISIONS = ("int8", "fp32")
DEFAULT_PRECISION = "int8"


class Encoder(Protocol):
    dimension: int
    # Identifies the weights: embeddings from different fingerprints never mix.
    fingerprint: str

    def encode(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text. `timeout` bounds a
        remote encoder's call; an in-process one finishes what it started."""


def latest_version_dir(model_name: str = paths.TEXT_ENCODER_MODEL, repo: Path = paths.MODEL_REPO) -> Path:
    """The highest numeric version folder holding a complete export (its
    metadata file is written last)."""
    model_dir = repo / model_name
    versions = sorted(
        (int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / METADATA_FILE).is_file()),
        reverse=True,
    ) if model_dir.is_dir() else []
    if not versions:
        raise FileNotFoundError(
            f"no exported encoder under {model_dir}: run `recsys export` (make export) first"
        )
    return model_dir / str(versions[0])


def weights(version_dir: Path, precision: str = DEFAULT_PRECISION) -> tuple[Path, str, int]:
    """(weights file, fingerprint, dimension) of an exported version at a precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    metadata = json.loads((version_dir / METADATA_FILE).read_text())
    entry = metadata["weights"][precision]
    return version_dir / entry["file"], entry["fingerprint"], int(metadata["dimension"])


def load_tokenizer(version_dir: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


class OnnxEncoder:
    def __init__(self, version_dir: Path, threads: int = 0, precision: str = DEFAULT_PRECISION):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        weights_file, self.fingerprint, self.dimension = weights(version_dir, precision)
        self.precision = precision
        self.session = ort.InferenceSession(str(weights_file), options, providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(version_dir)
        # The tokenizer object is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()

    def encode(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), ENCODE_BATCH):
            chunk = order[start : start + ENCODE_BATCH]
            with self._tokenizer_lock:
                ids, mask = tokenize(self.tokenizer, [texts[i] for i in chunk])
            (vectors,) = self.session.run([EMBEDDING], {INPUT_IDS: ids, ATTENTION_MASK: mask})
            out[chunk] = vectors
        return out

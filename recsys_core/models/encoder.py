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

from recsys_core.data import paths

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


def latest_version_dir(
    model_name: str = paths.TEXT_ENCODER_MODEL,
    repo: Path = paths.MODEL_REPO,
    metadata_file: str = METADATA_FILE,
    how_to_export: str = "`recsys export` (make export)",
) -> Path:
    """The highest numeric version folder holding a complete export (its
    metadata file is written last)."""
    model_dir = repo / model_name
    versions = sorted(
        (int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / metadata_file).is_file()),
        reverse=True,
    ) if model_dir.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no exported {model_name} under {model_dir}: run {how_to_export} first")
    return model_dir / str(versions[0])


def weights(
    version_dir: Path, precision: str = DEFAULT_PRECISION, metadata_file: str = METADATA_FILE
) -> tuple[Path, str, int]:
    """(weights file, fingerprint, output dimension) of an exported version at a precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    metadata = json.loads((version_dir / metadata_file).read_text())
    entry = metadata["weights"][precision]
    return version_dir / entry["file"], entry["fingerprint"], int(metadata["dimension"])


def load_tokenizer(version_dir: Path, max_tokens: int | None = MAX_TOKENS):
    """The exported tokenizer, padding to the longest text of a batch;
    `max_tokens=None` keeps every token (for callers that cut texts themselves)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
    if max_tokens is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


def onnx_session(weights_file: Path, threads: int = 0, providers: list | None = None, spin: bool = True):
    """An onnxruntime session; `threads` 0 lets it use every core, `providers`
    defaults to the CPU. `spin=False` stops its worker threads busy-waiting
    for the next run (onnxruntime's default): right where other processes
    need the same cores between runs, as Triton's front end and its clients
    do around a Python-backend model (docs/performance.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(weights_file), options, providers=providers or ["CPUExecutionProvider"])


def in_length_order(texts: list[str], width: int, run_batch, batch_size: int = ENCODE_BATCH) -> np.ndarray:
    """`run_batch(texts) -> [len(texts), width]` over batches of similar length,
    rows back in the order of `texts`. Padding is to the longest text of a
    batch, so grouping by length keeps short texts from paying for a long one."""
    out = np.empty((len(texts), width), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = run_batch([texts[i] for i in chunk])
    return out


class OnnxEncoder:
    def __init__(self, version_dir: Path, threads: int = 0, precision: str = DEFAULT_PRECISION,
                 providers: list | None = None, spin: bool = True, background: bool = False):
        """`background`: create the session in a thread of its own, so the
        caller's other start-up work (the embedding service reading its
        index) overlaps it; `loaded()` waits for it and raises its error.
        Fingerprint and dimension are known at once (from the metadata)."""
        weights_file, self.fingerprint, self.dimension = weights(version_dir, precision)
        self.precision = precision
        # The tokenizer object is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()
        self._error: BaseException | None = None

        def load() -> None:
            try:
                self.session = onnx_session(weights_file, threads, providers, spin)
                self.tokenizer = load_tokenizer(version_dir)
            except BaseException as error:  # noqa: BLE001 - raised again by loaded()
                self._error = error

        self._loader = threading.Thread(target=load, name="onnx-encoder-load", daemon=True)
        if background:
            self._loader.start()
        else:
            load()
            self.loaded()

    def loaded(self) -> "OnnxEncoder":
        if self._loader.is_alive():
            self._loader.join()
        if self._error is not None:
            raise self._error
        return self

    def encode(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        self.loaded()
        return in_length_order(texts, self.dimension, self._encode_batch)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            ids, mask = tokenize(self.tokenizer, texts)
        (vectors,) = self.session.run([EMBEDDING], {INPUT_IDS: ids, ATTENTION_MASK: mask})
        return vectors

"""The trained user tower in process: a shopper's latest item vectors in, the
shopper vector out, scored by inner product against item vectors.

`recsys train` exports it (training/modeldir.py) as ONNX beside a
metadata file; Triton serves it through this class
(deploy/triton/user_tower/model.py) and the profile service calls it there
(services/profile/user_tower.py). Needs numpy and onnxruntime only.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys_core.models import encoder as enc

METADATA_FILE = "user_tower.json"
ITEM_VECTORS = "ITEM_VECTORS"
MASK = "MASK"
SHOPPER_VECTOR = "SHOPPER_VECTOR"
# Its outputs feed a ranking that keeps a few decimals of a score; int8 would
# save little on a model this small.
DEFAULT_PRECISION = "fp32"


def check_batch(vectors: np.ndarray, mask: np.ndarray, dimension: int) -> None:
    """ValueError naming the input unless `vectors` [B, L, dimension] and
    `mask` [B, L] are a well-formed left-padded batch."""
    if vectors.ndim != 3 or vectors.shape[2] != dimension:
        raise ValueError(f"{ITEM_VECTORS}: expected [batch, length, {dimension}], got {list(vectors.shape)}")
    if mask.shape != vectors.shape[:2]:
        raise ValueError(f"{MASK}: expected {list(vectors.shape[:2])} like {ITEM_VECTORS}, got {list(mask.shape)}")
    if vectors.shape[1] == 0:
        raise ValueError(f"{ITEM_VECTORS}: a history needs at least one item")
    if not np.isin(mask, (0.0, 1.0)).all():
        raise ValueError(f"{MASK}: values must be 0 (padding) or 1 (an item)")
    if not mask[:, -1].all():
        # Left padding: the latest item is last, so an empty last slot means
        # an empty history or right padding, and the model reads either wrongly.
        raise ValueError(f"{MASK}: every row needs its latest item last (left padding, at least one item)")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{ITEM_VECTORS}: values must be finite")


def left_pad(histories: Sequence[np.ndarray], dimension: int, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [B, L, dimension], mask [B, L]) from histories of item
    vectors, oldest first: the latest `max_len` items of each, left-padded to
    the longest."""
    kept = [np.asarray(h, dtype=np.float32)[-max_len:] if max_len else np.asarray(h, dtype=np.float32)
            for h in histories]
    length = max((len(h) for h in kept), default=0)
    vectors = np.zeros((len(kept), length, dimension), dtype=np.float32)
    mask = np.zeros((len(kept), length), dtype=np.float32)
    for row, history in enumerate(kept):
        if len(history):
            vectors[row, length - len(history):] = history
            mask[row, length - len(history):] = 1.0
    return vectors, mask


def concatenate_batches(batches: Sequence[tuple[np.ndarray, np.ndarray]],
                        length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded batches of different lengths as one, padded to the
    longest (or to `length`, at least as long)."""
    length = length or max(vectors.shape[1] for vectors, _ in batches)
    padded_vectors, padded_masks = [], []
    for vectors, mask in batches:
        extra = length - vectors.shape[1]
        padded_vectors.append(np.pad(vectors, ((0, 0), (extra, 0), (0, 0))))
        padded_masks.append(np.pad(mask, ((0, 0), (extra, 0))))
    return np.concatenate(padded_vectors), np.concatenate(padded_masks)


class OnnxUserTower:
    """The exported user tower of a version folder (model.onnx,
    model.int8.onnx, user_tower.json) on onnxruntime."""

    def __init__(self, version_dir: Path, precision: str = DEFAULT_PRECISION, threads: int = 0,
                 providers: list | None = None):
        weights_file, self.fingerprint, self.dimension = enc.weights(version_dir, precision, METADATA_FILE)
        metadata = json.loads((version_dir / METADATA_FILE).read_text())
        # Positions are learned up to max_len: longer histories keep their latest items.
        self.max_len = int(metadata["max_len"])
        self.precision = precision
        self.session = enc.onnx_session(weights_file, threads, providers)

    def __call__(self, vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Shopper vectors [B, dimension] of a left-padded batch."""
        vectors = np.asarray(vectors, dtype=np.float32)
        mask = np.asarray(mask, dtype=np.float32)
        check_batch(vectors, mask, self.dimension)
        # Always exactly max_len items long: the exported attention keeps the
        # length it was traced at in a Reshape, so another length fails in
        # onnxruntime; positions count back from the latest item, so more
        # left padding does not change what the model reads.
        vectors, mask = concatenate_batches([(vectors[:, -self.max_len:], mask[:, -self.max_len:])],
                                            length=self.max_len)
        (shopper,) = self.session.run([SHOPPER_VECTOR], {ITEM_VECTORS: vectors, MASK: mask})
        return shopper

    def encode(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Shopper vectors of histories of item vectors, oldest first."""
        return self(*left_pad(histories, self.dimension, self.max_len))

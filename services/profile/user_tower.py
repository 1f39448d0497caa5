"""The trained user tower on Triton, as the profile service sees it: a
shopper's item vectors in, their model interest (GetProfile's
`model_interest`) out.

The item vectors are the embedding service's (GetItems with embeddings), so
with a served model (`recsys serve --model DIR`) they already hold each
trained item's ID vector, as the tower saw in training.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from recsys_core import errors
from recsys_core.models import user_tower as ut
from recsys_core.models.triton_client import DEFAULT_TIMEOUT, TritonModelClient

log = logging.getLogger(__name__)

MODEL_NAME = "user_tower"


class ShopperVectors(TritonModelClient):
    """The user tower on a Triton server at `url` ("host:grpc_port"), pinned
    to the version it found at construction.

    Errors: errors.Unavailable (Triton down, after short retries),
    errors.DeadlineExceeded (past `timeout`), ValueError (malformed histories).
    """

    OUTPUT = ut.SHOPPER_VECTOR

    def __init__(self, url: str, model_name: str = MODEL_NAME, *, version: int | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tracer=None):
        super().__init__(url, model_name, version=version, timeout=timeout, tracer=tracer)
        self.dimension = self.output_width
        # The installer writes the longest history a served version reads;
        # sending more would only be cut off there.
        self.max_len = int(self.parameters.get("max_len") or 0) or None

    def encode(self, histories: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """Shopper vectors [len(histories), dimension], one per history of
        item vectors [items, dimension], oldest first (at least one item)."""
        if not histories:
            return np.zeros((0, self.dimension), dtype=np.float32)
        for position, history in enumerate(histories):
            shape = np.shape(history)
            if len(shape) != 2 or shape[0] == 0 or shape[1] != self.dimension:
                raise ValueError(f"histories[{position}]: expected [items >= 1, {self.dimension}], got {list(shape)}")
        vectors, mask = ut.left_pad(histories, self.dimension, self.max_len)
        return self.infer_arrays({ut.ITEM_VECTORS: vectors, ut.MASK: mask}, timeout)


def shopper_interest(item_ids: Sequence[str], vectors: dict[str, np.ndarray], tower: ShopperVectors | None,
                     timeout: float) -> np.ndarray | None:
    """The model interest of a shopper whose events name `item_ids` (oldest
    first; every event counts, as in training), from their items' vectors.

    None without a tower, without a known item, or when the tower is
    unreachable or too slow for the call's budget: a profile without it still
    serves every other signal, and the gateway then retrieves from the
    interest vectors alone."""
    history = [vectors[item_id] for item_id in item_ids if item_id in vectors]
    if tower is None or not history:
        return None
    try:
        return tower.encode([np.stack(history)], timeout)[0]
    except (errors.Unavailable, errors.DeadlineExceeded) as error:
        log.warning("no model interest: %s", error)
        return None


def connect(url: str, model_name: str = MODEL_NAME, tracer=None) -> ShopperVectors | None:
    """The user tower at `url`, or None when no url is configured (no model served)."""
    return ShopperVectors(url, model_name, tracer=tracer) if url else None

"""The item catalogue, durable and shared by every embedding replica.

Each item is stored once, in its latest state: id, category, title, text,
category path, the raw encoder vector (float32 bytes, before any trained
model's ID vector) and the fingerprint of the encoder that made it. Every
write takes the next number of one store-wide sequence, and each item keeps
the number of the write that last changed it. So "what changed since
version v" is "the items whose number is above v", and a replica that
remembers the version it applied polls one number and reads only the delta
(docs/operations.md, "Catalogue store").

Backends: SQLite in WAL mode (catalogue_sqlite.py; the embedded default, one
file that the replicas of one machine share) and Redis (catalogue_redis.py;
Kubernetes, or any set of replicas on several machines).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STORES = ("sqlite", "redis")


@dataclass(frozen=True)
class CatalogueEntry:
    item_id: str
    category: str
    title: str
    text: str
    category_path: str
    # Fingerprint of the encoder's weights: a replica with another encoder
    # re-encodes the text instead of mixing two vector spaces in one index.
    encoder: str
    vector: np.ndarray  # float32, the encoder's output


@dataclass(frozen=True)
class PutResult:
    inserted: int
    updated: int
    version: int  # the store's version once the write was applied (at least)


class CatalogueStore(ABC):
    @abstractmethod
    def put(self, entries: Sequence[CatalogueEntry], only_new: bool = False) -> PutResult:
        """Store entries atomically, durable once this returns. `only_new`:
        leave items that exist as they are (seeding from bundled data must
        never undo an upsert)."""

    @abstractmethod
    def version(self) -> int:
        """The number of the latest write; 0 for an empty store. Cheap: polled."""

    @abstractmethod
    def changes(self, after: int) -> tuple[list[CatalogueEntry], int]:
        """Every item changed by a write numbered above `after`, in its latest
        state, and the version to ask from next time."""

    @abstractmethod
    def meta(self, key: str) -> str | None:
        """A note kept beside the items (which data sets seeded the store)."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Durable once this returns, as an item is."""

    def close(self) -> None:
        pass


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def latest(entries: Sequence[CatalogueEntry]) -> list[CatalogueEntry]:
    """One entry per item: a later duplicate in a batch wins, as a sequence of writes would."""
    return list({entry.item_id: entry for entry in entries}.values())

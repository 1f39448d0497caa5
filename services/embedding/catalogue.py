"""The item catalogue and its embedding index: the embedding service's domain."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recsys_core.encoder import Encoder
from recsys_core.errors import InvalidArgument, NotFound
from recsys_core.vector_index import VectorIndex

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
MAX_ITEMS_PER_REQUEST = 10_000
# Encoding in chunks lets a long start-up show progress and save partial work.
ENCODE_CHUNK = 512


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    category: str
    title: str
    text: str


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class EmbeddingCache:
    """Item embeddings on disk, keyed by encoder fingerprint and item text, so a
    restart re-encodes only what changed. One .npz per fingerprint."""

    def __init__(self, cache_dir: Path | None, fingerprint: str):
        self.path = None if cache_dir is None else Path(cache_dir) / "embeddings" / f"{fingerprint}.npz"
        self._lock = threading.Lock()
        self.vectors: dict[str, tuple[str, np.ndarray]] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as stored:
                for key, digest, vector in zip(stored["keys"], stored["digests"], stored["vectors"]):
                    self.vectors[str(key)] = (str(digest), vector)

    def lookup(self, key: str, digest: str) -> np.ndarray | None:
        hit = self.vectors.get(key)
        return hit[1] if hit is not None and hit[0] == digest else None

    def store(self, keys: Sequence[str], digests: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            for key, digest, vector in zip(keys, digests, vectors):
                self.vectors[key] = (digest, vector)

    def save(self) -> None:
        if self.path is None or not self.vectors:
            return
        with self._lock:
            keys = list(self.vectors)
            digests = [self.vectors[k][0] for k in keys]
            vectors = np.stack([self.vectors[k][1] for k in keys])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.asarray(keys), digests=np.asarray(digests), vectors=vectors)
        tmp.replace(self.path)


class Catalogue:
    def __init__(self, encoder: Encoder, cache: EmbeddingCache, use_gpu: bool | None = None):
        self.encoder = encoder
        self.cache = cache
        self.index = VectorIndex(encoder.dimension, use_gpu=use_gpu)
        self._items: dict[str, ItemRecord] = {}
        self._write_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def categories(self) -> dict[str, int]:
        return self.index.categories()

    # -- validation -----------------------------------------------------

    def check_categories(self, categories: Sequence[str], field: str = "categories") -> list[str]:
        known = self.index.categories()
        for name in categories:
            if name not in known:
                raise InvalidArgument(field, f"unknown category {name!r}; known: {', '.join(sorted(known))}")
        return list(dict.fromkeys(categories))

    def check_vectors(self, vectors: Sequence[Sequence[float]], field: str = "vectors") -> np.ndarray:
        if not vectors:
            raise InvalidArgument(field, "at least one query vector is required")
        for position, vector in enumerate(vectors):
            if len(vector) != self.dimension:
                raise InvalidArgument(f"{field}[{position}]", f"has {len(vector)} values, expected {self.dimension}")
        matrix = np.asarray(vectors, dtype=np.float32)
        if not np.isfinite(matrix).all():
            raise InvalidArgument(field, "values must be finite")
        return matrix

    # -- catalogue ----------------------------------------------------------

    def upsert(self, records: Sequence[ItemRecord], show_progress: bool = False) -> tuple[int, int]:
        """Encode and index items; unchanged texts come from the cache. Every
        record is validated before anything is written, so a bad batch changes nothing."""
        if len(records) > MAX_ITEMS_PER_REQUEST and not show_progress:
            raise InvalidArgument("items", f"at most {MAX_ITEMS_PER_REQUEST} items per request, got {len(records)}")
        for position, record in enumerate(records):
            if not record.item_id or len(record.item_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].item_id", f"must be 1..{MAX_ID_CHARS} characters")
            if not record.category or len(record.category) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].category", f"must be 1..{MAX_ID_CHARS} characters")
            if not (record.text.strip() or record.title.strip()):
                raise InvalidArgument(f"items[{position}].text", "an item needs a title or text to be embedded")
        # Later duplicates in one batch win, as a sequence of upserts would.
        records = list({r.item_id: r for r in records}.values())
        texts = [r.text.strip() or r.title.strip() for r in records]
        digests = [text_digest(t) for t in texts]
        vectors = np.zeros((len(records), self.dimension), dtype=np.float32)
        missing = []
        for position, (record, digest) in enumerate(zip(records, digests)):
            cached = self.cache.lookup(record.item_id, digest)
            if cached is None:
                missing.append(position)
            else:
                vectors[position] = cached
        if missing:
            progress = tqdm(total=len(missing), desc="embedding items", unit="item", disable=not show_progress)
            for start in range(0, len(missing), ENCODE_CHUNK):
                chunk = missing[start : start + ENCODE_CHUNK]
                encoded = self.encoder.encode([texts[p] for p in chunk])
                vectors[chunk] = encoded
                self.cache.store([records[p].item_id for p in chunk], [digests[p] for p in chunk], encoded)
                progress.update(len(chunk))
            progress.close()
            self.cache.save()
        with self._write_lock:
            inserted, updated = self.index.upsert(
                [r.item_id for r in records], [r.category for r in records], vectors
            )
            for record in records:
                self._items[record.item_id] = record
        return inserted, updated

    def get(self, item_ids: Sequence[str], skip_missing: bool = False, field: str = "item_ids") -> list[ItemRecord]:
        found = []
        for position, item_id in enumerate(item_ids):
            record = self._items.get(item_id)
            if record is None:
                if skip_missing:
                    continue
                raise NotFound(f"{field}[{position}]: no item {item_id!r} in the catalogue")
            found.append(record)
        return found

    def embeddings(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.index.vectors_of(item_ids)

    def embed_texts(self, texts: Sequence[str], max_texts: int, max_chars: int, timeout: float | None = None) -> np.ndarray:
        if not texts:
            raise InvalidArgument("texts", "at least one text is required")
        if len(texts) > max_texts:
            raise InvalidArgument("texts", f"at most {max_texts} texts per request, got {len(texts)}")
        for position, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{position}]", "is empty")
            if len(text) > max_chars:
                raise InvalidArgument(f"texts[{position}]", f"is {len(text)} characters, the limit is {max_chars}")
        return self.encoder.encode(list(texts), timeout=timeout)

    def search(
        self, vectors: np.ndarray, k: int, max_k: int, categories: Sequence[str], exclude_item_ids: Sequence[str]
    ) -> list[list[tuple[str, float]]]:
        if not 1 <= k <= max_k:
            raise InvalidArgument("k", f"must be between 1 and {max_k}, got {k}")
        categories = self.check_categories(categories)
        return self.index.search(vectors, k, categories, exclude_item_ids)


def records_from_frame(items) -> list[ItemRecord]:
    """Catalogue records from a frame produced by recsys_core.data.load_items."""
    return [
        ItemRecord(item_id=row.item_id, category=row.category, title=row.display_title, text=row.text)
        for row in items.itertuples(index=False)
        if row.text.strip()
    ]

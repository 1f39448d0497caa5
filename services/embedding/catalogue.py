"""The item catalogue and its embedding index: the embedding service's domain."""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from recsys_core.index.embedding_cache import EmbeddingCache, encode_cached
from recsys_core.models.encoder import Encoder
from recsys_core.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable, check_id_characters, quoted
from recsys_core.models.model_serving import IdVectors
from recsys_core.index.kinds import IndexSettings
from recsys_core.index.vector_index import VectorIndex

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    category: str
    title: str
    text: str
    category_path: str = ""


class Catalogue:
    def __init__(self, encoder: Encoder, cache: EmbeddingCache, use_gpu: bool | None = None,
                 id_vectors: IdVectors | None = None, index_settings: IndexSettings | None = None):
        self.encoder = encoder
        self.cache = cache
        # A trained model's: an item it was trained on is indexed as
        # encoder(text) + its ID vector, as the model scored it.
        self.id_vectors = id_vectors
        # Approximate indexes are stored beside the vectors they were built from.
        store_dir = cache.path.parent.parent / "indexes" if cache.path is not None else None
        self.index = VectorIndex(encoder.dimension, use_gpu=use_gpu, settings=index_settings, store_dir=store_dir)
        self._items: dict[str, ItemRecord] = {}
        self._write_lock = threading.Lock()
        # A remote encoder known to be down fails calls at once instead of
        # letting each one wait out its retries.
        self.encoder_ready = True

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
                raise InvalidArgument(field, f"unknown category {quoted(name)}; known: {', '.join(sorted(known))}")
        return list(dict.fromkeys(categories))

    def check_vectors(self, vectors: list[np.ndarray], field: str = "vectors") -> np.ndarray:
        if not vectors:
            raise InvalidArgument(field, "at least one query vector is required")
        for position, vector in enumerate(vectors):
            if len(vector) != self.dimension:
                raise InvalidArgument(f"{field}[{position}]", f"has {len(vector)} values, expected {self.dimension}")
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        if not np.isfinite(matrix).all():
            raise InvalidArgument(field, "values must be finite")
        return matrix

    # -- catalogue ----------------------------------------------------------

    def upsert(self, records: Sequence[ItemRecord], show_progress: bool = False,
               new_categories: bool = True) -> tuple[int, int]:
        """Encode and index items; unchanged texts come from the cache. Every
        record is validated before anything is written, so a bad batch changes nothing.
        Without `new_categories` (a caller who is not an admin), every item's
        category must be in the catalogue already: a category is part of the
        public API (Recommend's filter), not something a feed invents."""
        for position, record in enumerate(records):
            if not record.item_id or len(record.item_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].item_id", f"must be 1..{MAX_ID_CHARS} characters")
            check_id_characters(record.item_id, f"items[{position}].item_id")
            check_id_characters(record.category, f"items[{position}].category")
            if not record.category or len(record.category) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].category", f"must be 1..{MAX_ID_CHARS} characters")
            if not (record.text.strip() or record.title.strip()):
                raise InvalidArgument(f"items[{position}].text", "an item needs a title or text to be embedded")
        if not new_categories:
            known = self.index.categories()
            for position, record in enumerate(records):
                if record.category not in known:
                    raise PermissionDenied(f"items[{position}].category: {quoted(record.category)} is not in the "
                                           "catalogue; only admin callers may add a category")
        # Later duplicates in one batch win, as a sequence of upserts would.
        records = list({r.item_id: r for r in records}.values())
        texts = [r.text.strip() or r.title.strip() for r in records]
        vectors = encode_cached(self.encoder, self.cache, [r.item_id for r in records], texts, show_progress)
        if self.id_vectors is not None:
            vectors = self.id_vectors.add_to([r.item_id for r in records], vectors)
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
                raise NotFound(f"{field}[{position}]: no item {quoted(item_id)} in the catalogue")
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
        if not self.encoder_ready:
            raise Unavailable("the text encoder is not ready; item search keeps working")
        return self.encoder.encode(list(texts), timeout=timeout)

    def search(
        self, vectors: np.ndarray, k: int, max_k: int, categories: Sequence[str], exclude_item_ids: Sequence[str]
    ) -> list[list[tuple[str, float]]]:
        if not 1 <= k <= max_k:
            raise InvalidArgument("k", f"must be between 1 and {max_k}, got {k}")
        categories = self.check_categories(categories)
        return self.index.search(vectors, k, categories, exclude_item_ids)


def records_from_frame(items) -> list[ItemRecord]:
    """Catalogue records from a frame produced by recsys_core.data.shopping.load_items."""
    return [
        ItemRecord(item_id=row.item_id, category=row.category, title=row.display_title, text=row.text,
                   category_path=row.category_path)
        for row in items.itertuples(index=False)
        if row.text.strip()
    ]

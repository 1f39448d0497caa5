"""Item embeddings in FAISS, searchable within chosen categories.

Exact inner-product search, vectors stored as given: the pretrained
encoder's are unit length (so scores are cosines), a trained model's items
add ID vectors to them and its shopper vectors are scored by inner product,
as it was trained (recsys_core/models/model_serving.py). One flat index per
category plus one over everything: a query restricted to categories searches
only theirs, which is both exact and cheaper than filtering a global result.
On a machine with GPUs the same indexes are mirrored to them for search.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import faiss
import numpy as np

log = logging.getLogger(__name__)


class ReadWriteLock:
    """Many concurrent searches, one exclusive writer: FAISS searches release
    the GIL, so serialising them behind a plain lock would waste cores."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def reading(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _flat_index(dimension: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))


class VectorIndex:
    def __init__(self, dimension: int, use_gpu: bool | None = None):
        self.dimension = dimension
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._lock = ReadWriteLock()
        self._row_of: dict[str, int] = {}
        self._item_of_row: list[str] = []
        self._category_of_row: list[str] = []
        self._vectors = np.zeros((0, dimension), dtype=np.float32)
        self._all = _flat_index(dimension)
        self._by_category: dict[str, faiss.IndexIDMap2] = {}
        self._gpu_mirrors: dict[str | None, object] = {}
        self._gpu_resources = faiss.StandardGpuResources() if self.use_gpu else None

    def __len__(self) -> int:
        return self._all.ntotal

    def categories(self) -> dict[str, int]:
        with self._lock.reading():
            return {name: index.ntotal for name, index in self._by_category.items()}

    def contains(self, item_id: str) -> bool:
        return item_id in self._row_of

    def vectors_of(self, item_ids: Sequence[str]) -> np.ndarray:
        with self._lock.reading():
            rows = [self._row_of[i] for i in item_ids]
            return self._vectors[rows].copy()

    def upsert(self, item_ids: Sequence[str], categories: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        """Add items, or move changed ones to their new vector and category.
        Returns (inserted, updated)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(item_ids), self.dimension):
            raise ValueError(f"expected {len(item_ids)}x{self.dimension} vectors, got {vectors.shape}")
        with self._lock.writing():
            new_rows, updated_rows = [], []
            for item_id in item_ids:
                row = self._row_of.get(item_id)
                if row is None:
                    row = len(self._item_of_row)
                    self._row_of[item_id] = row
                    self._item_of_row.append(item_id)
                    self._category_of_row.append("")
                    new_rows.append(row)
                else:
                    updated_rows.append(row)
            if updated_rows:
                self._remove_rows(updated_rows)
            if new_rows:
                grown = np.zeros((len(self._item_of_row), self.dimension), dtype=np.float32)
                grown[: len(self._vectors)] = self._vectors
                self._vectors = grown
            rows = np.asarray([self._row_of[i] for i in item_ids], dtype=np.int64)
            self._vectors[rows] = vectors
            for row, category in zip(rows, categories):
                self._category_of_row[row] = category
            self._all.add_with_ids(vectors, rows)
            for category in set(categories):
                members = np.asarray([c == category for c in categories])
                index = self._by_category.setdefault(category, _flat_index(self.dimension))
                index.add_with_ids(vectors[members], rows[members])
            self._gpu_mirrors.clear()
            return len(new_rows), len(updated_rows)

    def _remove_rows(self, rows: list[int]) -> None:
        selector_rows = np.asarray(rows, dtype=np.int64)
        self._all.remove_ids(selector_rows)
        by_category: dict[str, list[int]] = {}
        for row in rows:
            by_category.setdefault(self._category_of_row[row], []).append(row)
        for category, members in by_category.items():
            index = self._by_category.get(category)
            if index is not None:
                index.remove_ids(np.asarray(members, dtype=np.int64))

    def _searchable(self, category: str | None):
        cpu_index = self._all if category is None else self._by_category[category]
        if not self.use_gpu:
            return cpu_index
        mirror = self._gpu_mirrors.get(category)
        if mirror is None:
            mirror = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
            self._gpu_mirrors[category] = mirror
        return mirror

    def search(
        self,
        queries: np.ndarray,
        k: int,
        categories: Iterable[str] = (),
        exclude_item_ids: Iterable[str] = (),
    ) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per query, best first, within `categories`
        (all when empty), never returning an excluded item. Callers validate
        category names; an unknown one raises KeyError."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dimension)
        wanted = list(dict.fromkeys(categories))
        with self._lock.reading():
            scopes: list[str | None] = wanted or [None]
            for category in wanted:
                if category not in self._by_category:
                    raise KeyError(category)
            excluded_rows = {self._row_of[i] for i in exclude_item_ids if i in self._row_of}
            merged: list[list[tuple[float, int]]] = [[] for _ in range(len(queries))]
            for scope in scopes:
                index = self._all if scope is None else self._by_category[scope]
                excluded_here = (
                    len(excluded_rows)
                    if scope is None
                    else sum(1 for r in excluded_rows if self._category_of_row[r] == scope)
                )
                fetch = min(index.ntotal, k + excluded_here)
                if fetch == 0:
                    continue
                scores, rows = self._searchable(scope).search(queries, fetch)
                for q in range(len(queries)):
                    merged[q].extend(
                        (float(s), int(r)) for s, r in zip(scores[q], rows[q]) if r >= 0 and r not in excluded_rows
                    )
            results = []
            for hits in merged:
                hits.sort(key=lambda hit: -hit[0])
                results.append([(self._item_of_row[row], score) for score, row in hits[:k]])
            return results

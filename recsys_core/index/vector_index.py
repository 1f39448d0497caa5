"""Item embeddings in FAISS, searchable within chosen categories.

Inner-product search, vectors stored as given: the pretrained encoder's are
unit length (so scores are cosines), a trained model's items add ID vectors
to them and its shopper vectors are scored by inner product, as it was
trained (recsys_core/models/model_serving.py). One index per category plus
one over everything: a query restricted to categories searches only theirs,
which is both correct and cheaper than filtering a global result. Each of
those picks its kind by its size (recsys_core/index/kinds.py): exact while
small, HNSW or IVF-PQ once an exact scan would cost too much. On a machine
with GPUs the flat and IVF-PQ indexes are mirrored to them for search.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import faiss
import numpy as np

from recsys_core.index import kinds
from recsys_core.index.kinds import IndexSettings

log = logging.getLogger(__name__)

# The least the vector storage grows by (1.5 MiB at 384 dimensions).
GROWTH_MIN_ROWS = 1024

SubIndex = Union[kinds.FlatSubIndex, kinds.HnswSubIndex, kinds.IvfPqSubIndex]


class ReadWriteLock:
    """Many concurrent searches, one exclusive writer: FAISS searches release
    the GIL, so serialising them behind a plain lock would waste cores. A
    waiting writer holds back new readers: under a steady stream of searches
    an upsert would otherwise wait for a gap that never comes (seen in
    tests/test_vector_index.py's concurrent test: minutes for 30 upserts)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self):
        with self._cond:
            while self._writer or self._writers_waiting:
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
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex:
    def __init__(self, dimension: int, use_gpu: bool | None = None, settings: IndexSettings | None = None,
                 store_dir: Path | None = None):
        self.dimension = dimension
        self.settings = settings or IndexSettings()
        self.settings.check_dimension(dimension)
        # Approximate builds are written here and read back by a later start with the same data.
        self.store_dir = store_dir
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._lock = ReadWriteLock()
        self._row_of: dict[str, int] = {}
        self._item_of_row: list[str] = []
        self._category_of_row: list[str] = []
        # Rows of every item, a view of the first rows of _storage: the
        # storage grows by a quarter at a time, so an upsert of a few items
        # into a big catalogue (every replica applies each one) does not copy
        # all vectors, and the spare room stays a fraction of the whole.
        self._storage = np.zeros((0, dimension), dtype=np.float32)
        self._vectors = self._storage
        # None: the index over every item; a name: that category's.
        self._scopes: dict[str | None, SubIndex] = {None: kinds.FlatSubIndex(dimension)}
        self._gpu_resources = faiss.StandardGpuResources() if self.use_gpu else None

    def __len__(self) -> int:
        return len(self._row_of)

    def categories(self) -> dict[str, int]:
        with self._lock.reading():
            return {name: len(index) for name, index in self._scopes.items() if name is not None}

    def kinds(self) -> dict[str | None, str]:
        """Which kind of index each scope uses (None: the one over everything)."""
        with self._lock.reading():
            return {name: index.kind for name, index in self._scopes.items()}

    def contains(self, item_id: str) -> bool:
        return item_id in self._row_of

    def vectors_of(self, item_ids: Sequence[str]) -> np.ndarray:
        with self._lock.reading():
            rows = [self._row_of[i] for i in item_ids]
            return self._vectors[rows].copy()

    def export(self) -> tuple[list[str], list[str], np.ndarray]:
        """Every item, its category and its indexed vector, in row order: what
        `upsert` needs to build this index again (a replica's start snapshot)."""
        with self._lock.reading():
            return list(self._item_of_row), list(self._category_of_row), self._vectors.copy()

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
            removed = self._removals(updated_rows)
            if new_rows:
                needed = len(self._item_of_row)
                if needed > len(self._storage):
                    grown = np.zeros((max(needed, len(self._storage) * 5 // 4, GROWTH_MIN_ROWS), self.dimension),
                                     dtype=np.float32)
                    grown[: len(self._vectors)] = self._vectors
                    self._storage = grown
                self._vectors = self._storage[:needed]
            rows = np.asarray([self._row_of[i] for i in item_ids], dtype=np.int64)
            self._vectors[rows] = vectors
            for row, category in zip(rows, categories):
                self._category_of_row[row] = category
            added: dict[str | None, np.ndarray] = {None: np.ones(len(rows), dtype=bool)}
            for category in dict.fromkeys(categories):
                added[category] = np.asarray([c == category for c in categories])
            for scope in dict.fromkeys([*removed, *added]):
                self._update_scope(scope, removed.get(scope), vectors, rows, added.get(scope))
            return len(new_rows), len(updated_rows)

    def _removals(self, rows: list[int]) -> dict[str | None, np.ndarray]:
        """The rows each scope loses: an updated item leaves its old place before it is added again."""
        if not rows:
            return {}
        by_scope: dict[str | None, list[int]] = {None: rows}
        for row in rows:
            by_scope.setdefault(self._category_of_row[row], []).append(row)
        return {scope: np.asarray(members, dtype=np.int64) for scope, members in by_scope.items()}

    def _update_scope(self, scope, removed, vectors, rows, members) -> None:
        """Apply one upsert to one scope, rebuilding it as a bigger kind once it
        outgrows its own, or afresh once tombstones pile up."""
        index = self._scopes.get(scope)
        if index is None:
            index = self._scopes[scope] = kinds.FlatSubIndex(self.dimension)
        if removed is not None:
            index.remove(removed)
        if members is None:  # the scope only loses items
            members = np.zeros(len(rows), dtype=bool)
        adding = rows[members]
        kind = self.settings.kind_for(len(index) + len(adding), len(self._item_of_row))
        if kinds.KIND_RANK[kind] > kinds.KIND_RANK[index.kind] or index.needs_rebuild():
            kind = max(kind, index.kind, key=kinds.KIND_RANK.get)
            live = self._live_rows(scope)
            # Every row is live in the scope over everything: a view of the
            # vectors, where indexing by `live` would copy all of them (7.2 GiB at 5M).
            members_vectors = self._vectors[: len(live)] if scope is None else self._vectors[live]
            self._scopes[scope] = kinds.build(kind, self.dimension, self.settings, members_vectors, live,
                                              self.store_dir, "" if scope is None else scope)
        elif len(adding):
            index.add(vectors[members], adding)

    def _live_rows(self, scope: str | None) -> np.ndarray:
        if scope is None:
            return np.arange(len(self._item_of_row), dtype=np.int64)
        return np.asarray([row for row, c in enumerate(self._category_of_row) if c == scope], dtype=np.int64)

    def _exact(self, scope: str | None, query: np.ndarray, k: int, excluded: set[int]) -> list[tuple[float, int]]:
        """Exact top k of one scope: where an approximate search came back
        short (most of its neighbourhood excluded or dead), k that exist are still returned."""
        live = np.asarray([r for r in self._live_rows(scope).tolist() if r not in excluded], dtype=np.int64)
        scores = self._vectors[live] @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [(float(scores[i]), int(live[i])) for i in order]

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
                if category not in self._scopes:
                    raise KeyError(category)
            excluded_rows = {self._row_of[i] for i in exclude_item_ids if i in self._row_of}
            merged: list[list[tuple[float, int]]] = [[] for _ in range(len(queries))]
            for scope in scopes:
                index = self._scopes[scope]
                excluded_here = (
                    excluded_rows
                    if scope is None
                    else {r for r in excluded_rows if self._category_of_row[r] == scope}
                )
                hits = index.search(queries, k, excluded_here, self._vectors, self._gpu_resources)
                exist = min(k, len(index) - len(excluded_here))
                for q in range(len(queries)):
                    found = hits[q]
                    if len(found) < exist:
                        found = self._exact(scope, queries[q], k, excluded_here)
                    merged[q].extend(found)
            results = []
            for hits in merged:
                hits.sort(key=lambda hit: -hit[0])
                results.append([(self._item_of_row[row], score) for score, row in hits[:k]])
            return results

"""How one (sub-)index of item vectors is stored and searched, chosen by its size.

- flat: exact scan, as the service always did. Below a few thousand items a
  scan costs less than a graph walk and is exact, so small indexes stay flat.
- hnsw: a graph (IndexHNSWFlat); search cost grows with log(n) instead of n.
  FAISS cannot remove from it, so a replaced or moved item leaves a
  tombstone that an ID selector hides at search time; once tombstones make
  up `rebuild_fraction` of the graph, the owner rebuilds it from live vectors.
- ivfpq: inverted lists of product-quantised codes, for catalogues whose
  exact vectors no longer fit comfortably in memory; candidates are
  re-scored exactly (`refine_factor` times k of them), so the scores a caller
  sees are true inner products.

Thresholds (docs/performance.md, "Approximate index", bench/index.py):
measured on this project's 2-core machine with the pretrained encoder's item
vectors. GPU: flat and IVF-PQ are mirrored to the GPU for search when one is
present; FAISS has no GPU HNSW, so HNSW sub-indexes search on the CPU.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from recsys_core.data.paths import replacing

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
# Order of "bigger" kinds: a sub-index moves up as it grows, never down as it
# shrinks (a shrinking catalogue is rare, and flapping would rebuild often).
KIND_RANK = {"flat": 0, "hnsw": 1, "ivfpq": 2}
# 8-bit PQ trains 256 centroids per sub-vector; with fewer items than this
# it would train on almost nothing, so such a sub-index stays exact.
IVFPQ_MIN_ITEMS = 1024
PQ_BITS = 8
# The IVF coarse quantiser's list count: the usual ~4 sqrt(n), at least
# 39 training points per list (FAISS's own floor for k-means).
IVF_POINTS_PER_LIST = 39


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "auto"
    # auto: flat below this many items, HNSW from it. Measured (bench/index.py
    # --sizes, docs/performance.md): a flat scan's p50 is 0.66 ms at 10k items
    # and 1.26 ms at 20k, HNSW's 0.41 and 0.43 ms; at 20k the scan is still
    # about a millisecond, and the bundled catalogue's global index (19,563
    # items) stays exact and its replies unchanged.
    hnsw_min_items: int = 20_000
    # auto: IVF-PQ from this many items, where HNSW's exact vectors plus graph
    # (about 1.8 KB per 384-wide item at M=32) pass 3.5 GB.
    ivfpq_min_items: int = 2_000_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 32
    pq_m: int = 48
    # PQ's approximate order, not the lists probed, is what loses neighbours:
    # at 5M synthetic items recall@100 is 0.937 / 0.995 / 1.0 at refine 4 / 8 /
    # 16 whatever nprobe (32..256); 8 costs 0.5 ms at p50 over 4
    # (docs/performance.md, "IVF-PQ settings").
    refine_factor: int = 8
    ivf_train_items: int = 200_000
    rebuild_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.kind not in INDEX_KINDS:
            problems.append(f"index kind {self.kind!r} must be one of {', '.join(INDEX_KINDS)}")
        for name in ("hnsw_min_items", "ivfpq_min_items", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "ivf_nprobe", "pq_m", "refine_factor", "ivf_train_items"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not problems and self.ivfpq_min_items < self.hnsw_min_items:
            problems.append(f"ivfpq_min_items={self.ivfpq_min_items} is below hnsw_min_items={self.hnsw_min_items}")
        if not problems and self.hnsw_m < 2:
            problems.append(f"hnsw_m={self.hnsw_m} must be at least 2")
        if not 0 < self.rebuild_fraction <= 1:
            problems.append(f"rebuild_fraction={self.rebuild_fraction!r} must be in (0, 1]")
        if problems:
            raise ValueError("bad index settings: " + "; ".join(problems))

    def check_dimension(self, dimension: int) -> None:
        """Where IVF-PQ can be chosen, its sub-quantisers must split the width evenly."""
        if self.kind in ("auto", "ivfpq") and dimension % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide the vector width {dimension} "
                             f"(each PQ sub-quantiser codes an equal slice)")

    def kind_for(self, items: int, catalogue_items: int = 0) -> str:
        """The kind for a scope of `items` in a catalogue of `catalogue_items`.
        Memory is counted across scopes: each item sits in the scope over
        everything and in its category's, so HNSW scopes together hold every
        vector twice beside the exact copy. Once the catalogue passes
        ivfpq_min_items, every scope past hnsw_min_items is compressed, not
        only those that pass it alone (5M items in 8 categories: 16.9 GiB
        with HNSW categories, docs/performance.md)."""
        kind = self.kind
        if kind == "auto":
            if items < self.hnsw_min_items:
                kind = "flat"
            else:
                kind = "ivfpq" if max(items, catalogue_items) >= self.ivfpq_min_items else "hnsw"
        if kind == "ivfpq" and items < IVFPQ_MIN_ITEMS:
            return "flat"
        return kind


class _KeyedSubIndex:
    """A FAISS index keyed by the owner's rows that removes in place (flat,
    IVF), so it never needs a rebuild, mirrored to the GPU for search when
    one is given."""

    index: faiss.Index
    gpu_mirror = None

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        self.index.add_with_ids(vectors, rows)
        self.gpu_mirror = None

    def remove(self, rows: np.ndarray) -> None:
        self.index.remove_ids(rows)
        self.gpu_mirror = None

    def needs_rebuild(self) -> bool:
        return False

    def searchable(self, gpu_resources):
        if gpu_resources is None:
            return self.index
        if self.gpu_mirror is None:
            self.gpu_mirror = self._mirrored(faiss.index_cpu_to_gpu(gpu_resources, 0, self.index))
        return self.gpu_mirror

    def _mirrored(self, mirror):
        """The fresh GPU copy, with what the copy does not carry over set again."""
        return mirror


class FlatSubIndex(_KeyedSubIndex):
    """Exact: IndexIDMap2(IndexFlatIP) keyed by the owner's rows."""

    kind = "flat"

    def __init__(self, dimension: int):
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))

    def search(self, queries, k, excluded, vectors, gpu_resources):
        """Over-fetch by the excluded items that live here, then drop them."""
        fetch = min(len(self), k + len(excluded))
        if fetch == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.searchable(gpu_resources).search(queries, fetch)
        return [[(float(s), int(r)) for s, r in zip(scores[q], rows[q]) if r >= 0 and r not in excluded]
                for q in range(len(queries))]


class HnswSubIndex:
    """IndexHNSWFlat with its own positions (internal ids); `row_of` maps them
    to the owner's rows. A removed row's position is marked dead in a bitmap
    instead of removed, and its row may come back at a new position."""

    kind = "hnsw"

    def __init__(self, dimension: int, settings: IndexSettings):
        self.settings = settings
        self.index = faiss.IndexHNSWFlat(dimension, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = settings.hnsw_ef_construction
        self.row_of = np.zeros(0, dtype=np.int64)
        self.position_of: dict[int, int] = {}
        self.dead = np.zeros(0, dtype=np.uint8)  # bit per position, IDSelectorBitmap's layout
        self.dead_count = 0

    def __len__(self) -> int:
        return self.index.ntotal - self.dead_count

    def add(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        start = self.index.ntotal
        with single_thread():
            self.index.add(vectors)
        self.row_of = np.concatenate([self.row_of, rows])
        self.position_of.update(zip(rows.tolist(), range(start, start + len(rows))))
        grown = np.zeros((self.index.ntotal + 7) // 8, dtype=np.uint8)
        grown[: len(self.dead)] = self.dead
        self.dead = grown

    def remove(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            position = self.position_of.pop(row)
            self.dead[position >> 3] |= np.uint8(1 << (position & 7))
            self.dead_count += 1

    def needs_rebuild(self) -> bool:
        return self.dead_count > self.settings.rebuild_fraction * self.index.ntotal

    def search(self, queries, k, excluded, vectors, gpu_resources):
        want = min(k, len(self) - len(excluded))
        if want <= 0:
            return [[] for _ in range(len(queries))]
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.settings.hnsw_ef_search, want)
        # Selectors hold raw pointers: every piece stays referenced here until the search returns.
        keep = []
        if self.dead_count or excluded:
            positions = np.asarray([self.position_of[r] for r in excluded], dtype=np.int64)
            dead = faiss.IDSelectorBitmap(self.index.ntotal, faiss.swig_ptr(self.dead))
            skipped = faiss.IDSelectorBatch(len(positions), faiss.swig_ptr(positions))
            either = faiss.IDSelectorOr(dead, skipped)
            params.sel = faiss.IDSelectorNot(either)
            keep = [positions, dead, skipped, either]
        scores, positions = self.index.search(queries, want, params=params)
        del keep
        return [[(float(s), int(self.row_of[p])) for s, p in zip(scores[q], positions[q]) if p >= 0]
                for q in range(len(queries))]


class IvfPqSubIndex(_KeyedSubIndex):
    """IndexIVFPQ keyed by the owner's rows (IVF removes in place, so no
    tombstones), candidates re-scored against the exact vectors."""

    kind = "ivfpq"

    def __init__(self, dimension: int, settings: IndexSettings, training: np.ndarray):
        self.settings = settings
        nlist = max(1, min(int(4 * np.sqrt(len(training))), len(training) // IVF_POINTS_PER_LIST))
        self.quantizer = faiss.IndexFlatIP(dimension)
        self.index = faiss.IndexIVFPQ(self.quantizer, dimension, nlist, settings.pq_m, PQ_BITS,
                                      faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = settings.seed
        self.index.pq.cp.seed = settings.seed
        self.index.train(training)
        # Set once here, not per search: searches share the index under a read lock.
        self.index.nprobe = settings.ivf_nprobe

    def _mirrored(self, mirror):
        mirror.nprobe = self.settings.ivf_nprobe
        return mirror

    def search(self, queries, k, excluded, vectors, gpu_resources):
        fetch = min(len(self), (k + len(excluded)) * self.settings.refine_factor)
        if fetch == 0:
            return [[] for _ in range(len(queries))]
        _, rows = self.searchable(gpu_resources).search(queries, fetch)
        results = []
        for q in range(len(queries)):
            candidates = np.asarray([r for r in rows[q] if r >= 0 and r not in excluded], dtype=np.int64)
            exact = vectors[candidates] @ queries[q]
            order = np.argsort(-exact, kind="stable")
            results.append([(float(exact[i]), int(candidates[i])) for i in order])
        return results


def build(kind: str, dimension: int, settings: IndexSettings, vectors: np.ndarray, rows: np.ndarray,
          store_dir: Path | None = None, scope: str = ""):
    """A sub-index of `kind` over `vectors` (keyed by `rows`); an approximate
    one is read from `store_dir` when the same build was written there."""
    if kind == "flat":
        sub = FlatSubIndex(dimension)
        sub.add(vectors, rows)
        return sub
    path = None
    if store_dir is not None:
        path = stored_path(store_dir, kind, settings, vectors, rows, scope)
        if path.is_file():
            log.info("loading %s index of %d items (%s) from %s", kind, len(rows), scope or "all", path)
            return _load(kind, dimension, settings, path, rows)
    log.info("building %s index of %d items (%s)", kind, len(rows), scope or "all")
    if kind == "hnsw":
        sub = HnswSubIndex(dimension, settings)
    elif kind == "ivfpq":
        sample = np.random.default_rng(settings.seed).permutation(len(rows))[: settings.ivf_train_items]
        with single_thread():
            sub = IvfPqSubIndex(dimension, settings, vectors[np.sort(sample)])
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    sub.add(vectors, rows)
    if path is not None:
        _save(sub, path)
    return sub


def stored_path(store_dir: Path, kind: str, settings: IndexSettings, vectors: np.ndarray, rows: np.ndarray,
                scope: str) -> Path:
    # Keyed by everything that shapes the build; search-time knobs are left out.
    content = hashlib.blake2b(digest_size=12)
    shape = (settings.hnsw_m, settings.hnsw_ef_construction) if kind == "hnsw" else (
        settings.pq_m, settings.ivf_train_items, settings.seed)
    content.update(repr((kind, shape, faiss.__version__)).encode())
    content.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    # Hashed through the buffer, not .tobytes(): no second copy of the vectors.
    content.update(memoryview(np.ascontiguousarray(vectors, dtype=np.float32)).cast("B"))
    scope_key = hashlib.blake2b(scope.encode(), digest_size=4).hexdigest()
    return Path(store_dir) / f"{kind}-{scope_key}-{content.hexdigest()}.faiss"


def _save(sub, path: Path) -> None:
    try:
        with replacing(path) as tmp:
            faiss.write_index(sub.index, str(tmp))
        # An older build of the same scope is stale from now on.
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as error:  # a read-only cache costs the next start a rebuild, nothing more
        log.warning("could not store the index at %s: %s", path, error)


def _load(kind: str, dimension: int, settings: IndexSettings, path: Path, rows: np.ndarray):
    index = faiss.read_index(str(path))
    if kind == "hnsw":
        sub = HnswSubIndex(dimension, settings)
        sub.index = index
        sub.row_of = np.asarray(rows, dtype=np.int64).copy()
        sub.position_of = dict(zip(sub.row_of.tolist(), range(len(rows))))
        sub.dead = np.zeros((len(rows) + 7) // 8, dtype=np.uint8)
        return sub
    sub = IvfPqSubIndex.__new__(IvfPqSubIndex)
    sub.settings, sub.index, sub.quantizer = settings, index, None
    faiss.extract_index_ivf(index).nprobe = settings.ivf_nprobe
    return sub


class single_thread:
    """One OpenMP thread while building: FAISS inserts HNSW nodes in parallel
    in whatever order the threads reach them, so only a one-thread build gives
    the same graph (and the same results) for the same data every time."""

    def __enter__(self):
        self.threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.threads)

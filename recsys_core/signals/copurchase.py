"""Co-purchases: "shoppers who bought this also bought that", in any
category, which is what carries a shopper into a category they never bought in.

Item text alone cannot say that shoppers of a tent also buy sun cream: the
cross-category task (docs/results.md) measured text similarity below
popularity there. Other shoppers' baskets can. The count for a pair of items
(a, b) is the number of shoppers who have both; a shopper's score for b sums
it over the distinct items of their history. Pairs within a category count
too: a list over every category must not favour the categories a shopper has
never bought in only because their own category's pairs were left out. Kept
current as events arrive, like popularity; the profile service serves it and
the offline evaluation scores with this same class.
"""
from __future__ import annotations

import heapq
import sys
import threading
from array import array
from collections.abc import Collection, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

# New pairs kept in the delta before it is folded into the matrix. A fold
# rewrites the whole matrix (about 0.1 s and 60 MiB on the full data), the
# delta costs about 100 bytes a pair in Python dicts: 100 thousand pair
# counts bound the delta near 10 MiB and make a fold rare (a shopper's new
# item adds two counts per item they already have).
FOLD_AT = 100_000


class CoPurchases:
    """The item-item count matrix, precomputed: a request sums the rows of
    its history's items instead of walking every co-shopper's basket.

    Exact, not top-N per item: a reply is the sum over up to 100 history
    items, so truncating each row would change replies. On the full Amazon
    data the matrix has 10.5 million nonzero counts (both directions), at
    most 117: CSR with int32 columns and uint16 counts is 60 MiB, where the
    same pairs as Python dicts cost 521 MiB (docs/performance.md,
    "Co-purchases").

    Kept in three layers so an event costs O(items of its shopper), not a
    rebuild: the immutable CSR matrix, a delta of the counts added since (a
    dict per row, symmetric), and while a fold runs, the delta being folded.
    Every count is in exactly one layer at any time, and a read sums all
    three under the lock, so the next request sees a new pair. When the delta
    passes `fold_at` counts it is frozen and merged into a new matrix outside
    the lock (reads go on against the old matrix plus the frozen delta), and
    the new matrix replaces both under the lock.
    """

    def __init__(self, fold_at: int = FOLD_AT, fold_in_background: bool = True):
        self._lock = threading.Lock()
        self._fold_at = fold_at
        self._fold_in_background = fold_in_background
        self._folding = False
        self._row_of: dict[str, int] = {}  # item -> its row and column
        self._ids = np.empty(0, dtype=object)  # row -> item; grown by doubling
        self._codes = np.empty(0, dtype=np.int32)  # row -> category code; likewise
        self._size = 0
        self._category_names: list[str] = []
        self._category_code: dict[str, int] = {}
        # shopper -> rows of their distinct items: 4 bytes an item where a
        # dict of strings cost about 80.
        self._items_of: dict[str, array] = {}
        self._matrix = _empty_matrix(0)
        self._frozen: dict[int, dict[int, int]] = {}
        # Forgotten shoppers' pairs as -1s (remove_user): signed sparse
        # layers beside the delta, the second one while a fold merges it.
        self._removed: sp.csr_matrix | None = None
        self._frozen_removed: sp.csr_matrix | None = None
        self._delta: dict[int, dict[int, int]] = {}
        self._delta_counts = 0

    # -- writing -------------------------------------------------------------

    def add(self, user_id: str, item_id: str, category: str) -> None:
        with self._lock:
            new = self._add(user_id, item_id, category)
            if new is not None:
                owned, before, row = new
                self._count_pair(owned[:before], row)
            fold = self._should_fold()
        if fold:
            self._start_fold()

    def add_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(user_id, item_id, category) rows, e.g. a store's `user_items()`.
        Rows that would put more than `fold_at` counts into the delta (a
        profile service starting, an offline evaluation) are counted at once
        as a sparse product, faster than pair by pair; fewer go through the
        delta like `add`."""
        with self._lock:
            added = [pair for pair in (self._add(*row) for row in rows) if pair is not None]
            if 2 * sum(before for _, before, _ in added) > self._fold_at:
                self._recount()
            else:
                for owned, before, row in added:
                    self._count_pair(owned[:before], row)
            fold = self._should_fold()
        if fold:
            self._start_fold()

    def remove_user(self, user_id: str) -> int:
        """Takes the shopper's basket out of every count, as if they had
        never bought anything: a -1 for each pair of their items, in a
        sparse layer that the next fold merges. The pairs are made outside
        the lock (a shopper with 2,000 items has 4 million), so reads and
        adds wait only for a sparse addition. Returns how many distinct
        items they had."""
        while True:
            with self._lock:
                owned = self._items_of.get(user_id)
                if not owned:
                    return 0
                rows, size = np.array(owned, dtype=np.int32), self._size
            pairs = _basket_pairs(rows, size)
            with self._lock:
                owned = self._items_of.get(user_id)
                if owned is None or len(owned) != len(rows):
                    continue  # they bought something new meanwhile (baskets only grow): again
                del self._items_of[user_id]
                self._removed = _signed_sum(self._removed, pairs, self._size)
                self._delta_counts += pairs.nnz
                fold = self._should_fold()
            if fold:
                self._start_fold()
            return len(rows)

    def _add(self, user_id: str, item_id: str, category: str) -> tuple[array, int, int] | None:
        """Records the shopper's item; when the pair is new, (their items,
        how many they had before, its row) for the caller to count. Not a
        copy of the items before: a bulk load would hold one per event."""
        row = self._row_of.get(item_id)
        if row is None:
            row = self._new_item(sys.intern(item_id))
        owned = self._items_of.get(user_id)
        if owned is None:
            owned = self._items_of[sys.intern(user_id)] = array("i")
        elif row in owned:
            return None  # a shopper counts once per pair, however often they bought
        owned.append(row)
        self._codes[row] = self._code(category)
        return owned, len(owned) - 1, row

    def _new_item(self, item_id: str) -> int:
        row = self._size
        if row == len(self._ids):
            capacity = max(1024, 2 * row)
            # Readers hold references to the old arrays only under the lock.
            self._ids = np.concatenate([self._ids, np.empty(capacity - row, dtype=object)])
            self._codes = np.concatenate([self._codes, np.zeros(capacity - row, dtype=np.int32)])
        self._ids[row] = item_id
        self._row_of[item_id] = row
        self._size = row + 1
        return row

    def _code(self, category: str) -> int:
        code = self._category_code.get(category)
        if code is None:
            code = self._category_code[category] = len(self._category_names)
            self._category_names.append(category)
        return code

    def _count_pair(self, others: array, row: int) -> None:
        """One more shopper of `row` who has each of `others`: 2 * len(others)
        counts into the delta."""
        if not others:
            return
        delta = self._delta
        mine = delta.setdefault(row, {})
        for other in others:
            mine[other] = mine.get(other, 0) + 1
            theirs = delta.setdefault(other, {})
            theirs[row] = theirs.get(row, 0) + 1
        self._delta_counts += 2 * len(others)

    def _recount(self) -> None:
        """The matrix from every basket, as (shoppers x items)' (shoppers x
        items) less its diagonal; the delta is then in it and is dropped."""
        baskets = list(self._items_of.values())
        lengths = np.fromiter((len(b) for b in baskets), dtype=np.int64, count=len(baskets))
        columns = np.concatenate([np.frombuffer(b, dtype=np.int32) for b in baskets]) if baskets else \
            np.empty(0, dtype=np.int32)
        shoppers = np.repeat(np.arange(len(baskets), dtype=np.int32), lengths)
        has = sp.csr_matrix((np.ones(len(columns), dtype=np.int32), (shoppers, columns)),
                            shape=(len(baskets), self._size))
        counts = (has.T.tocsr() @ has).tocsr()
        counts.setdiag(0)
        counts.eliminate_zeros()
        self._matrix = _compact(counts)
        self._delta, self._frozen, self._delta_counts = {}, {}, 0
        self._removed = self._frozen_removed = None

    def _should_fold(self) -> bool:
        """Under the lock: freeze the delta when it is due and no fold runs."""
        if self._folding or self._delta_counts < self._fold_at:
            return False
        self._freeze()
        return True

    def _freeze(self) -> None:
        """Under the lock: the delta becomes the frozen counts a fold merges."""
        self._folding = True
        self._frozen, self._delta, self._delta_counts = self._delta, {}, 0
        self._frozen_removed = _signed_sum(self._frozen_removed, self._removed, self._size)
        self._removed = None

    def _start_fold(self) -> None:
        if self._fold_in_background:
            # Off the ingesting request's thread: its reply does not wait.
            threading.Thread(target=self._fold, name="co-purchase-fold", daemon=True).start()
        else:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            matrix, frozen, removed, size = self._matrix, self._frozen, self._frozen_removed, self._size
        # Both are left unchanged by everyone else until the swap below.
        try:
            merged = _merge(matrix, frozen, size)
            if removed is not None:
                merged = _merge_removed(merged, removed, size)
        except BaseException:
            with self._lock:
                self._folding = False  # the frozen counts stay read; the next add retries
            raise
        with self._lock:
            if self._matrix is matrix:
                self._matrix, self._frozen, self._frozen_removed = merged, {}, None
            # else a bulk load recounted everything meanwhile, the frozen
            # counts included, and cleared them: the merge is stale.
            self._folding = False
            fold = self._should_fold()
        if fold:
            self._start_fold()

    def fold(self) -> None:
        """Merge the delta into the matrix now (tests, benchmarks)."""
        with self._lock:
            if self._folding or not self._delta_counts:
                return
            self._freeze()
        self._fold()

    def footprint(self) -> dict[str, int]:
        """What the matrix holds and costs, for benchmarks and tests."""
        with self._lock:
            matrix = self._matrix
            return {"items": self._size, "shoppers": len(self._items_of), "nonzero": matrix.nnz,
                    "matrix_bytes": matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes,
                    "delta_entries": sum(len(row) for layer in (self._frozen, self._delta) for row in layer.values())
                    + sum(layer.nnz for layer in (self._frozen_removed, self._removed) if layer is not None),
                    "folding": self._folding}

    # -- reading -------------------------------------------------------------

    def category(self, item_id: str) -> str:
        row = self._row_of.get(item_id)
        return "" if row is None else self._category_names[self._codes[row]]

    def categories_of(self, item_ids: Sequence[str]) -> dict[str, str]:
        return {item_id: self.category(item_id) for item_id in item_ids}

    def related(self, history: Sequence[str], categories: Collection[str] = (), exclude: Collection[str] = (),
                leave_out_user: str | None = None) -> dict[str, int]:
        """Items bought beside the history's items, with the shoppers behind
        them summed over the distinct history items; only in `categories`
        when given. `leave_out_user`'s own baskets are not counted (the
        shopper asking, or the one an offline evaluation scores). The dict
        is in the items' row order; `most_shared` gives a reply's order."""
        ids, counts = self._related(history, categories, exclude, leave_out_user)
        return dict(zip(ids.tolist(), counts.tolist()))

    def most_shared(self, history: Sequence[str], k: int, categories: Collection[str] = (),
                    exclude: Collection[str] = (), leave_out_user: str | None = None) -> list[tuple[str, int]]:
        """The k (item_id, shoppers) pairs of `related(...)` with the most
        shoppers, ties by item id: exactly `sorted(related(...).items(),
        key=lambda p: (-p[1], p[0]))[:k]`. Thousands of items are related on
        the full data; the k-th largest count is found in numpy and only the
        items above it, and the ties at it, reach Python."""
        ids, counts = self._related(history, categories, exclude, leave_out_user)
        if len(counts) > k > 0:
            cutoff = int(np.partition(counts, len(counts) - k)[len(counts) - k])
            above = counts > cutoff
            ties = heapq.nsmallest(k - int(above.sum()), ids[counts == cutoff].tolist())
            ids, counts = ids[above], counts[above]
        else:
            ties, cutoff = [], 0
        ranked = sorted(zip(ids.tolist(), counts.tolist()), key=lambda pair: (-pair[1], pair[0]))
        return (ranked + [(item_id, cutoff) for item_id in ties])[:max(k, 0)]

    def _related(self, history: Sequence[str], categories: Collection[str], exclude: Collection[str],
                 leave_out_user: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, counts) of `related`, in row order.

        The sum of the history items' rows: the diagonal is not stored, so a
        history item gets the counts of the other history items only, which
        is what counting every co-shopper's basket gave."""
        with self._lock:
            row_of = self._row_of
            rows = np.fromiter(dict.fromkeys(r for r in map(row_of.get, history) if r is not None), dtype=np.int64)
            if not len(rows):
                return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
            size = self._size
            scores = _sum_rows(self._matrix, rows, size)
            for removed in (self._frozen_removed, self._removed):
                if removed is not None:
                    scores += _sum_rows(removed, rows, size)
            for layer in (self._frozen, self._delta):
                for row in rows.tolist():
                    counts = layer.get(row)
                    if counts:
                        scores[np.fromiter(counts, dtype=np.int64, count=len(counts))] += \
                            np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
            own = self._items_of.get(leave_out_user) if leave_out_user is not None else None
            if own:
                # Their baskets added 1 to (h, b) for every history item h and
                # other item b they have: m - [b in history] to each of their
                # items b, where m is how many history items they have.
                own_rows = np.array(own, dtype=np.int64)
                in_history = np.isin(own_rows, rows)
                scores[own_rows] -= int(in_history.sum()) - in_history
            excluded = [r for r in map(row_of.get, exclude) if r is not None]
            scores[excluded] = 0
            keep = scores > 0
            if categories:
                wanted = [self._category_code[c] for c in categories if c in self._category_code]
                keep &= np.isin(self._codes[:size], wanted)
            found = np.flatnonzero(keep)
            # Rows are only ever added: ids[found] is the same outside the lock.
            ids = self._ids
        return ids[found], scores[found]


def _empty_matrix(size: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.empty(0, dtype=np.uint16), np.empty(0, dtype=np.int32),
                          np.zeros(size + 1, dtype=np.int64)), shape=(size, size))


def _compact(counts: sp.csr_matrix) -> sp.csr_matrix:
    """int32 columns; uint16 counts while the largest fits (117 on the full
    data), else uint32. Rows may be unsorted: only sums are taken."""
    dtype = np.uint16 if not counts.nnz or counts.data.max() <= np.iinfo(np.uint16).max else np.uint32
    return sp.csr_matrix((counts.data.astype(dtype), counts.indices.astype(np.int32, copy=False),
                          counts.indptr.astype(np.int64, copy=False)), shape=counts.shape)


def _grown(matrix: sp.csr_matrix, size: int) -> sp.csr_matrix:
    """The matrix with empty rows and columns for items added since."""
    if matrix.shape[0] == size:
        return matrix
    indptr = np.concatenate([matrix.indptr, np.full(size - matrix.shape[0], matrix.indptr[-1])])
    return sp.csr_matrix((matrix.data, matrix.indices, indptr), shape=(size, size))


def _basket_pairs(rows: np.ndarray, size: int) -> sp.csr_matrix:
    """int32 [size, size]: -1 at (a, b) for every two different items a, b
    of one basket (`rows`, distinct): a shopper's share of the counts."""
    n = len(rows)
    pair_rows, pair_columns = np.repeat(rows, n), np.tile(rows, n)
    different = pair_rows != pair_columns
    return sp.csr_matrix((np.full(int(different.sum()), -1, dtype=np.int32),
                          (pair_rows[different], pair_columns[different])), shape=(size, size))


def _signed_sum(layer: sp.csr_matrix | None, more: sp.csr_matrix | None, size: int) -> sp.csr_matrix | None:
    """Two signed layers as one, grown to `size` (either may be None)."""
    if layer is None or more is None:
        return more if layer is None else layer
    return (_grown(layer, size) + _grown(more, size)).tocsr()


def _merge_removed(matrix: sp.csr_matrix, removed: sp.csr_matrix, size: int) -> sp.csr_matrix:
    """The matrix less forgotten shoppers' pairs (their -1s); pairs they
    alone had are gone."""
    merged = (_grown(matrix, size).astype(np.int32) + _grown(removed, size)).tocsr()
    merged.eliminate_zeros()
    return _compact(merged)


def _merge(matrix: sp.csr_matrix, delta: dict[int, dict[int, int]], size: int) -> sp.csr_matrix:
    rows = np.repeat(np.fromiter(delta, dtype=np.int64, count=len(delta)),
                     np.fromiter(map(len, delta.values()), dtype=np.int64, count=len(delta)))
    columns = np.fromiter((c for counts in delta.values() for c in counts), dtype=np.int32, count=len(rows))
    values = np.fromiter((n for counts in delta.values() for n in counts.values()), dtype=np.uint32,
                         count=len(rows))
    added = sp.csr_matrix((values, (rows, columns)), shape=(size, size))
    # uint32 so that a uint16 count cannot wrap; _compact narrows it again.
    return _compact(_grown(matrix, size).astype(np.uint32) + added)


def _sum_rows(matrix: sp.csr_matrix, rows: np.ndarray, size: int) -> np.ndarray:
    """int64 [size]: the sum of the matrix's `rows` (rows past its end, items
    newer than it, are empty)."""
    rows = rows[rows < matrix.shape[0]]
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    starts, ends = indptr[rows], indptr[rows + 1]
    if not len(rows) or not (ends - starts).any():
        return np.zeros(size, dtype=np.int64)
    columns = np.concatenate([indices[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
    counts = np.concatenate([data[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
    # Float weights hold these integer sums exactly (far below 2**53).
    return np.bincount(columns, weights=counts, minlength=size).astype(np.int64)

"""Item popularity, overall and per category, kept current as events arrive."""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Sequence


class Popularity:
    """Event counts per item and the items ranked by them, both kept
    current: every Recommend asks for the largest count (GetItemPopularity),
    and re-sorting the 44,801 items of the full data after each event cost
    about 40 ms on the next request. An event moves its item within the
    rankings (a binary search and a list shift) instead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._category: dict[str, str] = {}
        self._ranked: dict[str | None, list[str]] | None = None

    def add(self, item_id: str, category: str, events: int = 1) -> None:
        with self._lock:
            if self._ranked is not None:
                self._unrank(item_id)
            self._counts[item_id] += events
            self._category[item_id] = category
            if self._ranked is not None:
                self._rank(item_id)

    def remove(self, item_id: str, events: int) -> None:
        """Takes `events` off the item's count (a forgotten shopper's); an
        item left with none is gone, as if it never had any, and so is a
        category left without items."""
        with self._lock:
            if item_id not in self._counts:
                return
            if self._ranked is not None:
                self._unrank(item_id)
            left = self._counts[item_id] - events
            if left > 0:
                self._counts[item_id] = left
                if self._ranked is not None:
                    self._rank(item_id)
            else:
                del self._counts[item_id]
                del self._category[item_id]

    def add_many(self, rows: Iterable[tuple[str, str, int]]) -> None:
        # Many rows at once: one sort on the next read is cheaper than moving
        # each item.
        with self._lock:
            for item_id, category, events in rows:
                self._counts[item_id] += events
                self._category[item_id] = category
            self._ranked = None

    def _order(self, item_id: str) -> tuple[int, str]:
        # Ties break by item id so every replica answers alike.
        return -self._counts[item_id], item_id

    def _unrank(self, item_id: str) -> None:
        if item_id not in self._counts:
            return
        category = self._category[item_id]
        for key in (None, category):
            ranked = self._ranked[key]
            del ranked[bisect.bisect_left(ranked, self._order(item_id), key=self._order)]
        if not self._ranked[category]:
            del self._ranked[category]  # a category with no items is not one of categories()

    def _rank(self, item_id: str) -> None:
        for key in (None, self._category[item_id]):
            bisect.insort(self._ranked.setdefault(key, []), item_id, key=self._order)

    def counts(self, item_ids: Sequence[str]) -> list[int]:
        return [self._counts.get(i, 0) for i in item_ids]

    def counts_and_max(self, item_ids: Sequence[str]) -> tuple[list[int], int]:
        return self.counts(item_ids), self.max_count()

    def max_count(self) -> int:
        with self._lock:
            ranked = self._rankings()[None]
            return self._counts[ranked[0]] if ranked else 0

    def categories(self) -> set[str]:
        with self._lock:
            return set(self._rankings()) - {None}

    def _rankings(self) -> dict[str | None, list[str]]:
        """Under the lock: `add` moves items within these lists in place."""
        if self._ranked is None:
            ordered = sorted(self._counts, key=self._order)
            ranked: dict[str | None, list[str]] = {None: ordered}
            for item_id in ordered:
                ranked.setdefault(self._category[item_id], []).append(item_id)
            self._ranked = ranked
        return self._ranked

    def top(self, k: int, categories: Sequence[str] = (), exclude: Iterable[str] = ()) -> list[tuple[str, str, int]]:
        """The k most popular items as (item_id, category, events); with
        several categories, interleaved by popularity across them."""
        excluded = set(exclude)
        with self._lock:
            rankings = self._rankings()
            pools = [rankings.get(c, []) for c in categories] if categories else [rankings[None]]
            candidates = []
            for pool in pools:
                taken = 0
                for item_id in pool:
                    if taken == k:
                        break
                    if item_id not in excluded:
                        candidates.append(item_id)
                        taken += 1
            candidates.sort(key=self._order)
            return [(i, self._category[i], self._counts[i]) for i in candidates[:k]]

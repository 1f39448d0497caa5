"""Item popularity, overall and per category, kept current as events arrive."""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence


class Popularity:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._category: dict[str, str] = {}
        self._ranked: dict[str | None, list[str]] | None = None

    def add(self, item_id: str, category: str, events: int = 1) -> None:
        with self._lock:
            self._counts[item_id] += events
            self._category[item_id] = category
            self._ranked = None

    def add_many(self, rows: Iterable[tuple[str, str, int]]) -> None:
        with self._lock:
            for item_id, category, events in rows:
                self._counts[item_id] += events
                self._category[item_id] = category
            self._ranked = None

    def counts(self, item_ids: Sequence[str]) -> list[int]:
        return [self._counts.get(i, 0) for i in item_ids]

    def max_count(self) -> int:
        ranked = self._rankings()[None]
        return self._counts[ranked[0]] if ranked else 0

    def categories(self) -> set[str]:
        return set(self._rankings()) - {None}

    def _rankings(self) -> dict[str | None, list[str]]:
        with self._lock:
            if self._ranked is None:
                # Ties break by item id so every replica answers alike.
                ordered = sorted(self._counts, key=lambda i: (-self._counts[i], i))
                ranked: dict[str | None, list[str]] = {None: ordered}
                for item_id in ordered:
                    ranked.setdefault(self._category[item_id], []).append(item_id)
                self._ranked = ranked
            return self._ranked

    def top(self, k: int, categories: Sequence[str] = (), exclude: Iterable[str] = ()) -> list[tuple[str, str, int]]:
        """The k most popular items as (item_id, category, events); with
        several categories, interleaved by popularity across them."""
        rankings = self._rankings()
        excluded = set(exclude)
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
        candidates.sort(key=lambda i: (-self._counts[i], i))
        return [(i, self._category[i], self._counts[i]) for i in candidates[:k]]

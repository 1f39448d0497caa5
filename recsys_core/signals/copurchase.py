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
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from itertools import chain


class CoPurchases:
    """Each shopper's distinct items and each item's shoppers, no more: pairs
    are counted when asked. A table of pairs would answer faster but grows
    with the square of a basket: 10.5 million pairs and 521 MiB more in the
    profile service on the full Amazon data, against 59 MiB for these 716
    thousand shopper-item entries (docs/performance.md, "Co-purchases")."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items_of: dict[str, dict[str, None]] = {}  # shopper -> their items, in order
        self._shoppers_of: dict[str, list[str]] = {}  # item -> its shoppers
        self._category: dict[str, str] = {}

    def add(self, user_id: str, item_id: str, category: str) -> None:
        with self._lock:
            self._add(user_id, item_id, category)

    def add_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(user_id, item_id, category) rows, e.g. a store's `user_items()`."""
        with self._lock:
            for user_id, item_id, category in rows:
                self._add(user_id, item_id, category)

    def _add(self, user_id: str, item_id: str, category: str) -> None:
        user_id = sys.intern(user_id)
        owned = self._items_of.setdefault(user_id, {})
        if item_id in owned:
            return  # a shopper counts once per pair, however often they bought
        item_id = sys.intern(item_id)
        owned[item_id] = None
        self._shoppers_of.setdefault(item_id, []).append(user_id)
        self._category[item_id] = category

    def category(self, item_id: str) -> str:
        return self._category.get(item_id, "")

    def related(self, history: Sequence[str], categories: Collection[str] = (), exclude: Collection[str] = (),
                leave_out_user: str | None = None) -> dict[str, int]:
        """Items bought beside the history's items, with the shoppers behind
        them summed over the distinct history items; only in `categories`
        when given. `leave_out_user`'s own baskets are not counted (the
        shopper asking, or the one an offline evaluation scores)."""
        wanted = set(categories)
        excluded = set(exclude)
        scores: Counter[str] = Counter()
        with self._lock:
            for item_id in dict.fromkeys(history):
                shoppers = [shopper for shopper in self._shoppers_of.get(item_id, ()) if shopper != leave_out_user]
                # One Counter.update per history item, not per shopper: the
                # per-call overhead dominated on the full data (thousands of
                # shoppers per request); the elements and their order are the same.
                scores.update(chain.from_iterable(self._items_of[shopper] for shopper in shoppers))
                scores[item_id] -= len(shoppers)  # every one of them has the item itself
            # Thousands of related items against a few excluded ones: dropping
            # those first leaves the per-item filter one comparison when no
            # category is asked for (the same dict, in the same order).
            for item_id in excluded:
                scores.pop(item_id, None)
            if not wanted:
                return {item_id: count for item_id, count in scores.items() if count > 0}
            category = self._category
            return {item_id: count for item_id, count in scores.items() if count > 0 and category[item_id] in wanted}


def most_shared(related: dict[str, int], k: int) -> list[tuple[str, int]]:
    """The k (item_id, shoppers) pairs of `related` with the most shoppers,
    ties by item id: exactly `sorted(related.items(), key=lambda p: (-p[1],
    p[0]))[:k]`. `related` holds thousands of items on the full data and
    sorting them all with a Python key cost as much as counting them: only
    the k-th largest count is found first (C comparisons of ints), then the
    few items above it are sorted and the ties at it are picked by id."""
    if len(related) <= k:
        return sorted(related.items(), key=lambda pair: (-pair[1], pair[0]))
    cutoff = heapq.nlargest(k, related.values())[-1]
    above = sorted(((item_id, n) for item_id, n in related.items() if n > cutoff), key=lambda pair: (-pair[1], pair[0]))
    ties = heapq.nsmallest(k - len(above), (item_id for item_id, n in related.items() if n == cutoff))
    return above + [(item_id, cutoff) for item_id in ties]

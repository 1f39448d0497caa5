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

import threading
from collections import Counter
from collections.abc import Collection, Iterable, Sequence


class CoPurchases:
    def __init__(self):
        self._lock = threading.Lock()
        self._items_of: dict[str, dict[str, str]] = {}  # shopper -> item -> category
        self._pairs: dict[str, Counter[str]] = {}
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
        owned = self._items_of.setdefault(user_id, {})
        if item_id in owned:
            return  # a shopper counts once per pair, however often they bought
        self._category[item_id] = category
        partners = self._pairs.setdefault(item_id, Counter())
        for other in owned:
            partners[other] += 1
            self._pairs.setdefault(other, Counter())[item_id] += 1
        owned[item_id] = category

    def category(self, item_id: str) -> str:
        return self._category.get(item_id, "")

    def shoppers(self) -> int:
        return len(self._items_of)

    def related(self, history: Sequence[str], categories: Collection[str] = (), exclude: Collection[str] = (),
                leave_out_user: str | None = None) -> dict[str, int]:
        """Items bought beside the history's items, with the shoppers behind
        them summed over the distinct history items; only in `categories`
        when given. `leave_out_user` takes that shopper's own baskets out of
        the counts (an offline evaluation of them)."""
        wanted = set(categories)
        excluded = set(exclude)
        scores: Counter[str] = Counter()
        with self._lock:
            own = self._items_of.get(leave_out_user, {}) if leave_out_user is not None else {}
            for item_id in dict.fromkeys(history):
                partners = self._pairs.get(item_id)
                if not partners:
                    continue
                scores.update(partners)
                if item_id in own:
                    scores.subtract({other: 1 for other in own if other != item_id})
            category = self._category
            return {item_id: count for item_id, count in scores.items()
                    if count > 0 and item_id not in excluded and (not wanted or category[item_id] in wanted)}

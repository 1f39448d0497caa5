"""GetCoPurchasedItems' domain path (the co-purchases related to a history,
the k most shared) counted per request, as before, against the precomputed
item-item matrix (`CoPurchases.most_shared`), in the same run, on the same
shoppers, with the replies compared.

    python bench/copurchase.py [--data DIR] [--shoppers N] [--k K] [--json OUT]

A fixed sample of shoppers (seeded), the longest histories always in it;
each asks as the profile service asks: its first 100 distinct items, its
own items excluded, its own baskets left out, every fifth call restricted to
the category of its latest item. Build time and memory (tracemalloc: what
each structure holds after the build, and the peak during it) per structure.
"""
from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import random
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from recsys_core.signals.copurchase import CoPurchases  # noqa: E402

SEED = 20140101
HISTORY = 100  # services/profile/profiles.py CO_PURCHASE_HISTORY
LONGEST = 20  # the shoppers with the longest histories, always sampled


class PerRequestCoPurchases:
    """The algorithm before the matrix, kept whole as this benchmark's
    baseline and as the tests' oracle (tests/test_copurchase.py): each
    shopper's items and each item's shoppers, the pairs counted per request."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items_of: dict[str, dict[str, None]] = {}
        self._shoppers_of: dict[str, list[str]] = {}
        self._category: dict[str, str] = {}

    def add(self, user_id: str, item_id: str, category: str) -> None:
        with self._lock:
            self._add(user_id, item_id, category)

    def add_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        with self._lock:
            for user_id, item_id, category in rows:
                self._add(user_id, item_id, category)

    def _add(self, user_id: str, item_id: str, category: str) -> None:
        user_id = sys.intern(user_id)
        owned = self._items_of.setdefault(user_id, {})
        if item_id in owned:
            return
        item_id = sys.intern(item_id)
        owned[item_id] = None
        self._shoppers_of.setdefault(item_id, []).append(user_id)
        self._category[item_id] = category

    def category(self, item_id: str) -> str:
        return self._category.get(item_id, "")

    def related(self, history: Sequence[str], categories: Collection[str] = (), exclude: Collection[str] = (),
                leave_out_user: str | None = None) -> dict[str, int]:
        wanted = set(categories)
        excluded = set(exclude)
        scores: Counter[str] = Counter()
        with self._lock:
            for item_id in dict.fromkeys(history):
                shoppers = [shopper for shopper in self._shoppers_of.get(item_id, ()) if shopper != leave_out_user]
                scores.update(chain.from_iterable(self._items_of[shopper] for shopper in shoppers))
                scores[item_id] -= len(shoppers)
            for item_id in excluded:
                scores.pop(item_id, None)
            if not wanted:
                return {item_id: count for item_id, count in scores.items() if count > 0}
            category = self._category
            return {item_id: count for item_id, count in scores.items() if count > 0 and category[item_id] in wanted}

    def most_shared(self, history: Sequence[str], k: int, categories: Collection[str] = (),
                    exclude: Collection[str] = (), leave_out_user: str | None = None) -> list[tuple[str, int]]:
        related = self.related(history, categories, exclude, leave_out_user)
        if len(related) <= k:
            return sorted(related.items(), key=lambda pair: (-pair[1], pair[0]))
        cutoff = heapq.nlargest(k, related.values())[-1]
        above = sorted(((item_id, n) for item_id, n in related.items() if n > cutoff),
                       key=lambda pair: (-pair[1], pair[0]))
        ties = heapq.nsmallest(k - len(above), (item_id for item_id, n in related.items() if n == cutoff))
        return above + [(item_id, cutoff) for item_id in ties]


def load_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    """(user_id, item_id, category) once per shopper and item, in event
    order: what the profile service's store hands `add_many` at start."""
    from recsys_core.data.shopping import load_interactions

    events = load_interactions(data_dir)
    return list(dict.fromkeys(zip(events.user_id, events.item_id, events.category)))


def requests(rows: list[tuple[str, str, str]], shoppers: int, seed: int = SEED) -> list[dict]:
    items_of: dict[str, list[tuple[str, str]]] = {}
    for user_id, item_id, category in rows:
        items_of.setdefault(user_id, []).append((item_id, category))
    longest = sorted(items_of, key=lambda u: (-len(items_of[u]), u))[:LONGEST]
    rest = sorted(set(items_of) - set(longest))
    sample = longest + random.Random(seed).sample(rest, max(0, min(shoppers - len(longest), len(rest))))
    asked = []
    for n, user_id in enumerate(sample):
        seen = [item_id for item_id, _ in items_of[user_id]]
        asked.append({"history": seen[:HISTORY], "exclude": set(seen), "leave_out_user": user_id,
                      "categories": [items_of[user_id][-1][1]] if n % 5 == 4 else []})
    return asked


def build(cls, rows) -> tuple[object, float, int, int]:
    """The structure, build seconds, bytes it holds after, peak bytes
    during. Timed without tracemalloc, which slows Python allocation
    several-fold, then built again under it for the memory."""
    gc.collect()
    start = time.perf_counter()
    cls().add_many(rows)
    seconds = time.perf_counter() - start
    gc.collect()
    tracemalloc.start()
    index = cls()
    index.add_many(rows)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return index, seconds, held, peak


def answer(index, request: dict, k: int) -> list[tuple[str, int]]:
    return index.most_shared(request["history"], k, request["categories"], exclude=request["exclude"],
                             leave_out_user=request["leave_out_user"])


def time_calls(index, asked: list[dict], k: int) -> tuple[list[float], list]:
    for request in asked[:20]:
        answer(index, request, k)  # warm
    times, replies = [], []
    for request in asked:
        start = time.perf_counter()
        reply = answer(index, request, k)
        times.append((time.perf_counter() - start) * 1000)
        replies.append(reply)
    return times, replies


def summary(times: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "mean_ms": round(float(np.mean(times)), 3), "max_ms": round(float(np.max(times)), 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--shoppers", type=int, default=500)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    rows = load_rows(args.data)
    asked = requests(rows, args.shoppers)
    print(f"{len(rows):,} shopper-item rows; {len(asked)} shoppers asked, histories "
          f"{min(len(r['history']) for r in asked)}..{max(len(r['history']) for r in asked)} items (first {HISTORY})")
    report: dict = {"data": str(args.data.resolve()), "rows": len(rows), "shoppers": len(asked), "k": args.k,
                    "load_average_start": os.getloadavg()[0]}
    replies = {}
    for name, cls in (("per_request", PerRequestCoPurchases), ("matrix", CoPurchases)):
        index, seconds, held, peak = build(cls, rows)
        times, replies[name] = time_calls(index, asked, args.k)
        report[name] = {"build_s": round(seconds, 3), "held_mib": round(held / 2**20, 1),
                        "build_peak_mib": round(peak / 2**20, 1), **summary(times)}
        if isinstance(index, CoPurchases):
            report[name]["footprint"] = index.footprint()
        print(f"{name:12} build {seconds:6.2f} s, holds {held / 2**20:6.1f} MiB (peak {peak / 2**20:6.1f}); "
              f"per call p50 {report[name]['p50_ms']:.3f} ms, p99 {report[name]['p99_ms']:.3f}, "
              f"max {report[name]['max_ms']:.3f}")
        del index
    differ = sum(a != b for a, b in zip(replies["per_request"], replies["matrix"]))
    report["replies_differing"] = differ
    report["load_average_end"] = os.getloadavg()[0]
    print(f"replies equal: {len(asked) - differ} of {len(asked)}; load average "
          f"{report['load_average_start']:.2f} at the start, {report['load_average_end']:.2f} at the end")
    if "footprint" in report["matrix"]:
        print(f"matrix: {report['matrix']['footprint']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

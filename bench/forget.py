"""What forgetting a shopper costs: the store's forget_user (SQLite: one
transaction and a WAL checkpoint; Redis: the records read, the idempotency
keys walked with HSCAN, one script) and the co-purchase counts in memory
(CoPurchases.remove_user; the fold that merges its -1s runs in the
background as every fold does), per shopper.

    python bench/forget.py [--data DIR] [--shoppers N] [--keyed N] [--backend sqlite|redis|both|none] [--json OUT]

The data set is loaded into a fresh store of each backend (Redis: a local
redis-server with the durable settings the store requires), then `--keyed`
more events with idempotency keys are appended (a Redis forget walks every
key), then a fixed sample of shoppers (seeded; the longest histories always
in it) is forgotten one by one. Prints milliseconds per forget: median,
p90 and max, and the longest history's.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from recsys_core.data import paths, shopping  # noqa: E402
from recsys_core.signals.copurchase import CoPurchases  # noqa: E402
from recsys_core.store.events import PURCHASE, StoredEvent, benchmark_stored_events  # noqa: E402

SEED = 20140101


def sample_shoppers(events, n: int) -> list[str]:
    sizes = events.groupby("user_id").size().sort_values(ascending=False)
    longest = list(sizes.index[:3])
    rest = sorted(set(sizes.index) - set(longest))
    return longest + random.Random(SEED).sample(rest, min(max(n - 3, 0), len(rest)))


def summary(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2), "max_ms": round(ordered[-1], 2)}


def run_store(store, events, shoppers: list[str], keyed: int) -> dict:
    started = time.perf_counter()
    store.bulk_load(benchmark_stored_events(shopping.chronological(events)), total=len(events), marker="bench",
                    show_progress=False)
    load_s = time.perf_counter() - started
    items = events[["item_id", "category"]].drop_duplicates().itertuples(index=False)
    items = list(items)
    rng = random.Random(SEED)
    for start in range(0, keyed, 1000):
        batch = [StoredEvent(f"keyed-{rng.randrange(10_000)}", *rng.choice(items), PURCHASE, 1_600_000_000,
                             idempotency_key=f"bench-{start + i}") for i in range(min(1000, keyed - start))]
        store.append(batch)
    times, removed = [], []
    for user_id in shoppers:
        began = time.perf_counter()
        removed.append(store.forget_user(user_id))
        times.append(1000 * (time.perf_counter() - began))
    return {"load_s": round(load_s, 1), "events_removed": sum(removed), "longest_ms": round(times[0], 2),
            **summary(times)}


def run_co_purchases(events, shoppers: list[str]) -> dict:
    """As the profile service runs them: folds in the background, so a
    remove_user returns once its -1s are in their layer; the fold that
    merges them is any fold (docs/performance.md, "Co-purchases")."""
    counts = CoPurchases()
    counts.add_many(events[["user_id", "item_id", "category"]].drop_duplicates().itertuples(index=False))
    times = []
    for user_id in shoppers:
        began = time.perf_counter()
        counts.remove_user(user_id)
        times.append(1000 * (time.perf_counter() - began))
    return {"remove_user": {"longest_ms": round(times[0], 2), **summary(times)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=paths.BUNDLED_DATA_DIR)
    parser.add_argument("--shoppers", type=int, default=50)
    parser.add_argument("--keyed", type=int, default=100_000, help="events appended with idempotency keys")
    parser.add_argument("--backend", choices=("sqlite", "redis", "both", "none"), default="both",
                        help="none: the co-purchase counts only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    events = shopping.load_interactions(args.data)
    shoppers = sample_shoppers(events, args.shoppers)
    result = {"data": str(args.data), "events": len(events), "shoppers_forgotten": len(shoppers),
              "keyed_events": args.keyed}
    with tempfile.TemporaryDirectory(prefix="bench-forget-") as directory:
        if args.backend in ("sqlite", "both"):
            from recsys_core.store.sqlite_store import SQLiteEventStore

            store = SQLiteEventStore(Path(directory) / "events.sqlite3")
            result["sqlite"] = run_store(store, events, shoppers, args.keyed)
            store.close()
        if args.backend in ("redis", "both"):
            from recsys_core.store.local_redis import LocalRedis
            from recsys_core.store.redis_store import RedisEventStore

            with LocalRedis(Path(directory) / "redis") as server:
                store = RedisEventStore(server.url)
                result["redis"] = run_store(store, events, shoppers, args.keyed)
                store.close()
    result["co_purchases"] = run_co_purchases(events, shoppers)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

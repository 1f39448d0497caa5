"""The Redis event store with its counts in Redis (what stateless profile
replicas share), on one redis-server and on a 3-master Redis Cluster started
here: bulk-load time and memory, ingest throughput from several writers
(each its own store handle, as replicas are), and the latency of the reads
a profile replica makes per request, with the co-purchase replies checked
against the in-memory matrix on the same events.

    python bench/redis_profile.py [--data DIR] [--modes single,cluster] [--writers 4]
                                  [--seconds 10] [--shoppers 200] [--json OUT]

Needs redis-server (7.0 or later). Started in a temporary directory with the
store's durable settings (appendfsync always): the ingest figure is bounded
by the disk's fsync rate, as in production.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from recsys_core.data import paths, shopping  # noqa: E402
from recsys_core.signals.copurchase import CoPurchases  # noqa: E402
from recsys_core.store.events import VIEW, StoredEvent, benchmark_stored_events  # noqa: E402
from recsys_core.store.local_redis import LocalRedis, LocalRedisCluster  # noqa: E402
from recsys_core.store.redis_store import RedisEventStore  # noqa: E402

SEED = 20140101
HISTORY = 100  # services/profile/profiles.py CO_PURCHASE_HISTORY


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "mean_ms": round(1000 * statistics.fmean(ordered), 3)}


def used_memory(admin_urls: list[str]) -> int:
    import redis

    total = 0
    for url in admin_urls:
        client = redis.Redis.from_url(url)
        total += int(client.info("memory")["used_memory"])
        client.close()
    return total


def run(mode: str, data: Path, writers: int, seconds: float, shoppers: int) -> dict:
    events = shopping.chronological(shopping.load_interactions(data))
    rows = list(benchmark_stored_events(events))
    item_ids = sorted({r.item_id for r in rows})
    category_of = {r.item_id: r.category for r in rows}
    with tempfile.TemporaryDirectory() as directory:
        server = LocalRedis(directory) if mode == "single" else LocalRedisCluster(directory, masters=3)
        with server:
            admin_urls = [server.admin_url] if mode == "single" else [s.admin_url for s in server.servers]

            def open_store() -> RedisEventStore:
                return RedisEventStore(server.url, mode=mode)

            store = open_store()
            started = time.perf_counter()
            store.bulk_load(rows, total=len(rows), marker="bench", show_progress=False)
            load_s = time.perf_counter() - started
            memory = used_memory(admin_urls)

            # Reads, as a replica makes them per request.
            popularity, co_purchases = store.shared_signals()
            rng = random.Random(SEED)
            users = sorted({r.user_id for r in rows})
            sample = rng.sample(users, min(shoppers, len(users)))
            expected = CoPurchases(fold_in_background=False)
            expected.add_many((r.user_id, r.item_id, r.category) for r in rows)
            co_times, pop_times, counts_times, mismatches = [], [], [], 0
            for user in sample:
                seen = store.user_summary(user)[2][:HISTORY]
                t = time.perf_counter()
                got = co_purchases.most_shared(seen, 50, exclude=seen, leave_out_user=user)
                co_times.append(time.perf_counter() - t)
                mismatches += got != expected.most_shared(seen, 50, exclude=seen, leave_out_user=user)
                t = time.perf_counter()
                popularity.top(50, [category_of[seen[0]]] if seen else [], exclude=seen)
                pop_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                popularity.counts_and_max(rng.sample(item_ids, 200))
                counts_times.append(time.perf_counter() - t)

            # Ingest: `writers` handles, keyed batches of 10 events of new shoppers on known items.
            stores = [open_store() for _ in range(writers)]
            stop = threading.Event()
            stored = [0] * writers

            def write(w: int) -> None:
                local = random.Random(SEED + w)
                number = 0
                while not stop.is_set():
                    batch = [StoredEvent(f"bench-{w}-{local.randrange(500)}", item, category_of[item], VIEW,
                                         1_400_000_000, idempotency_key=f"{w}-{number}-{n}")
                             for n, item in enumerate(local.sample(item_ids, 10))]
                    stored[w] += sum(stores[w].append(batch))
                    number += 1

            threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            stop.set()
            for thread in threads:
                thread.join()
            for s in stores + [store]:
                s.close()
    return {
        "mode": mode, "events": len(rows), "shoppers": len(users), "items": len(item_ids),
        "bulk_load_s": round(load_s, 2), "bulk_load_events_per_s": round(len(rows) / load_s),
        "used_memory_mb": round(memory / 2**20, 1),
        "ingest_writers": writers, "ingest_events_per_s": round(sum(stored) / seconds),
        "co_purchases": percentiles(co_times), "co_purchase_mismatches": mismatches,
        "popular_top50": percentiles(pop_times), "item_popularity_200": percentiles(counts_times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=paths.BUNDLED_DATA_DIR)
    parser.add_argument("--modes", default="single,cluster")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shoppers", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = [run(mode, args.data, args.writers, args.seconds, args.shoppers) for mode in args.modes.split(",")]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if any(r["co_purchase_mismatches"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

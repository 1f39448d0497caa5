"""Concurrent UpsertItems through two embedding replicas on one catalogue store.

Writers, split over the replicas, upsert for a fixed time batches of items of
their own and items every writer shares (the same ids with different texts,
at once). The run passes when no call failed, and afterwards each replica
returns every item any call acknowledged, and both hold the same final state
of the shared ones (the store's). tests/test_catalogue_replicas.py runs it
for a few seconds per backend; from the repository root, the 30 s run:

    PYTHONPATH=$PWD .venv/bin/python loadtest/upsert_race.py --backend sqlite --seconds 30
    PYTHONPATH=$PWD .venv/bin/python loadtest/upsert_race.py --backend redis --seconds 30
    PYTHONPATH=$PWD .venv/bin/python loadtest/upsert_race.py --backend redis-cluster --seconds 30

It starts the two replicas itself (in this process, real gRPC servers with
mTLS, on a tiny catalogue cut from the bundled data, the ONNX encoder) and a
redis-server for `--backend redis`; docs/operations.md, "Catalogue store",
has the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SHARED_ITEMS = 3  # ids every writer upserts, to make writes of one item collide


@dataclass
class RaceResult:
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    shared: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else 0.0

        return {"calls": self.calls, "errors": len(self.errors), "acknowledged_items": len(self.acknowledged),
                "seconds": round(self.seconds, 1), "calls_per_second": round(self.calls / max(self.seconds, 1e-9), 1),
                "p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "first_errors": self.errors[:3]}


def race(channels: list[grpc.Channel], writers: int = 8, seconds: float = 30.0,
         call_timeout: float = 30.0) -> RaceResult:
    """`writers` threads, writer w calling through channels[w % len(channels)],
    each upserting [shared item, own new item] until `seconds` are up."""
    from recsys.common.v1 import common_pb2
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    result = RaceResult(shared=[f"race-shared-{n}" for n in range(SHARED_ITEMS)])
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    start = threading.Barrier(writers)

    def write(writer: int) -> None:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channels[writer % len(channels)])
        start.wait()
        n = 0
        while time.monotonic() < stop_at:
            shared = result.shared[n % SHARED_ITEMS]
            own = f"race-w{writer}-{n}"
            items = [
                common_pb2.Item(item_id=shared, category=("RaceA", "RaceB")[writer % 2],
                                title=f"Shared gadget {shared}", text=f"Shared gadget, version {writer}.{n}"),
                common_pb2.Item(item_id=own, category=f"Race{writer % 3}", title=f"Gadget {own}",
                                text=f"Gadget number {n} from writer {writer}"),
            ]
            began = time.monotonic()
            try:
                stub.UpsertItems(embedding_pb2.UpsertItemsRequest(items=items), timeout=call_timeout)
            except grpc.RpcError as error:
                with lock:
                    result.calls += 1
                    result.errors.append(f"{error.code().name}: {error.details()}")
            else:
                with lock:
                    result.calls += 1
                    result.latencies.append(time.monotonic() - began)
                    result.acknowledged.update((shared, own))
            n += 1

    threads = [threading.Thread(target=write, args=(w,), name=f"writer-{w}") for w in range(writers)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - began
    return result


def missing(channel: grpc.Channel, item_ids) -> list[str]:
    """The ids a replica does not return."""
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    wanted = sorted(item_ids)
    reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).GetItems(
        embedding_pb2.GetItemsRequest(item_ids=wanted, skip_missing=True), timeout=30)
    return sorted(set(wanted) - {entry.item.item_id for entry in reply.items})


def states(channel: grpc.Channel, item_ids) -> dict[str, tuple]:
    """What a replica holds for `item_ids`: text, category and embedding."""
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).GetItems(
        embedding_pb2.GetItemsRequest(item_ids=sorted(item_ids), include_embeddings=True), timeout=30)
    return {e.item.item_id: (e.item.text, e.item.category, e.embedding.float32_le)
            for e in reply.items}


def settled(channels: list[grpc.Channel], result: RaceResult, within: float = 5.0) -> list[str]:
    """Problems left once the replicas had `within` seconds to apply the last
    writes: acknowledged items missing, or replicas disagreeing on shared ones."""
    give_up = time.monotonic() + within
    while True:
        problems = []
        for position, channel in enumerate(channels):
            lost = missing(channel, result.acknowledged)
            if lost:
                problems.append(f"replica {position} lacks {len(lost)} acknowledged items, e.g. {lost[:5]}")
        if not problems and len(channels) > 1:
            shared = [i for i in result.shared if i in result.acknowledged]
            first = states(channels[0], shared)
            for position, channel in enumerate(channels[1:], 1):
                if states(channel, shared) != first:
                    problems.append(f"replica {position} holds other states of the shared items than replica 0")
        if not problems or time.monotonic() > give_up:
            return problems
        time.sleep(0.1)


def propagation(channels: list[grpc.Channel], samples: int = 20, limit: float = 5.0) -> list[float]:
    """Seconds from an UpsertItems acknowledged by channels[0] until
    channels[1] returns the item (GetItems polled every 5 ms), per sample."""
    from recsys.common.v1 import common_pb2
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    writer, reader = (embedding_pb2_grpc.EmbeddingServiceStub(c) for c in channels[:2])
    seconds = []
    for n in range(samples):
        item_id = f"propagation-{time.time_ns()}-{n}"
        writer.UpsertItems(embedding_pb2.UpsertItemsRequest(items=[common_pb2.Item(
            item_id=item_id, category="Propagation", title="Probe", text=f"Propagation probe {n}")]), timeout=30)
        acknowledged = time.monotonic()
        while time.monotonic() - acknowledged < limit:
            reply = reader.GetItems(embedding_pb2.GetItemsRequest(item_ids=[item_id], skip_missing=True), timeout=10)
            if reply.items:
                break
            time.sleep(0.005)
        seconds.append(time.monotonic() - acknowledged)
    return seconds


def tiny_data_dir(directory: Path, items: int = 40) -> Path:
    """The first `items` bundled items, as a data directory the embedding service seeds from."""
    import pandas as pd

    from recsys_core.data import paths, shopping

    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(paths.BUNDLED_DATA_DIR / shopping.ITEMS_FILE, dtype=str, keep_default_na=False)
    frame.head(items).to_csv(directory / shopping.ITEMS_FILE, index=False)
    return directory


def replica_config(backend: str, store: str, data_dir: Path, cache_dir: Path, **security):
    """An embedding replica on the shared store: `store` is the SQLite file or
    the Redis URL (with the embedding ACL user), the prefix Redis keys go
    under. Backend "redis-cluster": that URL is a Redis Cluster node's."""
    from services.embedding.config import EmbeddingConfig

    catalogue = ({"catalogue_path": store} if backend == "sqlite" else
                 {"catalogue_store": "redis", "catalogue_redis_url": store.split(" ")[0],
                  "catalogue_redis_prefix": store.split(" ")[1],
                  "catalogue_redis_mode": "cluster" if backend == "redis-cluster" else "single"})
    return EmbeddingConfig(address="127.0.0.1:0", encoder="onnx", data_dir=str(data_dir), retail_dir="",
                           cache_dir=str(cache_dir), use_gpu=False, **catalogue, **security)


def start_replica(config):
    """A started, SERVING replica and its address."""
    from services.embedding.server import create_server

    server, port = create_server(config)
    server.start()
    # A load that fails ends the wait at once (a broken store is an error, not 10 minutes).
    give_up = time.monotonic() + 600
    while not server.readiness.ready.wait(0.1):
        if server.readiness.failed.is_set() or time.monotonic() > give_up:
            server.stop(None)
            raise RuntimeError(f"embedding replica not ready: {server.readiness.error}")
    return server, f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "redis", "redis-cluster"), default="sqlite",
                        help="redis-cluster: a Redis Cluster of 3 masters started for the run")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--data", type=Path, default=None,
                        help="a data directory to seed the catalogue from (e.g. data, the bundled set: "
                             "upserts into a catalogue of realistic size); default 40 bundled items")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the vector cache (default: a fresh one; recsys_core.data.paths.cache_dir() "
                             "spares encoding a --data set again)")
    args = parser.parse_args(argv)

    from recsys_cli.certs import LocalSecurity
    from recsys_core.store.local_redis import LocalRedis, LocalRedisCluster

    work = Path(tempfile.mkdtemp(prefix="upsert-race-"))
    material = LocalSecurity.ensure(work / "tls")
    security = {"security": material.security("embedding"), "auth": material.auth()}
    token = material.token("upsert-race", ["admin"], seconds=3600)
    redis_server = None
    if args.backend.startswith("redis"):
        redis_server = (LocalRedis(work / "redis") if args.backend == "redis" else
                        LocalRedisCluster(work / "redis-cluster", masters=3)).start()
        store = f"{redis_server.catalogue_url} recsys:catalogue:"
    else:
        store = str(work / "catalogue.sqlite3")
    data_dir = args.data or tiny_data_dir(work / "data")
    cache_dir = args.cache_dir or work / "cache"
    began = time.monotonic()
    replicas = [start_replica(replica_config(args.backend, store, data_dir, cache_dir, **security))]
    first_start = time.monotonic() - began
    began = time.monotonic()
    replicas.append(start_replica(replica_config(args.backend, store, data_dir, cache_dir, **security)))
    second_start = time.monotonic() - began
    channels = [material.security("admin").channel(address, "embedding", token=token) for _, address in replicas]
    try:
        result = race(channels, writers=args.writers, seconds=args.seconds)
        problems = settled(channels, result)
        delays = sorted(propagation(channels))
        print(json.dumps({"backend": args.backend, "writers": args.writers, "data": str(args.data or "40 items"),
                          "first_replica_start_s": round(first_start, 1),
                          "second_replica_start_s": round(second_start, 1), **result.summary(),
                          "propagation_ms": {"p50": round(delays[len(delays) // 2] * 1000),
                                             "max": round(delays[-1] * 1000)},
                          "problems": problems}, indent=2))
        return 0 if not result.errors and not problems else 1
    finally:
        for channel in channels:
            channel.close()
        for server, _ in replicas:
            server.stop(None)
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())

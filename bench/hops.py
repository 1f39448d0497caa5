"""Calls and bytes per Recommend: what the gateway sends downstream.

    python bench/hops.py [--data DIR] [--per-kind N] [--json OUT]

Starts the local stack (recsys_cli.stack.LocalStack: Triton, the four
services as processes) with the gateway's three downstream addresses
pointed at counting proxies in this process. A proxy forwards each call's
bytes unchanged and records its method, request and reply sizes (the
serialized protobuf messages, without HTTP/2 framing or headers) and when
it started and ended. Recommend requests then go out one at a time, by
kind, and the script prints per kind the mean calls, sequential levels and
bytes per Recommend, and per method the calls and bytes.

Levels are measured: a call is one level deeper than the deepest call that
had ended before it started; the deepest level is the Recommend's chain of
round trips.

Whichever tree comes first on PYTHONPATH is measured, so the same script
compares commits: `PYTHONPATH=../old-tree python bench/hops.py` runs the
old tree's services (this script only needs recsys_cli.stack, the
generated stubs and bench/recommend.py's request mix, all present at
f8ba209).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc

# After PYTHONPATH, so that another tree given there is the one measured.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT))
sys.path.append(str(REPO_ROOT / "bench"))

SEED = 20140101
DOWNSTREAM = ("profile", "embedding", "ranking")


def _identity(payload: bytes) -> bytes:
    return payload


class CountingProxy:
    """A gRPC server forwarding every unary call to `upstream`, recording it."""

    def __init__(self, name: str, record: list, lock: threading.Lock):
        from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS

        self.name, self.record, self.lock = name, record, lock
        self.upstream: grpc.Channel | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=CHANNEL_OPTIONS)
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def connect(self, address: str) -> None:
        from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS

        self.upstream = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def service(self, details):  # grpc.GenericRpcHandler
        method = details.method

        def forward(request: bytes, context) -> bytes:
            if self.upstream is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "proxy not connected yet")
            started = time.perf_counter()
            call = self.upstream.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
            code, reply = "OK", b""
            try:
                # The caller's identity travels in metadata on a plaintext stack.
                metadata = [(k, v) for k, v in context.invocation_metadata() if not k.startswith("grpc-")]
                reply = call(request, timeout=context.time_remaining(), metadata=metadata)
            except grpc.RpcError as error:
                code = error.code().name
                context.abort(error.code(), error.details() or "")
            finally:
                with self.lock:
                    self.record.append({"method": method, "request": len(request), "reply": len(reply),
                                        "start": started, "end": time.perf_counter(), "code": code})
            return reply

        return grpc.unary_unary_rpc_method_handler(forward, request_deserializer=_identity,
                                                   response_serializer=_identity)

    def stop(self) -> None:
        self.server.stop(None)
        if self.upstream is not None:
            self.upstream.close()


def levels(calls: list[dict]) -> int:
    depth: list[int] = []
    for call in calls:
        before = [d for other, d in zip(calls, depth) if other["end"] <= call["start"]]
        depth.append(1 + max(before, default=0))
    return max(depth, default=0)


def request_kinds(interactions, per_kind: int, rng: random.Random) -> dict[str, list]:
    from recommend import make_requests

    from recsys.gateway.v1 import gateway_pb2

    shoppers = sorted(interactions["user_id"].unique())
    categories = sorted(interactions["category"].dropna().unique())
    items = interactions["item_id"].unique()
    picked = rng.sample(shoppers, per_kind)
    return {
        "personalised": [gateway_pb2.RecommendRequest(user_id=u, k=10) for u in picked],
        "one category": [gateway_pb2.RecommendRequest(user_id=u, k=10, categories=[rng.choice(categories)])
                         for u in picked],
        "context item": [gateway_pb2.RecommendRequest(user_id=u, k=10, context_item_ids=[rng.choice(items)])
                         for u in picked],
        "spread, 2 explore": [gateway_pb2.RecommendRequest(user_id=u, k=10, spread_interests=True, explore_slots=2)
                              for u in picked],
        "cold start": [gateway_pb2.RecommendRequest(user_id=f"NOBODY-{n}", k=10) for n in range(per_kind)],
        "bench/recommend.py mix": make_requests(interactions, per_kind * 4, rng),
    }


def wait_for_popular_cache(metrics_address: str, seconds: float = 60.0) -> None:
    """Until the gateway holds its popular items: a gateway that started
    before profile was ready fills them in the background (GetPopularItems
    and GetItems), and those calls must not be counted as a Recommend's."""
    import urllib.request

    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("recsys_gateway_popular_items_cached ") and float(line.split()[1]) > 0:
                    return
        time.sleep(0.2)
    raise SystemExit(f"the gateway held no popular items after {seconds:.0f} s")


def measure(gateway, requests, record: list, lock: threading.Lock) -> dict:
    per_call = []
    methods: dict[str, dict] = defaultdict(lambda: {"calls": 0, "request": 0, "reply": 0})
    paths = defaultdict(int)
    for request in requests:
        gateway.Recommend(request, timeout=30)  # warm: the profile and category caches filled
        with lock:
            record.clear()
        reply = gateway.Recommend(request, timeout=30)
        time.sleep(0.01)  # a proxy records a call just after it answered
        with lock:
            calls = sorted(record, key=lambda c: c["start"])
            record.clear()
        calls = [c for c in calls if not c["method"].startswith("/grpc.")]
        paths[reply.path] += 1
        per_call.append({"calls": len(calls), "levels": levels(calls),
                         "request": sum(c["request"] for c in calls), "reply": sum(c["reply"] for c in calls)})
        for call in calls:
            entry = methods[call["method"].rsplit("/", 1)[1]]
            entry["calls"] += 1
            entry["request"] += call["request"]
            entry["reply"] += call["reply"]
    count = len(per_call)
    return {
        "recommends": count,
        "paths": dict(paths),
        "calls": statistics.mean(p["calls"] for p in per_call),
        "levels": statistics.mean(p["levels"] for p in per_call),
        "levels_max": max(p["levels"] for p in per_call),
        "request_bytes": statistics.mean(p["request"] for p in per_call),
        "reply_bytes": statistics.mean(p["reply"] for p in per_call),
        "methods": {name: {key: value / count for key, value in entry.items()} for name, entry in methods.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from recsys_core.data import paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR), help="data set directory (default: bundled)")
    parser.add_argument("--per-kind", type=int, default=30, help="Recommends per kind of request (default 30)")
    parser.add_argument("--encoder", choices=("triton", "onnx"), default="triton")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import tempfile

    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys_cli.stack import LocalStack, free_port
    from recsys_core.data.shopping import load_interactions

    tree = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    print(f"measuring the tree at {paths.REPO_ROOT} ({tree}{', with changes' if dirty else ''})", flush=True)
    data_dir = Path(args.data).expanduser().resolve()
    interactions = load_interactions(data_dir)
    kinds = request_kinds(interactions, args.per_kind, random.Random(SEED))

    record: list[dict] = []
    lock = threading.Lock()
    proxies = {name: CountingProxy(name, record, lock) for name in DOWNSTREAM}

    class ProxiedStack(LocalStack):
        def environment(self):
            env = super().environment()
            for name, proxy in proxies.items():
                proxy.connect(self.addresses[name])
                env[f"GATEWAY_{name.upper()}_ADDRESS"] = f"127.0.0.1:{proxy.port}"
            return env

    state = tempfile.TemporaryDirectory(prefix="recsys-hops-")
    # Plaintext: a counting proxy in the middle cannot hold the services'
    # certificates; message sizes are the same either way.
    stack = ProxiedStack(data_dir=data_dir, gateway_port=free_port(), state_dir=Path(state.name),
                         encoder=args.encoder, transport="plaintext")
    results = {}
    try:
        print(f"starting the stack on {data_dir} ...", flush=True)
        stack.start()
        wait_for_popular_cache(stack.addresses["gateway-metrics"])
        with stack.channel("gateway") as channel:
            gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
            for kind, requests in kinds.items():
                results[kind] = measure(gateway, requests, record, lock)
    finally:
        stack.stop()
        for proxy in proxies.values():
            proxy.stop()
        state.cleanup()

    print(f"\n| request | Recommends | calls | levels (max) | request bytes | reply bytes | total bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {kind} | {r['recommends']} | {r['calls']:.2f} | {r['levels']:.2f} ({r['levels_max']}) | "
              f"{r['request_bytes']:,.0f} | {r['reply_bytes']:,.0f} | {r['request_bytes'] + r['reply_bytes']:,.0f} |")
    for kind, r in results.items():
        print(f"\n{kind}: per Recommend, by method")
        for name, m in sorted(r["methods"].items(), key=lambda item: -item[1]["reply"]):
            print(f"  {name:22s} {m['calls']:5.2f} calls  {m['request']:>10,.0f} B out  {m['reply']:>10,.0f} B back")
    if args.json:
        Path(args.json).write_text(json.dumps({"tree": tree, "data": str(data_dir), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recommend latency, throughput and memory of the whole local stack, against
a bare Python gRPC echo server as the ceiling.

    python bench/recommend.py [--data DIR] [--requests N] [--concurrency 1,4,16]
                              [--seconds S] [--json OUT] [--idle-streams N]
                              [--transport mtls|plaintext] [--edge]
                              [--ranking-model MODEL]

All four services run as real processes (recsys_cli.stack.LocalStack),
with the local Triton server when the stack's encoder runs there, on a free
gateway port and with their state in a temporary directory. The echo
server runs in its own process too (this script with --echo-server PORT), so
neither side shares the benchmark client's GIL.

With --idle-streams N, each level also measures Recommend while N idle
health Watch streams are open on the gateway (held by another process of
this script, --hold-watches), and once more after they closed: quiet, with
streams, quiet again, back to back in the same run.

With --ranking-model MODEL the ranking service scores with that LightGBM
model (`recsys train-ranker`, RANKING_MODEL) instead of the hand-set
weights: run once without and once with it, on the same quiet machine, and
compare the p99s (docs/performance.md, "Learned ranker").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from loadloop import CALL_TIMEOUT_SECONDS, closed_loop, round_or_none  # noqa: E402

ECHO_SERVICE = "bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
SEED = 20140101
WARMUP_REQUESTS = 20
CATEGORY_SHARE = 0.20
COLD_START_SHARE = 0.10
K = 10
MEMORY_TARGET_MIB = 2048


def _identity(payload: bytes) -> bytes:
    return payload


# --------------------------------------------------------------------- echo server


def serve_echo(port: int, workers: int) -> int:
    """The ceiling: what a bare grpc.server with the gateway's worker count
    answers when the handler does nothing but return the request bytes."""
    from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="echo"),
        options=CHANNEL_OPTIONS,
        maximum_concurrent_rpcs=workers * 16,  # as build_server does for every service
    )
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, _context: request, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        print(f"echo server: could not bind 127.0.0.1:{port}", file=sys.stderr)
        return 1
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    # Bounded by the parent: if the benchmark dies without stopping us, so do we.
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
    server.stop(0).wait(5)
    return 0


STREAMS_PER_CONNECTION = 100


def hold_watches(address: str, count: int, ca: str = "") -> int:
    """Opens `count` health Watch streams on `address`, reads each one's first
    status (so each is open on the server), says so on stdout, and holds them
    until stdin closes (the benchmark is done with them, or died)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recsys_core.rpc.transport import client_channel

    # The gateway's TLS port (checked against `ca`), or plaintext without one;
    # a connection of its own per STREAMS_PER_CONNECTION streams, since the
    # gateway lets one connection open at most GATEWAY_MAX_CONCURRENT_STREAMS.
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [client_channel(address, ca=ca, server_name="gateway", options=own) if ca
                else grpc.insecure_channel(address, options=own)
                for _ in range(-(-count // STREAMS_PER_CONNECTION))]
    with contextlib.ExitStack() as closing:
        for channel in channels:
            closing.enter_context(channel)
        # The deadline bounds a holder whose parent vanished without closing stdin.
        streams = [health_pb2_grpc.HealthStub(channels[n // STREAMS_PER_CONNECTION]).Watch(
            health_pb2.HealthCheckRequest(), timeout=3600) for n in range(count)]
        for stream in streams:
            next(stream)
        print(f"open {count}", flush=True)
        sys.stdin.read()
        for stream in streams:
            stream.cancel()
    return 0


class IdleStreams:
    """N idle Watch streams on the gateway, held by a process of their own."""

    def __init__(self, address: str, count: int, ca: str = ""):
        self.address, self.count, self.ca = address, count, ca
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--hold-watches", self.address, str(self.count), self.ca],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline().strip()
        if line != f"open {self.count}":
            self.__exit__(None, None, None)
            raise RuntimeError(f"could not open {self.count} Watch streams on {self.address} (holder said {line!r})")
        return self

    def __exit__(self, *exc):
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EchoProcess:
    def __init__(self, workers: int):
        from recsys_cli.stack import free_port

        self.workers = workers
        self.address = f"127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        port = self.address.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--echo-server", port, "--workers", str(self.workers)],
            cwd=REPO_ROOT,
        )
        give_up = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            echo = channel.unary_unary(ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the echo server exited with code {self.process.returncode} while starting")
                try:
                    if echo(b"ping", timeout=1.0) == b"ping":
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > give_up:
                    raise TimeoutError(f"the echo server at {self.address} did not answer within {timeout:.0f}s")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------- requests


def make_requests(interactions, count: int, rng: random.Random) -> list:
    """Realistic varied Recommend requests: real shoppers of the data set,
    k=10, ~20% restricted to one random category, ~10% unknown shoppers."""
    from recsys.gateway.v1 import gateway_pb2

    shoppers = sorted(interactions["user_id"].unique())
    known = set(shoppers)
    categories = sorted(interactions["category"].dropna().unique())
    alphabet = string.ascii_uppercase + string.digits
    requests = []
    for _ in range(count):
        if rng.random() < COLD_START_SHARE:
            user_id = "A" + "".join(rng.choices(alphabet, k=13))  # the data set's id shape
            while user_id in known:
                user_id = "A" + "".join(rng.choices(alphabet, k=13))
        else:
            user_id = rng.choice(shoppers)
        wanted = [rng.choice(categories)] if rng.random() < CATEGORY_SHARE else []
        requests.append(gateway_pb2.RecommendRequest(user_id=user_id, k=K, categories=wanted))
    return requests


# --------------------------------------------------------------------- the loop


# --------------------------------------------------------------------- start-up progress


class StartupProgress:
    """Prints which services are up while LocalStack.start() waits for them in turn."""

    LABELS = {"SERVING": "ready", "NOT_SERVING": "loading"}

    def __init__(self, stack):
        self.stack = stack
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="startup-progress", daemon=True)
        self.started = time.monotonic()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(5)

    def status(self, channels: dict, name: str) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if name == "triton":
            # LocalStack sets .triton once the server has its models ready.
            triton = getattr(self.stack, "triton", None)
            if triton is None:
                return "starting"
            return "ready" if triton.is_running() else "exited"
        address = self.stack.addresses.get(name)
        if address is None:
            return "starting"
        process = self.stack.processes.get(name)
        if process is not None and process.poll() is not None:
            return f"exited({process.returncode})"
        if name not in channels:
            channels[name] = self.stack.channel(name, token=None)
        try:
            reply = health_pb2_grpc.HealthStub(channels[name]).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return "starting"
        return self.LABELS.get(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), "starting")

    def run(self) -> None:
        from recsys_cli.stack import SERVICES

        names = (["triton"] if getattr(self.stack, "encoder", "onnx") == "triton" else []) + list(SERVICES)
        channels: dict = {}
        last_line, last_print = None, 0.0
        try:
            while not self.stop_event.wait(3.0):
                line = ", ".join(f"{name} {self.status(channels, name)}" for name in names)
                now = time.monotonic()
                # On every change, and every 30 s while nothing changes.
                if line != last_line or now - last_print >= 30:
                    print(f"  [{now - self.started:5.0f}s] {line}", flush=True)
                    last_line, last_print = line, now
        finally:
            for channel in channels.values():
                channel.close()


def ensure_running(stack, echo: EchoProcess) -> None:
    """A service that died mid-run would turn every later figure into errors: stop instead."""
    processes = {**stack.processes, "echo server": echo.process}
    for name, process in processes.items():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the {name} process exited with code {process.returncode} during the benchmark")
    triton = getattr(stack, "triton", None)
    if triton is not None and not triton.is_running():
        raise RuntimeError("the Triton server exited during the benchmark")


# --------------------------------------------------------------------- memory


def resident_mib(pid: int) -> float | None:
    """RSS of the process and any children it started, in MiB."""
    import psutil

    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        return None
    return total / 2**20


def peak_resident_mib(pid: int) -> float | None:
    """Highest RSS each process (and child) ever had (Linux VmHWM), summed, in
    MiB: what a first start that encodes the catalogue needed at most."""
    import psutil

    def hwm(one: int) -> int | None:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return None
    peaks = [hwm(one) for one in pids]
    if peaks[0] is None:
        return None
    return sum(p for p in peaks if p is not None) / 2**20


# --------------------------------------------------------------------- report


def fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_level(level: dict, max_requests: int, max_seconds: float) -> None:
    print(f"\nconcurrency {level['concurrency']}  (closed loop: {max_requests} requests or {max_seconds:g} s, "
          f"after {WARMUP_REQUESTS} warm-up)")
    print(f"  {'':<10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'ok':>6} {'secs':>6}  errors")
    for name in ("recommend", "echo"):
        result = level[name]
        errors = ", ".join(f"{code} {n}" for code, n in sorted(result["errors"].items())) or "0"
        print(f"  {name:<10} {fmt(result['p50_ms'], 8, 2)} {fmt(result['p99_ms'], 8, 2)} "
              f"{fmt(result['throughput_rps'], 9)} {result['ok']:>6} {result['seconds']:>6.1f}  {errors}")
    streams = level.get("idle_streams")
    if streams:
        print(f"  Recommend with {streams['count']} idle Watch streams open on the gateway, back to back:")
        for name, label in (("recommend", "quiet"), ("with_streams", "streams"), ("after_streams", "quiet again")):
            result = level["recommend"] if name == "recommend" else streams[name]
            errors = ", ".join(f"{code} {n}" for code, n in sorted(result["errors"].items())) or "0"
            print(f"  {label:<12} {fmt(result['p50_ms'], 8, 2)} {fmt(result['p99_ms'], 8, 2)} "
                  f"{fmt(result['throughput_rps'], 9)} {result['ok']:>6} {result['seconds']:>6.1f}  {errors}")
        ratio = streams["p99_ratio"]
        print(f"  p99 with streams / quiet: {fmt(ratio, 0, 3).strip()}")
    paths = ", ".join(f"{p} {n}" for p, n in sorted(level["recommend"].get("paths", {}).items()))
    ratio = level["throughput_ratio"]
    print(f"  recommend / echo throughput: {fmt(ratio, 0, 3).strip()}   (recommend paths: {paths or '-'})")


def describe_data(data_dir: Path, interactions, items_count: int | None) -> dict:
    from recsys_core.data import paths

    resolved = data_dir.resolve()
    if resolved == paths.shared_data_dir().resolve():
        label = "amazon-2014 (full set)"
    elif resolved == paths.BUNDLED_DATA_DIR.resolve():
        label = "bundled subset (data/)"
    else:
        label = resolved.name
    return {
        "path": str(resolved),
        "label": label,
        "full_amazon_2014": resolved == paths.shared_data_dir().resolve(),
        "items": items_count,
        "shoppers": int(interactions["user_id"].nunique()),
        "events": int(len(interactions)),
    }


def count_items(data_dir: Path) -> int | None:
    import pandas as pd

    from recsys_core.data.shopping import ITEMS_FILE

    try:
        return int(pd.read_csv(data_dir / ITEMS_FILE, usecols=["item_id"], dtype=str)["item_id"].nunique())
    except Exception:  # noqa: BLE001 - only for the report
        return None


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from recsys_core.data import paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR),
                        help="data directory in the amazon-2014 schema (default: the bundled data/)")
    parser.add_argument("--requests", type=int, default=400, help="requests per loop (default 400)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client thread counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per loop (default 20)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--encoder", choices=("triton", "onnx"),
                        help="where the text encoder runs: a local Triton server or onnxruntime inside the "
                             "embedding service (default: LocalStack's default)")
    parser.add_argument("--transport", default="mtls", choices=("mtls", "mtls-plaintext-gateway", "plaintext"),
                        help="mtls (default, as `recsys serve`), or plaintext everywhere (development only); "
                             "bench/transport.py compares the two in one run")
    parser.add_argument("--idle-streams", type=int, default=0, metavar="N",
                        help="also measure Recommend with N idle health Watch streams open on the gateway")
    parser.add_argument("--edge", action="store_true",
                        help="callers reach the gateway through recsys-edge, as `recsys serve` runs it")
    parser.add_argument("--ranking-model", metavar="MODEL",
                        help="serve this `recsys train-ranker` model in the ranking service (default: hand weights)")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--hold-watches", nargs=3, metavar=("ADDRESS", "N", "CA"), help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is None and args.hold_watches is None:
        if args.idle_streams < 0:
            parser.error("--idle-streams must not be negative")
        try:
            args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        except ValueError:
            parser.error("--concurrency takes comma-separated integers, e.g. 1,4,16")
        if not args.levels or min(args.levels) < 1:
            parser.error("--concurrency needs at least one level, each >= 1")
        if args.requests < 1 or args.seconds <= 0:
            parser.error("--requests and --seconds must be positive")
    return args


def run(args) -> int:
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from recsys_core.data.shopping import load_interactions
    from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS
    from recsys_cli.stack import LocalStack, free_port
    from services.gateway.config import GatewayConfig

    data_dir = Path(args.data).expanduser().resolve()
    interactions = load_interactions(data_dir)
    data = describe_data(data_dir, interactions, count_items(data_dir))
    print(f"data: {data['label']} at {data['path']}: {data['items']} items, "
          f"{data['shoppers']} shoppers, {data['events']} events", flush=True)

    rng = random.Random(SEED)
    requests = make_requests(interactions, args.requests, rng)
    warmup = make_requests(interactions, WARMUP_REQUESTS, rng)
    del interactions
    payloads = [r.SerializeToString() for r in requests]
    warmup_payloads = [r.SerializeToString() for r in warmup]
    mean_request_bytes = sum(map(len, payloads)) / len(payloads)
    workers = GatewayConfig.from_env().workers

    abort = threading.Event()
    state = tempfile.TemporaryDirectory(prefix="recsys-bench-")
    stack_options = {"encoder": args.encoder} if args.encoder else {}
    stack_options["transport"] = args.transport
    stack_options["edge"] = args.edge
    if args.ranking_model:
        stack_options["extra_env"] = {"RANKING_MODEL": str(Path(args.ranking_model).resolve())}
    stack = LocalStack(data_dir=data_dir, gateway_port=free_port(), state_dir=Path(state.name), **stack_options)
    encoder = getattr(stack, "encoder", "onnx")
    echo = EchoProcess(workers)
    channels: list[grpc.Channel] = []
    try:
        print(f"starting {'triton, ' if encoder == 'triton' else ''}embedding, profile, ranking and gateway "
              f"(encoder: {encoder}) on {data_dir.name}/ (state in {state.name}); "
              f"a new catalogue is encoded once, then cached ...", flush=True)
        started = time.monotonic()
        with StartupProgress(stack):
            stack.start()
        startup_seconds = round(time.monotonic() - started, 1)
        print(f"all services SERVING after {startup_seconds:.0f}s; {stack.describe_transport()}", flush=True)
        echo.start()
        print(f"echo server ({workers} workers, like the gateway) at {echo.address}", flush=True)

        # As a caller of the platform: the gateway's port (TLS unless --transport says otherwise)
        # with a token (LocalStack's admin token).
        gateway_channel = stack.channel("gateway")
        echo_channel = grpc.insecure_channel(echo.address, options=CHANNEL_OPTIONS)
        channels += [gateway_channel, echo_channel]
        recommend_stub = gateway_pb2_grpc.GatewayServiceStub(gateway_channel)
        echo_call = echo_channel.unary_unary(ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity)

        levels = []
        for concurrency in args.levels:
            level = {"concurrency": concurrency}
            paths_seen: Counter = Counter()
            reply_bytes: list[int] = []

            def count_path(reply):
                paths_seen[gateway_pb2.RecommendationPath.Name(reply.path).removeprefix("RECOMMENDATION_PATH_").lower()] += 1
                reply_bytes.append(reply.ByteSize())

            ensure_running(stack, echo)
            closed_loop(recommend_stub.Recommend, warmup, concurrency, WARMUP_REQUESTS, args.seconds, abort)
            level["recommend"] = closed_loop(recommend_stub.Recommend, requests, concurrency, args.requests,
                                             args.seconds, abort, on_reply=count_path)
            level["recommend"]["paths"] = dict(paths_seen)
            level["recommend"]["mean_reply_bytes"] = round_or_none(sum(reply_bytes) / len(reply_bytes), 1) if reply_bytes else None
            if args.idle_streams:
                streams = {"count": args.idle_streams}
                with IdleStreams(stack.addresses["gateway"], args.idle_streams,
                                 str(stack.security.ca) if stack.gateway_tls else ""):
                    ensure_running(stack, echo)
                    streams["with_streams"] = closed_loop(recommend_stub.Recommend, requests, concurrency,
                                                          args.requests, args.seconds, abort)
                ensure_running(stack, echo)
                streams["after_streams"] = closed_loop(recommend_stub.Recommend, requests, concurrency,
                                                       args.requests, args.seconds, abort)
                quiet_p99, streams_p99 = level["recommend"]["p99_ms"], streams["with_streams"]["p99_ms"]
                streams["p99_ratio"] = round_or_none(streams_p99 / quiet_p99, 4) if quiet_p99 and streams_p99 else None
                level["idle_streams"] = streams
            ensure_running(stack, echo)
            closed_loop(echo_call, warmup_payloads, concurrency, WARMUP_REQUESTS, args.seconds, abort)
            level["echo"] = closed_loop(echo_call, payloads, concurrency, args.requests, args.seconds, abort)
            echo_rps = level["echo"]["throughput_rps"]
            level["throughput_ratio"] = (
                round_or_none(level["recommend"]["throughput_rps"] / echo_rps, 4) if echo_rps else None
            )
            levels.append(level)
            print_level(level, args.requests, args.seconds)

        ensure_running(stack, echo)
        memory = {name: resident_mib(pid) for name, pid in stack.pids().items()}
        peaks = {name: peak_resident_mib(pid) for name, pid in stack.pids().items()}
        total = sum(v for v in memory.values() if v is not None)
        peak_total = sum(v for v in peaks.values() if v is not None)
        echo_mib = resident_mib(echo.process.pid) if echo.process is not None else None
        met = total < MEMORY_TARGET_MIB
        print(f"\nresident memory (RSS) after the runs, encoder: {encoder}, data set: {data['label']} "
              f"({data['items']} items, {data['shoppers']} shoppers, {data['events']} events)")
        print(f"  {'':<10} {'RSS MiB':>8} {'peak MiB':>9}")
        for name, mib in sorted(memory.items(), key=lambda kv: -(kv[1] or 0)):
            note = " with its Python backend stub" if name == "triton" else ""
            print(f"  {name:<10} {fmt(mib, 8)} {fmt(peaks[name], 9)}  (pid {stack.pids()[name]}{note})")
        print(f"  {'total':<10} {total:>8.1f} {peak_total:>9.1f}")
        print(f"  {'(echo':<10} {fmt(echo_mib, 8)}            not in the total)")
        verdict = "met" if met else "NOT met"
        print(f"target: all services together under 2 GiB with the full amazon-2014 data loaded: {verdict}, "
              f"{total:.0f} of {MEMORY_TARGET_MIB} MiB; data set loaded: {data['label']}")
        if not data["full_amazon_2014"]:
            print("  (the target is for the full set; this run says little about it: "
                  "rerun with --data ../shared/data/amazon-2014)")

        report = {
            "data": data,
            "settings": {
                "requests": args.requests, "seconds": args.seconds, "concurrency": args.levels,
                "warmup_requests": WARMUP_REQUESTS, "k": K, "seed": SEED,
                "category_share": CATEGORY_SHARE, "cold_start_share": COLD_START_SHARE,
                "call_timeout_seconds": CALL_TIMEOUT_SECONDS, "gateway_workers": workers, "echo_workers": workers,
                "mean_request_bytes": round(mean_request_bytes, 1),
                "encoder": encoder,
                "transport": args.transport, "edge": args.edge,
                "idle_streams": args.idle_streams,
                "ranking_model": str(Path(args.ranking_model).resolve()) if args.ranking_model else None,
            },
            "startup_seconds": startup_seconds,
            "levels": levels,
            "memory_mib": {name: round_or_none(mib, 1) for name, mib in memory.items()},
            "memory_total_mib": round(total, 1),
            "peak_memory_mib": {name: round_or_none(mib, 1) for name, mib in peaks.items()},
            "peak_memory_total_mib": round(peak_total, 1),
            "echo_memory_mib": round_or_none(echo_mib, 1),
            "memory_target_mib": MEMORY_TARGET_MIB,
            "memory_target_met": met,
            "memory_target_applies": data["full_amazon_2014"],
        }
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"figures written to {out}")
        return 0
    finally:
        abort.set()
        for channel in channels:
            channel.close()
        echo.stop()
        stack.stop()
        state.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server is not None:
        return serve_echo(args.echo_server, args.workers or 16)
    if args.hold_watches is not None:
        return hold_watches(args.hold_watches[0], int(args.hold_watches[1]), args.hold_watches[2])
    from recsys_core.data.shopping import DataError
    from recsys_cli.stack import run_script

    return run_script("bench/recommend.py", lambda: run(args), (RuntimeError, TimeoutError, OSError, DataError))


if __name__ == "__main__":
    sys.exit(main())

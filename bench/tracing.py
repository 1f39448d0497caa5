"""What tracing costs Recommend: p50, p99 and throughput with tracing off and
on, in the same run.

    python bench/tracing.py [--data DIR] [--requests N] [--concurrency 1,4]
                            [--seconds S] [--rounds R] [--sample-ratio 1.0] [--json OUT]

Each round starts the whole local stack (recsys_cli.stack.LocalStack, real
processes, mTLS) twice: once with tracing off (the default: no instrumentation
installed), once with every service exporting its spans over OTLP/gRPC to a
receiver in a process of its own (recsys_core.rpc.otlp_receiver), so that
the cost measured is the production one (spans made, batched, serialised and
sent) without the receiving in the benchmark client's process. The same
requests (bench/recommend.py's mix) run at each concurrency level against
both; with --rounds 2 or more the order alternates (off, on, on, off, ...) so
that a machine that slows down over the run does not favour one side.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from loadloop import closed_loop, round_or_none  # noqa: E402
from recommend import SEED, WARMUP_REQUESTS, StartupProgress, fmt, make_requests  # noqa: E402


class Receiver:
    """The OTLP receiver as a process of its own; `spans` once stopped."""

    def __init__(self):
        from recsys_cli.stack import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.spans: int | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recsys_core.rpc.otlp_receiver", "--port", str(self.port)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if line != f"listening on {self.port}":
            self.stop()
            raise RuntimeError(f"the OTLP receiver did not start (said {line!r})")

    def stop(self) -> None:
        self.process.stdin.close()  # it stops, and says how many spans it got
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for line in self.process.stdout.read().splitlines():
            if line.startswith("spans "):
                self.spans = int(line.split()[1])


def measure(args, tracing: str, requests, warmup) -> dict:
    """One stack, tracing off or on, every concurrency level."""
    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys_cli.stack import LocalStack, free_port

    receiver = Receiver() if tracing == "on" else None
    state = tempfile.TemporaryDirectory(prefix="recsys-bench-tracing-")
    options = {}
    if receiver is not None:
        options = {"tracing": "otlp", "tracing_endpoint": receiver.endpoint, "tracing_sample_ratio": args.sample_ratio}
    stack = LocalStack(data_dir=Path(args.data).resolve(), gateway_port=free_port(), state_dir=Path(state.name),
                       **options)
    abort = threading.Event()
    result = {"tracing": tracing, "levels": []}
    try:
        print(f"starting the stack with tracing {tracing} ...", flush=True)
        with StartupProgress(stack):
            stack.start()
        with stack.channel("gateway") as channel:
            recommend = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend
            calls = 0
            for concurrency in args.levels:
                closed_loop(recommend, warmup, concurrency, WARMUP_REQUESTS, args.seconds, abort)
                level = closed_loop(recommend, requests, concurrency, args.requests, args.seconds, abort)
                calls += WARMUP_REQUESTS + level["ok"] + level["error_count"]
                level["concurrency"] = concurrency
                result["levels"].append(level)
                print(f"  tracing {tracing:<3} concurrency {concurrency:>3}: p50 {fmt(level['p50_ms'], 0, 2)} ms, "
                      f"p99 {fmt(level['p99_ms'], 0, 2)} ms, {fmt(level['throughput_rps'], 0)} req/s, "
                      f"errors {level['error_count']}", flush=True)
        result["recommend_calls"] = calls
    finally:
        abort.set()
        stack.stop()  # services flush their last spans as they stop
        state.cleanup()
        if receiver is not None:
            receiver.stop()
            result["spans_received"] = receiver.spans
    return result


def summarise(runs: list[dict], levels: list[int]) -> list[dict]:
    """Per level: the median over rounds of each side's p50, p99 and throughput, and on/off ratios."""
    import statistics

    rows = []
    for position, concurrency in enumerate(levels):
        row = {"concurrency": concurrency}
        for side in ("off", "on"):
            figures = [run["levels"][position] for run in runs if run["tracing"] == side]
            for key in ("p50_ms", "p99_ms", "throughput_rps"):
                values = [f[key] for f in figures if f[key] is not None]
                row[f"{side}_{key}"] = round_or_none(statistics.median(values), 3) if values else None
        for key in ("p50_ms", "p99_ms", "throughput_rps"):
            off, on = row[f"off_{key}"], row[f"on_{key}"]
            row[f"{key}_ratio"] = round_or_none(on / off, 4) if off and on else None
        rows.append(row)
    return rows


def parse_args(argv):
    from recsys_core.data import paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR),
                        help="data directory in the amazon-2014 schema (default: the bundled data/)")
    parser.add_argument("--requests", type=int, default=400, help="requests per loop (default 400)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client thread counts (default 1,4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per loop (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, order alternating (default 1)")
    parser.add_argument("--sample-ratio", type=float, default=1.0,
                        help="share of Recommend calls traced when on (default 1: the most it can cost)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes comma-separated integers, e.g. 1,4")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency needs at least one level, each >= 1")
    if args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--requests, --seconds and --rounds must be positive")
    if not 0.0 <= args.sample_ratio <= 1.0:
        parser.error("--sample-ratio must be between 0 and 1")
    return args


def run(args) -> int:
    from recsys_core.data.shopping import load_interactions

    interactions = load_interactions(Path(args.data).resolve())
    rng = random.Random(SEED)
    requests = make_requests(interactions, args.requests, rng)
    warmup = make_requests(interactions, WARMUP_REQUESTS, rng)
    del interactions
    runs = []
    for round_number in range(args.rounds):
        order = ("off", "on") if round_number % 2 == 0 else ("on", "off")
        for tracing in order:
            runs.append(measure(args, tracing, requests, warmup))
    rows = summarise(runs, args.levels)
    print(f"\nRecommend with tracing off and on (OTLP, {args.sample_ratio:g} sampled), "
          f"median of {args.rounds} round(s); {args.requests} requests or {args.seconds:g} s per loop")
    print(f"  {'conc':>4} {'p50 off':>8} {'p50 on':>8} {'p99 off':>8} {'p99 on':>8} {'p99 on/off':>10} "
          f"{'req/s off':>9} {'req/s on':>9}")
    for row in rows:
        print(f"  {row['concurrency']:>4} {fmt(row['off_p50_ms'], 8, 2)} {fmt(row['on_p50_ms'], 8, 2)} "
              f"{fmt(row['off_p99_ms'], 8, 2)} {fmt(row['on_p99_ms'], 8, 2)} {fmt(row['p99_ms_ratio'], 10, 3)} "
              f"{fmt(row['off_throughput_rps'], 9)} {fmt(row['on_throughput_rps'], 9)}")
    traced = [run for run in runs if run["tracing"] == "on"]
    spans = sum(run.get("spans_received") or 0 for run in traced)
    calls = sum(run.get("recommend_calls") or 0 for run in traced)
    if calls:
        print(f"  spans received with tracing on: {spans} for {calls} Recommend calls "
              f"({spans / calls:.1f} a call, health checks untraced)")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "settings": {"data": str(Path(args.data).resolve()), "requests": args.requests, "seconds": args.seconds,
                         "concurrency": args.levels, "rounds": args.rounds, "sample_ratio": args.sample_ratio,
                         "warmup_requests": WARMUP_REQUESTS, "seed": SEED},
            "summary": rows, "runs": runs,
        }, indent=2) + "\n")
        print(f"figures written to {out}")
    errors = sum(level["error_count"] for run in runs for level in run["levels"])
    return 0 if errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from recsys_core.data.shopping import DataError
    from recsys_cli.stack import run_script

    return run_script("bench/tracing.py", lambda: run(args), (RuntimeError, TimeoutError, OSError, DataError))


if __name__ == "__main__":
    sys.exit(main())

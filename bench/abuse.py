"""Recommend's p99 while the gateway is abused (issue #17's target: 1,000 idle
streams and 100 oversized requests leave Recommend's p99 within 2x of its
quiet figure).

    python bench/abuse.py [--data DIR] [--requests N] [--concurrency C] [--seconds S]
                          [--idle-streams 1000] [--oversized 100] [--oversized-mib 8] [--json OUT]

All four services run as real processes (recsys_cli.stack.LocalStack) on a
free gateway port. Recommend is measured in a closed loop (the same varied
requests as bench/recommend.py) three times, back to back: quiet; with
--idle-streams health Watch streams open on the gateway (held by another
process, 100 to a connection: the gateway allows 128 streams per connection)
and --oversized requests of --oversized-mib MiB kept in flight against it
(another process, one thread each, sending again as soon as each is
refused); quiet again. The abusers run in processes of their own so they do
not share the measuring client's GIL.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from loadloop import closed_loop, round_or_none  # noqa: E402
from recommend import SEED, WARMUP_REQUESTS, IdleStreams, StartupProgress, make_requests  # noqa: E402

TARGET_RATIO = 2.0


def send_oversized(address: str, count: int, mib: float, ca: str, token: str) -> int:
    """`count` threads, each sending a Recommend of `mib` MiB again and again
    until stdin closes; prints the refusals' status codes when done."""
    from collections import Counter

    from recsys.gateway.v1 import gateway_pb2
    from recsys_core.rpc.transport import client_channel

    ids = ["B" * 1023] * int(mib * 1024)
    body = gateway_pb2.RecommendRequest(user_id="A2V5R832QCSOMX", k=10, context_item_ids=ids).SerializeToString()
    channels = [client_channel(address, ca=ca, token=token or None, server_name="gateway",
                               options=[("grpc.use_local_subchannel_pool", 1)]) if ca
                else grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, count // 25))]
    calls = [c.unary_unary("/recsys.gateway.v1.GatewayService/Recommend",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b) for c in channels]
    stop = threading.Event()
    codes: Counter = Counter()
    lock = threading.Lock()

    def keep_sending(position: int) -> None:
        call = calls[position % len(calls)]
        while not stop.is_set():
            try:
                call(body, timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=keep_sending, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    print(f"sending {count}", flush=True)
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join(35)
    print(json.dumps(dict(codes)), flush=True)
    for channel in channels:
        channel.close()
    return 0


class Oversized:
    def __init__(self, address: str, count: int, mib: float, ca: str, token: str):
        self.args = [address, str(count), str(mib), ca, token]
        self.process: subprocess.Popen | None = None
        self.codes: dict = {}

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--send-oversized", *self.args],
                                        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if not line.startswith("sending"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the oversized sender did not start ({line!r})")
        time.sleep(1.0)  # every thread has a request in flight
        return self

    def __exit__(self, *exc):
        try:
            out, _ = self.process.communicate(input="", timeout=60)  # closing stdin stops the sender
            self.codes = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def parse_args(argv):
    from recsys_core.data import paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR), help="data directory (default: bundled data/)")
    parser.add_argument("--requests", type=int, default=400, help="Recommend requests per loop (default 400)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per loop (default 20)")
    parser.add_argument("--idle-streams", type=int, default=1000, help="idle Watch streams (default 1000)")
    parser.add_argument("--oversized", type=int, default=100, help="oversized requests in flight (default 100)")
    parser.add_argument("--oversized-mib", type=float, default=8.0, help="size of each (default 8 MiB)")
    parser.add_argument("--encoder", choices=("triton", "onnx"), help="where the text encoder runs")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--send-oversized", nargs=5, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args) -> int:
    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys_core.data.shopping import load_interactions
    from recsys_cli.stack import LocalStack, free_port

    data_dir = Path(args.data).expanduser().resolve()
    interactions = load_interactions(data_dir)
    rng = random.Random(SEED)
    requests = make_requests(interactions, args.requests, rng)
    warmup = make_requests(interactions, WARMUP_REQUESTS, rng)
    del interactions
    state = tempfile.TemporaryDirectory(prefix="recsys-abuse-")
    options = {"encoder": args.encoder} if args.encoder else {}
    stack = LocalStack(data_dir=data_dir, gateway_port=free_port(), state_dir=Path(state.name), **options)
    abort = threading.Event()
    try:
        print(f"starting the stack on {data_dir.name}/ ...", flush=True)
        with StartupProgress(stack):
            stack.start()
        address = stack.addresses["gateway"]
        ca = str(stack.security.ca) if stack.gateway_tls else ""
        with stack.channel("gateway") as channel:
            recommend = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend

            def measure(label: str) -> dict:
                figures = closed_loop(recommend, requests, args.concurrency, args.requests, args.seconds, abort)
                print(f"  {label:<36} p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms  "
                      f"{figures['throughput_rps']} req/s  errors {figures.get('errors') or 0}", flush=True)
                return figures

            closed_loop(recommend, warmup, args.concurrency, WARMUP_REQUESTS, args.seconds, abort)
            print(f"Recommend, closed loop, concurrency {args.concurrency}, up to {args.requests} requests "
                  f"or {args.seconds:g} s per loop:")
            quiet = measure("quiet")
            with IdleStreams(address, args.idle_streams, ca), \
                    Oversized(address, args.oversized, args.oversized_mib, ca, stack.admin_token) as oversized:
                abused = measure(f"{args.idle_streams} idle + {args.oversized} x {args.oversized_mib:g} MiB")
            after = measure("quiet again")
        ratio = round_or_none(abused["p99_ms"] / quiet["p99_ms"], 3) if quiet["p99_ms"] and abused["p99_ms"] else None
        met = ratio is not None and ratio <= TARGET_RATIO
        print(f"oversized requests' answers: {oversized.codes}")
        print(f"p99 abused / quiet: {ratio} (target <= {TARGET_RATIO:g}: {'met' if met else 'NOT met'})")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "settings": {k: v for k, v in vars(args).items() if k not in ("send_oversized", "json")},
                "quiet": quiet, "abused": abused, "quiet_again": after, "oversized_codes": oversized.codes,
                "p99_ratio": ratio, "target_ratio": TARGET_RATIO, "target_met": met}, indent=2) + "\n")
        return 0
    finally:
        abort.set()
        stack.stop()
        state.cleanup()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.send_oversized:
        address, count, mib, ca, token = args.send_oversized
        return send_oversized(address, int(count), float(mib), ca, token)
    from recsys_core.data.shopping import DataError
    from recsys_cli.stack import run_script

    return run_script("bench/abuse.py", lambda: run(args), (RuntimeError, TimeoutError, OSError, DataError))


if __name__ == "__main__":
    sys.exit(main())

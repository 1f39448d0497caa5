"""Recommend's p99 while the gateway is abused (issue #17's target: 1,000 idle
streams and 100 oversized requests leave Recommend's p99 within 2x of its
quiet figure).

    python bench/abuse.py [--data DIR] [--rounds R] [--pin auto|none|STACK/ABUSERS]
                          [--requests N] [--concurrency C] [--seconds S]
                          [--idle-streams 1000] [--oversized 100] [--oversized-mib 8] [--no-edge] [--json OUT]

All four services (and Triton, with the default encoder) run as real
processes (recsys_cli.stack.LocalStack) on a free gateway port. Recommend is
measured in a closed loop (the same varied requests as bench/recommend.py):
R rounds of a quiet loop then an abused one, then a last quiet loop. An
abused loop has --idle-streams health Watch streams open on the gateway
(held by a process of their own, 100 to a connection: the gateway allows
128 streams per connection) and --oversized requests of --oversized-mib MiB
kept in flight against it (another process, one thread each, sending again
as soon as each is refused). The ratio is the p99 over every abused loop's
calls to the p99 over every quiet loop's (the last quiet loop excluded):
alternating rounds spread a drift in the machine's other load over both.

The stack is what `recsys serve` runs: recsys-edge (edge/main.go) on the
public port refuses each oversized request from its 5-byte length prefix,
the gateway behind it on loopback. --no-edge measures the gateway facing the
abuse alone (grpcio reads each oversized body whole before refusing it).

Pinning (--pin, Linux CPU affinity; default auto): the stack's services,
Triton and this process (the measuring client) run on the lower half of the
CPUs this process may use, the two abusing processes on the upper half
(on 2 CPUs: the stack and the client on CPU 0, the abusers on CPU 1), in
every loop, quiet ones too, so the quiet and the abused figures have the
same CPUs. What the abused loops then cost the stack is what the gateway
spends on the abuse (reading and refusing the bodies, holding the
streams), not the abusers' own work (TLS-encrypting the bodies). --pin none
runs everything on every CPU; --pin 0/1 or 0-5/6,7 names the two sets.

Each loop also prints where the CPU went, from /proc and psutil: per
process (services, client, abusers) the CPU used and the run-queue wait
(the time its threads were ready to run and waited for a CPU: scheduling
contention), both in cores; the gateway's CPU by thread kind (gRPC core's
event_engine threads, which read and refuse oversized bodies, against the
Python threads that serve Recommend); the gateway's peak RSS; the bytes its
connections received (`ss`); the machine's busy CPU, and the part of it no
process of the benchmark used (other jobs); with pinning, how busy the
stack's CPUs were and how much of that was not the stack's (other jobs the
scheduler moved there, interrupts). The load average is printed beside the
ratio: figures taken on a loaded machine are not a verdict.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from loadloop import closed_loop, percentile, round_or_none  # noqa: E402
from recommend import SEED, WARMUP_REQUESTS, IdleStreams, StartupProgress, make_requests  # noqa: E402

TARGET_RATIO = 2.0


# -- where the CPU goes ---------------------------------------------------------------

def _task_schedstats(pid: int) -> dict[int, tuple[str, int, int]]:
    """Each live thread of `pid`: (name, ns on a CPU, ns waiting in a run queue), from
    /proc/PID/task/TID/schedstat (Linux; empty elsewhere or once the process is gone)."""
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                ran, waited = (int(x) for x in stat.read().split()[:2])
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                name = comm.read().strip()
        except (OSError, ValueError):
            continue
        threads[int(tid)] = (name, ran, waited)
    return threads


def thread_group(name: str) -> str:
    """A thread's kind from its name: "gateway_3" and "gateway_12" are one pool."""
    return re.sub(r"[-_.]?\d+$", "", name) or name


class CpuAccount:
    """Where the CPU went over one loop: per process (the stack's services,
    the measuring client, each abuser) the CPU it used (user + system, in
    cores: CPU seconds per second of the loop) and how long its threads
    waited in a run queue for a CPU (same unit: 0.5 means that, on average,
    half a thread was ready to run and not running); the gateway's CPU by
    thread kind (gRPC core's pollers and executors against the Python event
    loop and blocking pool); and the whole machine's busy CPU, whose part
    not used by these processes is other jobs'."""

    def __init__(self, pids: dict[str, int], stack_cpus: set[int] | None = None,
                 stack_names: frozenset[str] = frozenset()):
        import psutil

        self.psutil = psutil
        self.pids = dict(pids)
        # With the stack pinned: how busy its CPUs were, and how much of that
        # was not the stack's (other jobs the scheduler moved there, interrupts).
        self.stack_cpus = sorted(stack_cpus) if stack_cpus else None
        self.stack_names = stack_names
        self.peak_rss: dict[str, int] = {}
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, name="rss-sampler", daemon=True)
        self.start = self._snapshot()
        self._sampler.start()

    def _sample_rss(self) -> None:
        """Each process's largest resident memory over the loop, sampled every 0.25 s."""
        while True:
            for name, pid in self.pids.items():
                try:
                    rss = self.psutil.Process(pid).memory_info().rss
                except self.psutil.Error:
                    continue
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
            if self._done.wait(0.25):
                return

    def _snapshot(self) -> dict:
        processes = {}
        for name, pid in self.pids.items():
            try:
                times = self.psutil.Process(pid).cpu_times()
            except self.psutil.Error:
                continue
            processes[name] = (times.user + times.system, _task_schedstats(pid))
        per_cpu = [sum(times) - times.idle - getattr(times, "iowait", 0.0)
                   for times in self.psutil.cpu_times(percpu=True)]
        return {"at": time.perf_counter(), "processes": processes, "busy": sum(per_cpu), "per_cpu": per_cpu}

    def finish(self) -> dict:
        end = self._snapshot()
        self._done.set()
        self._sampler.join(5)
        seconds = max(end["at"] - self.start["at"], 1e-9)
        figures, ours = {}, 0.0
        for name, (cpu, threads) in end["processes"].items():
            if name not in self.start["processes"]:
                continue
            cpu0, threads0 = self.start["processes"][name]
            waited = sum(w - threads0.get(tid, (None, 0, 0))[2] for tid, (_, _, w) in threads.items())
            groups: dict[str, float] = {}
            for tid, (thread, ran, _) in threads.items():
                key = thread_group(thread)
                groups[key] = groups.get(key, 0.0) + (ran - threads0.get(tid, (None, 0, 0))[1]) / 1e9 / seconds
            ours += cpu - cpu0
            figures[name] = {"cpu_cores": round((cpu - cpu0) / seconds, 3),
                             "runqueue_wait": round(waited / 1e9 / seconds, 3),
                             "peak_rss_mib": round(self.peak_rss.get(name, 0) / 2**20),
                             "threads": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
                                         if v >= 0.005}}
        busy = (end["busy"] - self.start["busy"]) / seconds
        account = {"seconds": round(seconds, 2), "processes": figures,
                   "machine_busy_cores": round(busy, 3), "others_cores": round(max(0.0, busy - ours / seconds), 3),
                   "cpus": self.psutil.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
        if self.stack_cpus:
            on_stack = sum(end["per_cpu"][cpu] - self.start["per_cpu"][cpu] for cpu in self.stack_cpus
                           if cpu < len(end["per_cpu"])) / seconds
            stack = sum(f["cpu_cores"] for name, f in figures.items() if name in self.stack_names)
            account["stack_cpus"] = {"cpus": self.stack_cpus, "busy_cores": round(on_stack, 3),
                                     "stack_cores": round(stack, 3),
                                     "other_work_cores": round(max(0.0, on_stack - stack), 3)}
        return account


def describe_cpu(account: dict, threads_of: tuple[str, ...] = ("gateway",)) -> list[str]:
    lines = ["    cpu, in cores (run-queue wait in brackets): " + ", ".join(
        f"{name} {f['cpu_cores']:.2f} ({f['runqueue_wait']:.2f})" for name, f in account["processes"].items())]
    lines.append(f"    machine busy {account['machine_busy_cores']:.2f} of {account['cpus']} cores, of which other "
                 f"jobs {account['others_cores']:.2f}; load average {account['load_average']}")
    if "stack_cpus" in account:
        pinned = account["stack_cpus"]
        lines.append(f"    the stack's CPUs {pinned['cpus']}: busy {pinned['busy_cores']:.2f} cores, the stack and "
                     f"client {pinned['stack_cores']:.2f}, other work {pinned['other_work_cores']:.2f} "
                     f"(other jobs, interrupts)")
    for name in threads_of:
        if name in account["processes"]:
            lines.append(f"    {name}: peak RSS {account['processes'][name]['peak_rss_mib']} MiB; CPU by thread, "
                         f"in cores: " + ", ".join(
                             f"{k} {v:.2f}" for k, v in account["processes"][name]["threads"].items()))
    return lines


def bytes_received(port: int) -> int | None:
    """Bytes the kernel delivered to the open connections to `port` so far
    (`ss -ti`'s bytes_received, summed); None without ss."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))


# -- pinning --------------------------------------------------------------------------

def cpu_split(spec: str) -> tuple[set[int], set[int]] | None:
    """(the stack's and the client's CPUs, the abusers' CPUs) from --pin:
    "none"; "auto" (the CPUs this process may use, split in two: the lower
    half for the stack, the upper half for the abusers; none with fewer than
    two); or "STACK/ABUSERS" as CPU lists ("0/1", "0-5/6,7")."""
    if spec == "none":
        return None
    if spec == "auto":
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        half = len(cpus) // 2
        return set(cpus[:half]), set(cpus[half:])

    def cpu_list(text: str) -> set[int]:
        cpus: set[int] = set()
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
        return cpus

    stack, _, abusers = spec.partition("/")
    if not stack or not abusers:
        raise ValueError(f"--pin takes none, auto or STACK/ABUSERS CPU lists (0/1, 0-5/6,7), got {spec!r}")
    return cpu_list(stack), cpu_list(abusers)


@contextlib.contextmanager
def forking_on(cpus: set[int] | None):
    """Processes started inside run on `cpus`: a child inherits the CPU set
    of the thread that forks it, so this thread moves there for the while."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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
    parser.add_argument("--rounds", type=int, default=1,
                        help="quiet and abused loops, alternated this many times; the ratio is of the p99s over "
                             "every quiet and every abused loop (default 1)")
    parser.add_argument("--encoder", choices=("triton", "onnx"), help="where the text encoder runs")
    parser.add_argument("--pin", default="auto",
                        help="CPUs: 'auto' (the stack and this client on the lower half of the CPUs, the abusers "
                             "on the upper half; nothing pinned on one CPU), 'none', or STACK/ABUSERS CPU lists "
                             "such as 0/1 or 0-5/6,7 (default auto)")
    parser.add_argument("--no-edge", action="store_true",
                        help="no recsys-edge in front: the abusers reach the gateway itself")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--send-oversized", nargs=5, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args) -> int:
    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys_core.data.shopping import load_interactions
    from recsys_cli.stack import LocalStack, free_port

    split = cpu_split(args.pin)
    stack_cpus, abuser_cpus = split if split is not None else (None, None)
    if stack_cpus is not None:
        # Before anything starts a thread or a process: the stack's services
        # and this process's client threads inherit it.
        os.sched_setaffinity(0, stack_cpus)
    data_dir = Path(args.data).expanduser().resolve()
    interactions = load_interactions(data_dir)
    rng = random.Random(SEED)
    requests = make_requests(interactions, args.requests, rng)
    warmup = make_requests(interactions, WARMUP_REQUESTS, rng)
    del interactions
    state = tempfile.TemporaryDirectory(prefix="recsys-abuse-")
    options = {"encoder": args.encoder} if args.encoder else {}
    gateway_port = free_port()
    stack = LocalStack(data_dir=data_dir, gateway_port=gateway_port, state_dir=Path(state.name),
                       edge=not args.no_edge, **options)
    abort = threading.Event()
    try:
        print(f"starting the stack on {data_dir.name}/ ...", flush=True)
        with StartupProgress(stack):
            stack.start()
        address = stack.addresses["gateway"]
        ca = str(stack.security.ca) if stack.gateway_tls else ""
        stack_pids = {**stack.pids(), "client": os.getpid()}
        latencies: dict[str, list[float]] = {"quiet": [], "abused": []}
        with stack.channel("gateway") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend
            timing: list[list[float]] = [[]]

            def recommend(request, timeout):
                begin = time.perf_counter()
                reply = stub(request, timeout=timeout)
                timing[0].append((time.perf_counter() - begin) * 1000)
                return reply

            def measure(label: str, kind: str | None, abusers: dict[str, int] | None = None) -> dict:
                account = CpuAccount({**stack_pids, **(abusers or {})}, stack_cpus, frozenset(stack_pids))
                received = bytes_received(gateway_port)
                timing[0] = []
                figures = closed_loop(recommend, requests, args.concurrency, args.requests, args.seconds, abort)
                figures["cpu"] = account.finish()
                if kind is not None:
                    latencies[kind].extend(timing[0])
                after = bytes_received(gateway_port)
                if received is not None and after is not None:
                    figures["public_port_mib_received_per_s"] = round(
                        (after - received) / 2**20 / figures["cpu"]["seconds"], 1)
                print(f"  {label:<36} p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms  "
                      f"{figures['throughput_rps']} req/s  errors {figures.get('errors') or 0}", flush=True)
                for line in describe_cpu(figures["cpu"], threads_of=("edge", "gateway")):
                    print(line)
                if figures.get("public_port_mib_received_per_s"):
                    # Connections open at both ends of the loop: the gateway's own recycle every
                    # GATEWAY_CONNECTION_AGE_SECONDS, so without the edge this undercounts.
                    print(f"    connections to the public port received {figures['public_port_mib_received_per_s']} "
                          f"MiB/s")
                return figures

            def abused_loop(label: str) -> tuple[dict, dict]:
                with forking_on(abuser_cpus):
                    idle = IdleStreams(address, args.idle_streams, ca).__enter__()
                try:
                    with forking_on(abuser_cpus):
                        oversized = Oversized(address, args.oversized, args.oversized_mib, ca, stack.admin_token)
                        oversized.__enter__()
                    try:
                        figures = measure(label, "abused",
                                          {"idle-holder": idle.process.pid, "oversized-sender": oversized.process.pid})
                    finally:
                        oversized.__exit__(None, None, None)
                finally:
                    idle.__exit__(None, None, None)
                return figures, oversized.codes

            closed_loop(recommend, warmup, args.concurrency, WARMUP_REQUESTS, args.seconds, abort)
            pinned = ("not pinned: the stack, this client and the abusers share every CPU" if split is None else
                      f"the stack's services and this client on CPUs {sorted(stack_cpus)}, "
                      f"the abusers on CPUs {sorted(abuser_cpus)} (every loop, quiet ones too)")
            print(f"{data_dir.name}/, encoder on {stack.encoder}, {stack.describe_transport()}; {pinned}\n"
                  f"Recommend, closed loop, concurrency {args.concurrency}, up to {args.requests} "
                  f"requests or {args.seconds:g} s per loop; {args.rounds} round(s) of quiet then abused, "
                  f"then quiet again. CPU and run-queue wait per process in cores (CPU seconds per second):")
            loops, codes = [], Counter()
            abuse = f"{args.idle_streams} idle + {args.oversized} x {args.oversized_mib:g} MiB"
            for round_number in range(1, args.rounds + 1):
                tag = f" (round {round_number})" if args.rounds > 1 else ""
                loops.append({"loop": "quiet", "round": round_number, **measure("quiet" + tag, "quiet")})
                figures, round_codes = abused_loop(abuse + tag)
                codes.update(round_codes)
                loops.append({"loop": "abused", "round": round_number, **figures})
            after = measure("quiet again", None)
            loops.append({"loop": "quiet again", **after})
        pooled = {kind: round_or_none(percentile(sorted(values), 99)) for kind, values in latencies.items()}
        ratio = round_or_none(pooled["abused"] / pooled["quiet"], 3) if pooled["quiet"] and pooled["abused"] else None
        met = ratio is not None and ratio <= TARGET_RATIO
        print(f"oversized requests' answers: {dict(codes)}")
        print(f"p99 over every quiet loop {pooled['quiet']} ms ({len(latencies['quiet'])} calls), over every "
              f"abused loop {pooled['abused']} ms ({len(latencies['abused'])} calls)")
        print(f"p99 abused / quiet: {ratio} (target <= {TARGET_RATIO:g}: {'met' if met else 'NOT met'}); "
              f"load average now {[round(x, 2) for x in os.getloadavg()]} on {os.cpu_count()} CPUs")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "settings": {k: v for k, v in vars(args).items() if k not in ("send_oversized", "json")},
                "pinning": None if split is None else {"stack_and_client": sorted(stack_cpus),
                                                       "abusers": sorted(abuser_cpus)},
                "quiet": next(loop for loop in loops if loop["loop"] == "quiet"),
                "abused": next(loop for loop in loops if loop["loop"] == "abused"),
                "quiet_again": after, "loops": loops, "oversized_codes": dict(codes),
                "p99_quiet_ms": pooled["quiet"], "p99_abused_ms": pooled["abused"],
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

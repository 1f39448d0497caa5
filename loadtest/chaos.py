"""Chaos under load (issue #16, part 6): with 2 replicas of each service
under a steady Recommend load, take processes away and count what fails.

    python loadtest/chaos.py [--rate 30] [--replicas 2] [--encoder triton|onnx]
                             [--only kill,rolling,stages] [--hold 10] [--python-load]

  kill      kill -9 one replica of each service in turn (embedding, ranking,
            profile, gateway): the calls that fail (at most those in flight
            is the goal), and how long until the killed replica is back and
            SERVING (the supervisor restarts it; goal: within 5 s)
  rolling   a rolling restart of every process, one at a time, each drained
            (SIGTERM) and SERVING again before the next: failed calls (goal 0)
  stages    each stage stopped in turn for --hold seconds (every replica of
            embedding, of ranking, of profile; Triton; with --redis, the
            redis-server holding profile's store and the catalogue): the share
            of Recommend calls that succeed (goal >= 99 %), and, with
            --python-load, how long after the stage is back the first whole
            reply came (goal: within 5 s)

The stack is `recsys_cli.stack.LocalStack` with --replicas (what
`recsys serve --replicas N` runs; profile stays one process on SQLite) on
the bundled data, state in a temporary directory. The load is ghz at a
constant rate, open loop (`--async --rps`), over several connections to the
gateway's shared port, calls from loadtest/data/recommend.json; or, with
--python-load, the same requests from a bounded Python loop (what
tests/test_chaos.py runs), which also reads each reply's skipped stages.
Neither retries a failed call: each failure is counted.

Figures depend on the machine: record the command and the load average
beside them (printed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from recsys_cli.stack import LocalStack, free_port  # noqa: E402
from recsys_core.rpc.transport import client_channel  # noqa: E402

GHZ = REPO_ROOT / ".tools" / "bin" / "ghz"
REQUESTS = REPO_ROOT / "loadtest" / "data" / "recommend.json"
RECOVERY_GOAL_SECONDS = 5.0
SERVICES = ("embedding", "ranking", "profile", "gateway")
STAGES = ("embedding", "ranking", "profile", "triton", "redis")
SETTLE_SECONDS = 2.0  # load before and after each action
CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Call:
    started: float  # time.time()
    ended: float
    code: str  # "OK" or the status code's name
    skipped: tuple[int, ...] = ()
    error: str = ""


@dataclass
class Event:
    """One action of a scenario: when it began and ended (both time.time())."""
    scenario: str
    target: str
    began: float
    ended: float = 0.0
    # Seconds from the kill to the replica SERVING again; from a stage's release to it SERVING.
    recovery: float | None = None
    figures: dict = field(default_factory=dict)


def load_requests(limit: int | None = None) -> list[gateway_pb2.RecommendRequest]:
    messages = json.loads(REQUESTS.read_text())[:limit]
    return [json_format.ParseDict(m, gateway_pb2.RecommendRequest()) for m in messages]


def gateway_channel(stack: LocalStack) -> grpc.Channel:
    """A connection of its own (no shared subchannel), no retries, no
    balancing: an outside client of the gateway's port."""
    security = stack.prepare_security()
    options = [("grpc.use_local_subchannel_pool", 1)]
    if not stack.gateway_tls:
        return client_channel(stack.addresses["gateway"], plaintext=True, token=stack.admin_token, options=options)
    return client_channel(stack.addresses["gateway"], ca=str(security.ca), token=stack.admin_token,
                          server_name="gateway", options=options)


class PythonLoad:
    """A bounded load loop: `connections` threads, each on its own
    connection to the gateway (the kernel spreads them over its replicas),
    together sending `rate` Recommend calls a second on schedule."""

    def __init__(self, stack: LocalStack, rate: float = 20.0, connections: int = 4,
                 requests: list[gateway_pb2.RecommendRequest] | None = None):
        self.stack, self.rate, self.connections = stack, rate, connections
        self.requests = requests or load_requests(200)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, index: int) -> None:
        interval = self.connections / self.rate
        with gateway_channel(self.stack) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            sent, next_at = index, time.monotonic() + index * interval / self.connections
            while not self._stop.is_set():
                pause = next_at - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    break
                next_at += interval
                request = self.requests[sent % len(self.requests)]
                sent += self.connections
                started = time.time()
                try:
                    reply = stub.Recommend(request, timeout=CALL_TIMEOUT)
                    call = Call(started, time.time(), "OK", tuple(reply.skipped_stages))
                except grpc.RpcError as error:
                    call = Call(started, time.time(), error.code().name, error=error.details() or "")
                with self._lock:
                    self.calls.append(call)

    def start(self) -> "PythonLoad":
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.connections)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT + 5)
        return sorted(self.calls, key=lambda c: c.started)


class GhzLoad:
    """ghz at a constant rate, open loop, until stop(); every call's outcome from its JSON report."""

    def __init__(self, stack: LocalStack, rate: float, connections: int = 4, max_seconds: float = 600):
        self.stack, self.rate, self.connections, self.max_seconds = stack, rate, connections, max_seconds
        self.report = Path(tempfile.mkstemp(prefix="chaos-ghz-", suffix=".json")[1])

    def start(self) -> "GhzLoad":
        command = [str(GHZ), "--config", "loadtest/configs/recommend.json", "--async", "--rps", str(int(self.rate)),
                   "-c", str(max(int(self.rate), 8)), "--connections", str(self.connections),
                   "-z", f"{int(self.max_seconds)}s", "-n", "0", "--timeout", f"{CALL_TIMEOUT:g}s",
                   "-O", "json", "-o", str(self.report), *self.stack.ghz_args("gateway"),
                   self.stack.addresses["gateway"]]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        return self

    def stop(self) -> list[Call]:
        # ghz ends a run on SIGINT and still writes its report.
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)
        report = json.loads(self.report.read_text())
        self.report.unlink()
        calls = []
        for detail in report.get("details") or []:
            ended = datetime.fromisoformat(detail["timestamp"].replace("Z", "+00:00")).timestamp()
            code = "OK" if detail.get("status") == "OK" else (detail.get("status") or "ERROR")
            calls.append(Call(ended - detail["latency"] / 1e9, ended, code, error=detail.get("error") or ""))
        return sorted(calls, key=lambda c: c.started)


# ---------------------------------------------------------------- scenarios


def wait_back(stack: LocalStack, child, restarts_before: int, since: float, timeout: float = 120.0) -> float:
    """Seconds from `since` (time.monotonic()) until `child` was started
    again and answers SERVING."""
    give_up = time.monotonic() + timeout
    while True:
        while child.restarts == restarts_before:
            if time.monotonic() > give_up:
                raise TimeoutError(f"{child.name} was not restarted")
            time.sleep(0.02)
        try:
            stack.wait_serving(child, max(give_up - time.monotonic(), 1.0))
            return time.monotonic() - since
        except RuntimeError:
            # It exited again while starting: the supervisor starts it once more.
            restarts_before = child.restarts


def kill_each(stack: LocalStack, services=SERVICES, settle: float = SETTLE_SECONDS) -> list[Event]:
    """kill -9 the first replica of each service in turn; the supervisor restarts it."""
    events = []
    for name in services:
        child = stack.children(name)[0]
        time.sleep(settle)
        event = Event("kill", name, time.time())
        restarts, since = child.restarts, time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        event.recovery = wait_back(stack, child, restarts, since)
        event.ended = time.time()
        events.append(event)
    time.sleep(settle)
    return events


def rolling_restart(stack: LocalStack, services=SERVICES, settle: float = SETTLE_SECONDS) -> list[Event]:
    """Every replica of every service, one at a time: drained, restarted, SERVING before the next."""
    events = []
    time.sleep(settle)
    for name in services:
        for child in stack.children(name):
            event = Event("rolling", name, time.time())
            restarts, since = child.restarts, time.monotonic()
            stack.supervisor.restart(child)
            event.recovery = wait_back(stack, child, restarts, since)
            event.ended = time.time()
            events.append(event)
            # A replica just back has connections to make; give the callers a moment.
            time.sleep(0.5)
    time.sleep(settle)
    return events


def stages_down(stack: LocalStack, stages=STAGES, hold: float = 10.0, settle: float = SETTLE_SECONDS) -> list[Event]:
    """Each stage stopped (every replica of it) for `hold` seconds, then released."""
    events = []
    for name in stages:
        if name == "redis":
            if stack.redis_server is not None:
                events.append(redis_down(stack, hold, settle))
            continue
        children = stack.children(name)
        if not children:
            continue
        time.sleep(settle)
        event = Event("stage-down", name, time.time())
        for child in children:
            stack.supervisor.hold(child)
        time.sleep(hold)
        restarts = [c.restarts for c in children]
        released = time.monotonic()
        event.figures["released"] = time.time()
        for child in children:
            stack.supervisor.release(child)
        event.recovery = max(wait_back(stack, c, r, released) for c, r in zip(children, restarts))
        event.figures["serving"] = event.ended = time.time()
        events.append(event)
    time.sleep(settle)
    return events


def redis_down(stack: LocalStack, hold: float, settle: float) -> Event:
    """The stack's redis-server stopped (SIGTERM: it saves and exits, as a
    Redis pod that is rescheduled) for `hold` seconds, then started again on
    the same port and files. Profile answers UNAVAILABLE meanwhile (Recommend
    goes without its stage), embedding serves its index and retries the
    store."""
    time.sleep(settle)
    event = Event("stage-down", "redis", time.time())
    stack.redis_server.stop()
    time.sleep(hold)
    released = time.monotonic()
    event.figures["released"] = time.time()
    stack.redis_server.start()
    event.recovery = time.monotonic() - released
    event.figures["serving"] = event.ended = time.time()
    return event


# The stage a reply says it went without: Redis down takes profile's store away.
STAGE_NUMBERS = {"embedding": gateway_pb2.STAGE_EMBEDDING, "ranking": gateway_pb2.STAGE_RANKING,
                 "profile": gateway_pb2.STAGE_PROFILE, "redis": gateway_pb2.STAGE_PROFILE}


def summarise(events: list[Event], calls: list[Call], replies_known: bool = True) -> list[Event]:
    """Each event's figures: calls that ended during it (and up to SETTLE
    after, but before the next action), failed ones, those in flight at its
    start; for a stage, when replies were whole again."""
    starts = sorted(e.began for e in events)
    for event in events:
        # Until SETTLE after it, but never into the next action's window.
        later = [began for began in starts if began > event.began]
        until = min(event.ended + SETTLE_SECONDS, later[0] if later else float("inf"))
        # By when a call ended: one in flight at the action fails after it.
        during = [c for c in calls if event.began <= c.ended < until]
        failed = [c for c in during if c.code != "OK"]
        in_flight = [c for c in calls if c.started < event.began < c.ended]
        event.figures.update(calls=len(during), failed=len(failed),
                             failed_codes=sorted({c.code for c in failed}),
                             errors=sorted({c.error for c in failed})[:5],
                             in_flight_at_start=len(in_flight),
                             ok_share=(len(during) - len(failed)) / len(during) if during else None)
        stage = STAGE_NUMBERS.get(event.target)
        # ghz reports no reply contents: skipped stages are known to the Python loop only.
        if not replies_known:
            stage = None
        if event.scenario == "stage-down" and stage is not None and "serving" in event.figures:
            # Recovery counts from the stage SERVING again (its start-up, loading
            # included, is the supervisor's "back" column).
            serving = event.figures["serving"]
            event.figures["degraded_replies"] = sum(1 for c in during if c.code == "OK" and stage in c.skipped)
            if any(c.started >= serving and c.code == "OK" and stage not in c.skipped for c in calls):
                last = max((c.started for c in calls if c.started >= serving and stage in c.skipped), default=serving)
                event.figures["whole_again_after"] = last - serving
    return events


def print_table(events: list[Event]) -> None:
    print(f"{'scenario':<11} {'target':<10} {'back (s)':>8} {'calls':>6} {'failed':>6} {'in flight':>9} "
          f"{'ok %':>7}  notes")
    for e in events:
        f = e.figures
        share = f"{100 * f['ok_share']:.2f}" if f.get("ok_share") is not None else "-"
        notes = []
        if f.get("failed_codes"):
            notes.append("codes " + ",".join(f["failed_codes"]) + ": " + " | ".join(f.get("errors", []))[:200])
        if "degraded_replies" in f:
            notes.append(f"{f['degraded_replies']} replies without it")
        if "whole_again_after" in f:
            notes.append(f"whole again {f['whole_again_after']:.2f} s after it was SERVING")
        back = f"{e.recovery:.2f}" if e.recovery is not None else "-"
        print(f"{e.scenario:<11} {e.target:<10} {back:>8} {f['calls']:>6} {f['failed']:>6} "
              f"{f['in_flight_at_start']:>9} {share:>7}  {'; '.join(notes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30.0, help="Recommend calls a second")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--encoder", choices=("triton", "onnx"), default="triton")
    parser.add_argument("--only", default="kill,rolling,stages", help="scenarios, comma-separated")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each stage stays down")
    parser.add_argument("--python-load", action="store_true", help="the Python load loop instead of ghz")
    parser.add_argument("--redis", action="store_true",
                        help="profile's store and the catalogue in a local redis-server (recsys serve --redis): "
                             "profile runs --replicas too, and Redis is one of the stages stopped")
    parser.add_argument("--edge", action="store_true",
                        help="callers reach the gateway through recsys-edge, as `recsys serve` runs it (the edge "
                             "is not restarted or killed: one process holds the public port)")
    parser.add_argument("--json", type=Path, help="also write every event's figures here")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s]
    if not args.python_load and not GHZ.is_file():
        print(f"chaos: {GHZ} is missing: scripts/install_ghz.sh, or --python-load", file=sys.stderr)
        return 1
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    state = tempfile.TemporaryDirectory(prefix="recsys-chaos-")
    stack = LocalStack(gateway_port=free_port(), state_dir=Path(state.name), encoder=args.encoder,
                       replicas=args.replicas, redis=args.redis, edge=args.edge)
    load_before = os.getloadavg()
    print(f"starting the stack: {args.replicas} replicas of each service (profile: "
          f"{stack.replica_count('profile')}), encoder {args.encoder} ...", flush=True)
    stack.start()
    events: list[Event] = []
    try:
        print(f"all SERVING; load: {args.rate:g} Recommend/s "
              f"({'Python loop' if args.python_load else 'ghz, open loop'})", flush=True)
        for scenario in scenarios:
            load = (PythonLoad(stack, args.rate) if args.python_load else GhzLoad(stack, args.rate)).start()
            try:
                if scenario == "kill":
                    done = kill_each(stack)
                elif scenario == "rolling":
                    done = rolling_restart(stack)
                elif scenario == "stages":
                    done = stages_down(stack, [s for s in STAGES if s != "triton" or stack.triton is not None],
                                       hold=args.hold)
                else:
                    raise SystemExit(f"chaos: unknown scenario {scenario!r}")
            finally:
                calls = load.stop()
            events += summarise(done, calls, replies_known=args.python_load)
            total_failed = sum(1 for c in calls if c.code != "OK")
            print(f"\n{scenario}: {len(calls)} calls, {total_failed} failed", flush=True)
            print_table(done)
    finally:
        stack.stop()
        state.cleanup()
    print(f"\nload average before {' '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps([e.__dict__ for e in events], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

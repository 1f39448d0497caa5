"""Load tests with ghz against the local stack, and a bare Python gRPC echo
server as the ceiling; reports in reports/ (what `make loadtest` runs).

    python loadtest/run.py [--rates 50,100,200,400] [--seconds 20] [--step 50:300:50:10s]
                           [--p99-target-ms 100] [--out reports] [--quick]
                           [--gateway HOST:PORT [--profile HOST:PORT] [--embedding HOST:PORT]]

Without addresses, Triton and the four services start as local processes
(recsys_cli.stack.LocalStack) on free ports with their state in a
temporary directory, so nothing of `make run`'s var/ is touched; with
--gateway (and optionally --profile, --embedding) the runs go to a stack
that is already up, e.g. a `kubectl port-forward` of the cluster's gateway.
The echo server always runs here (bench/recommend.py --echo-server).

The runs, each bounded by its duration (ghz -z) and a timeout around ghz:

  warm-up           Recommend, every message of the data file once (closed loop, 8 at a time)
  recommend-proto   Recommend at the first rate, described by the .proto files instead of reflection
  recommend-const   Recommend at each constant rate: open loop (ghz --rps with --async: requests
                    leave on schedule whatever the replies do), --seconds each
  echo-const        the echo server at the same rates, the same messages
  recommend-search  more constant rates, bisecting for the highest one whose p99 stays within
                    --p99-target-ms without errors (at most 6 probes of 15 s)
  recommend-step    a step schedule (ghz --load-schedule=step), figures per step too
  *-closed          Recommend and echo as fast as they answer, 16 calls in flight: the ceiling ratio
  similar-items, ingest-events, embed-texts   the other RPCs at a constant rate

Every run leaves ghz's JSON report and its HTML rendering (loadtest/ghzhtml:
ghz's own HTML report; ghz writes one format per run) in the output folder;
summary.md tabulates p50, p95, p99, throughput and errors by status code per
run, with the load average and the CPU that other processes took meanwhile
(the machine may be shared), and metrics/ holds each service's Prometheus
metrics scraped after the runs. Latency percentiles are ghz's, over the calls
that succeeded; errors are counted beside them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LOADTEST = REPO_ROOT / "loadtest"
CONFIGS = LOADTEST / "configs"
TOOLS = REPO_ROOT / ".tools" / "bin"
GATEWAY_PROTO = ["--proto", "protos/recsys/gateway/v1/gateway.proto", "--import-paths", "protos"]
ECHO_PROTO = ["--proto", "loadtest/echo.proto", "--import-paths", "protos,loadtest"]
OPEN_LOOP_WORKERS = 20
CLOSED_LOOP_CONCURRENCY = 16
WARMUP_CONCURRENCY = 8
SEARCH_SECONDS = 15
SEARCH_PROBES = 6
SEARCH_MAX_RATE = 1000
OTHER_RPC_SECONDS = 10
OTHER_RPC_RATES = {"similar_items": 50, "ingest_events": 50, "embed_texts": 20}
PAUSE_SECONDS = 3.0  # between runs: what the last run left queued drains
GHZ_GRACE_SECONDS = 60  # beyond a run's own duration before ghz is killed


def load_bench():
    """bench/recommend.py (not a package): its echo server and start-up helpers."""
    spec = importlib.util.spec_from_file_location("bench_recommend", REPO_ROOT / "bench" / "recommend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------- CPU accounting


def _busy_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _our_cpu_seconds() -> dict[int, float]:
    """CPU seconds of this process and every live descendant (the stack, Triton's stubs, echo)."""
    import psutil

    me = psutil.Process()
    seen = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            seen[process.pid] = times.user + times.system
        except psutil.Error:
            pass
    return seen


def _reaped_children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ghz and ghzhtml once waited for
    return usage.ru_utime + usage.ru_stime


class CpuWatch:
    """How much CPU processes other than ours took during a run, in cores
    (0.0 .. number of cores): other work on a shared machine skews latency."""

    def __enter__(self):
        self.started = time.monotonic()
        self.busy = _busy_seconds()
        self.ours = _our_cpu_seconds()
        self.reaped = _reaped_children_seconds()
        self.load = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        wall = max(time.monotonic() - self.started, 1e-6)
        busy = _busy_seconds() - self.busy
        now = _our_cpu_seconds()
        ours = sum(now[pid] - before for pid, before in self.ours.items() if pid in now)
        ours += sum(seconds for pid, seconds in now.items() if pid not in self.ours)
        ours += _reaped_children_seconds() - self.reaped
        self.ours_cores = max(ours / wall, 0.0)
        self.other_cores = max((busy - ours) / wall, 0.0)


# --------------------------------------------------------------------- ghz


@dataclass
class Run:
    name: str
    rpc: str
    schedule: str
    report: dict
    load_1m: float
    other_cores: float
    ours_cores: float
    steps: list[dict] = field(default_factory=list)

    # -- figures from ghz's JSON report ----------------------------------------

    @property
    def count(self) -> int:
        return int(self.report.get("count", 0))

    @property
    def status_codes(self) -> dict[str, int]:
        return dict(self.report.get("statusCodeDistribution") or {})

    @property
    def ok(self) -> int:
        return self.status_codes.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.status_codes.items()) if code != "OK"}

    @property
    def seconds(self) -> float:
        return self.report.get("total", 0) / 1e9

    @property
    def throughput(self) -> float:
        """Successful replies per second over the run's wall time."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: int) -> float | None:
        for entry in self.report.get("latencyDistribution") or []:
            if entry["percentage"] == q:
                return entry["latency"] / 1e6
        return None

    def as_dict(self) -> dict:
        return {
            "name": self.name, "rpc": self.rpc, "schedule": self.schedule, "requests": self.count, "ok": self.ok,
            "errors": self.errors, "p50_ms": self.percentile_ms(50), "p95_ms": self.percentile_ms(95),
            "p99_ms": self.percentile_ms(99), "throughput_rps": round(self.throughput, 2),
            "seconds": round(self.seconds, 2), "load_1m": round(self.load_1m, 2),
            "other_cpu_cores": round(self.other_cores, 2), "our_cpu_cores": round(self.ours_cores, 2),
            "steps": self.steps,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(int(round(q / 100 * len(sorted_values) + 0.5)) - 1, 0)  # nearest rank
    return sorted_values[min(rank, len(sorted_values) - 1)]


def per_step(report: dict, start: int, step: int, end: int, step_seconds: float) -> list[dict]:
    """Figures of each step of a step schedule, from ghz's per-call details
    (each call's end time and latency): a call belongs to the step it was
    sent in; throughput counts the successful replies that arrived in the step."""
    details = report.get("details") or []
    if not details:
        return []

    def ended(detail) -> float:
        return datetime.fromisoformat(detail["timestamp"].replace("Z", "+00:00")).timestamp()

    def started(detail) -> float:
        return ended(detail) - detail["latency"] / 1e9

    first = min(started(d) for d in details)
    levels = max((end - start) // step + 1, 1)

    def step_of(moment: float) -> int:
        return max(min(int((moment - first) // step_seconds), levels - 1), 0)

    sent: dict[int, list] = {}
    answered: Counter = Counter()
    for detail in details:
        sent.setdefault(step_of(started(detail)), []).append(detail)
        if detail.get("status") == "OK":
            answered[step_of(ended(detail))] += 1
    steps = []
    for index in sorted(sent):
        calls = sent[index]
        ok = sorted(d["latency"] / 1e6 for d in calls if d.get("status") == "OK")
        codes = Counter(d.get("status") or "unknown" for d in calls if d.get("status") != "OK")
        steps.append({
            "rate": start + index * step, "requests": len(calls), "ok": len(ok), "errors": dict(sorted(codes.items())),
            "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
            # The last step also collects the replies that came after the schedule ended.
            "throughput_rps": round(answered[index] / step_seconds, 2) if index < levels - 1 else None,
        })
    return steps


def token_flags(token: str | None) -> list[str]:
    if not token:
        return []
    metadata = json.dumps({"authorization": f"Bearer {token}"})
    return ["--metadata", metadata, "--reflect-metadata", metadata]


class Ghz:
    def __init__(self, ghz: Path, ghzhtml: Path | None, out: Path, security=lambda host: []):
        # The TLS and token flags for a host (the configurations carry none).
        self.security = security
        self.ghz = ghz
        self.ghzhtml = ghzhtml
        self.out = out
        self.runs: list[Run] = []

    def run(self, name: str, rpc: str, config: str, host: str, schedule: str, args: list[str],
            bound_seconds: float, check=None, keep: bool = True) -> Run:
        """One ghz run: JSON report to <out>/<name>.json, HTML beside it."""
        if check is not None:
            check()
        json_path = self.out / f"{name}.json"
        command = [str(self.ghz), "--config", str(CONFIGS / config), "-O", "json", "-o", str(json_path),
                   "--name", name, *self.security(host), *args, host]
        print(f"\n== {name}: {rpc} {schedule}", flush=True)
        print("   " + " ".join(str(c).replace(str(REPO_ROOT) + "/", "") for c in command), flush=True)
        with CpuWatch() as cpu:
            try:
                done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                      timeout=bound_seconds + GHZ_GRACE_SECONDS)
            except subprocess.TimeoutExpired as error:
                raise RuntimeError(f"ghz ({name}) did not finish within {bound_seconds + GHZ_GRACE_SECONDS:.0f}s") from error
        if done.returncode != 0 or not json_path.is_file():
            raise RuntimeError(f"ghz ({name}) failed with code {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
        report = json.loads(json_path.read_text())
        if self.ghzhtml is not None:
            html = subprocess.run([str(self.ghzhtml), str(json_path), str(json_path.with_suffix(".html"))],
                                  capture_output=True, text=True, timeout=120)
            if html.returncode != 0:
                print(f"   (no HTML report: {html.stderr.strip()})", file=sys.stderr)
        result = Run(name, rpc, schedule, report, cpu.load, cpu.other_cores, cpu.ours_cores)
        print(f"   {result.count} calls, {result.ok} OK, {fmt(result.throughput)} req/s OK; "
              f"p50 {fmt(result.percentile_ms(50))} p95 {fmt(result.percentile_ms(95))} "
              f"p99 {fmt(result.percentile_ms(99))} ms; errors {format_errors(result.errors)}; "
              f"other processes {result.other_cores:.2f} cores, load {cpu.load:.2f}", flush=True)
        if keep:
            self.runs.append(result)
        return result


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in errors.items()) or "0"


def meets(run: Run, p99_target_ms: float) -> bool:
    p99 = run.percentile_ms(99)
    return not run.errors and p99 is not None and p99 <= p99_target_ms


# --------------------------------------------------------------------- the schedule


def open_loop(rate: int, seconds: float) -> list[str]:
    return ["--async", "--rps", str(rate), "-c", str(OPEN_LOOP_WORKERS), "-z", f"{seconds:g}s"]


def parse_step(text: str) -> tuple[int, int, int, float]:
    try:
        start, end, step, duration = text.split(":")
        return int(start), int(end), int(step), float(duration.rstrip("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step takes START:END:STEP:SECONDS, e.g. 50:300:50:10s; got {text!r}") from None


def search_capacity(ghz: Ghz, gateway: str, tried: dict[int, Run], target_ms: float, probe_seconds: float,
                    check, pause) -> tuple[int | None, int | None]:
    """Highest constant rate with p99 within target and no errors: bisection
    between the best passing and the lowest failing rate tried, doubling
    upwards while nothing failed; at most SEARCH_PROBES more runs."""
    def passing():
        good = [r for r, run in tried.items() if meets(run, target_ms)]
        bad = [r for r, run in tried.items() if not meets(run, target_ms)]
        low = max(good) if good else 0
        high = min([r for r in bad if r > low], default=None)
        return low, high

    for _ in range(SEARCH_PROBES):
        low, high = passing()
        if high is None:
            if low >= SEARCH_MAX_RATE:
                break
            rate = min(low * 2 if low else 10, SEARCH_MAX_RATE)
        else:
            if high - low <= max(10, 0.1 * high):
                break
            rate = int(round((low + high) / 2 / 5) * 5) or (low + high) // 2
            if rate in tried or rate <= low or rate >= high:
                break
        pause()
        tried[rate] = ghz.run(f"recommend-search-{rate}", "Recommend", "recommend.json", gateway,
                              f"open loop {rate} req/s, {probe_seconds:g} s", open_loop(rate, probe_seconds),
                              probe_seconds, check)
    return passing()


# --------------------------------------------------------------------- reports


def scrape_metrics(addresses: dict[str, str], out: Path) -> dict[str, str]:
    """Each endpoint's /metrics text, also written to <out>/metrics/<name>.prom."""
    folder = out / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for name, address in addresses.items():
        if not name.endswith("-metrics"):
            continue
        service = name.removesuffix("-metrics")
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
                texts[service] = reply.read().decode()
        except OSError as error:
            texts[service] = f"# scrape failed: {error}\n"
        (folder / f"{service}.prom").write_text(texts[service])
    return texts


def metric_values(text: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    found[tuple(sorted(sample.labels.items()))] = sample.value
    except ValueError:
        pass
    return found


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | RPC | schedule | requests | p50 ms | p95 ms | p99 ms | throughput (OK/s) | errors by status | load 1m | other CPU (cores) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.rpc} | {run.schedule} | {run.count} | {fmt(run.percentile_ms(50))} | "
            f"{fmt(run.percentile_ms(95))} | {fmt(run.percentile_ms(99))} | {fmt(run.throughput)} | "
            f"{format_errors(run.errors)} | {run.load_1m:.2f} | {run.other_cores:.2f} |"
        )
    return lines


def step_table(run: Run) -> list[str]:
    lines = [
        "| step rate (req/s) | requests sent | p50 ms | p95 ms | p99 ms | throughput (OK replies/s in the step) | errors by status |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for step in run.steps:
        lines.append(
            f"| {step['rate']} | {step['requests']} | {fmt(step['p50_ms'])} | {fmt(step['p95_ms'])} | "
            f"{fmt(step['p99_ms'])} | {fmt(step['throughput_rps'])} | {format_errors(step['errors'])} |"
        )
    return lines


def write_summary(out: Path, context: dict, runs: list[Run], findings: list[str], step_run: Run | None,
                  metrics_lines: list[str]) -> Path:
    lines = [
        "# Load test summary",
        "",
        f"{context['date']} on {context['host']}: {context['cpus']} CPUs, Python {context['python']}, "
        f"ghz {context['ghz']}; target {context['target']}.",
        "",
        f"Load average (1, 5, 15 min) before: {context['load_before']}; after: {context['load_after']}. "
        "\"other CPU\": what processes other than this run's own (the local stack, the echo server, ghz) "
        "took meanwhile, in cores" + (" (with --gateway, the stack's processes count as other too)."
                                      if context["external"] else "."),
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings],
        "",
        "## Runs",
        "",
        "Open loop: ghz `--async --rps R` sends on schedule whatever the replies do. Closed loop: "
        f"{CLOSED_LOOP_CONCURRENCY} calls in flight, each sent when the previous one answered. Latency "
        "percentiles over successful calls (ghz); throughput = successful replies per second.",
        "",
        *table(runs),
        "",
    ]
    if step_run is not None and step_run.steps:
        lines += [f"## Step schedule, per step ({step_run.name})", "", *step_table(step_run), ""]
    if metrics_lines:
        lines += ["## Service metrics after the runs (Prometheus endpoints)", "", *metrics_lines, ""]
    lines += [
        "## Files",
        "",
        "Per run: `<run>.json` (ghz `-O json`, every call in `details`) and `<run>.html` (ghz's HTML report); "
        "`metrics/<service>.prom`: each endpoint's text after the runs; `summary.json`: these figures.",
        "",
        "Command: `" + context["command"] + "`",
        "",
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,100,200,400", help="constant rates, req/s (default 50,100,200,400)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each constant-rate run (default 20)")
    parser.add_argument("--step", type=parse_step, default=parse_step("50:300:50:10s"),
                        help="step schedule START:END:STEP:SECONDS (default 50:300:50:10s)")
    parser.add_argument("--p99-target-ms", type=float, default=100.0,
                        help="the capacity search's p99 bound (default 100)")
    parser.add_argument("--out", default=str(REPO_ROOT / "reports"), help="report folder (default reports/)")
    parser.add_argument("--ghz", default=str(TOOLS / "ghz"), help="the ghz binary (scripts/install_ghz.sh)")
    parser.add_argument("--ghzhtml", default=str(TOOLS / "ghzhtml"), help="JSON -> HTML report converter")
    parser.add_argument("--gateway", help="an already running gateway (default: start the local stack)")
    parser.add_argument("--profile", help="with --gateway: the profile service, for the IngestEvents run")
    parser.add_argument("--certs", type=Path, help="with --gateway: a `recsys certs` directory (TLS, and the admin "
                        "certificate for profile and embedding); without it, plaintext")
    parser.add_argument("--token", help="with --gateway: the bearer token to send")
    parser.add_argument("--embedding", help="with --gateway: the embedding service, for the EmbedTexts run")
    parser.add_argument("--encoder", choices=("triton", "onnx"), help="local stack's encoder (default: LocalStack's)")
    parser.add_argument("--edge", action="store_true",
                        help="the local stack with recsys-edge in front of the gateway, as `recsys serve` runs it")
    parser.add_argument("--quick", action="store_true", help="3 s per run and no capacity search: a check of the machinery")
    args = parser.parse_args(argv)
    try:
        args.rate_list = sorted({int(r) for r in args.rates.split(",") if r.strip()})
    except ValueError:
        parser.error("--rates takes comma-separated integers")
    if not args.rate_list or min(args.rate_list) < 1 or args.seconds <= 0:
        parser.error("--rates need at least one positive rate, --seconds must be positive")
    if (args.profile or args.embedding) and not args.gateway:
        parser.error("--profile and --embedding go with --gateway")
    return args


def run(args) -> int:
    from recsys_cli.stack import LocalStack, free_port

    ghz_path, ghzhtml_path = Path(args.ghz), Path(args.ghzhtml)
    if not os.access(ghz_path, os.X_OK):
        print(f"loadtest: no ghz at {ghz_path}: run scripts/install_ghz.sh (make loadtest does)", file=sys.stderr)
        return 1
    for data_file in ("recommend", "similar_items", "ingest_events", "embed_texts"):
        if not (LOADTEST / "data" / f"{data_file}.json").is_file():
            print(f"loadtest: loadtest/data/{data_file}.json is missing: run loadtest/make_data.py", file=sys.stderr)
            return 1
    out = Path(args.out).resolve()
    if out.exists():
        for stale in [*out.glob("*.json"), *out.glob("*.html"), *out.glob("metrics/*.prom"), out / "summary.md"]:
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    seconds = 3.0 if args.quick else args.seconds
    step_start, step_end, step_size, step_seconds = args.step
    if args.quick:
        step_seconds = 2.0

    bench = load_bench()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average before: {load_before} ({os.cpu_count()} CPUs)", flush=True)
    state = tempfile.TemporaryDirectory(prefix="recsys-loadtest-")
    stack = echo = None
    workers = 16
    try:
        if args.gateway:
            addresses = {"gateway": args.gateway}
            addresses.update({k: v for k, v in (("profile", args.profile), ("embedding", args.embedding)) if v})
            target = f"the stack at {args.gateway}"
        else:
            from services.gateway.config import GatewayConfig

            workers = GatewayConfig.from_env().workers
            options = {"encoder": args.encoder} if args.encoder else {}
            stack = LocalStack(gateway_port=free_port(), state_dir=Path(state.name), edge=args.edge, **options)
            print(f"starting the local stack (state in {state.name}) ...", flush=True)
            with bench.StartupProgress(stack):
                stack.start()
            addresses = dict(stack.addresses)
            target = (f"the local stack (LocalStack, encoder {stack.encoder}, bundled data, gateway "
                      f"{workers} workers{', behind recsys-edge' if args.edge else ''})")
            print("all services SERVING: " + ", ".join(f"{k} {v}" for k, v in sorted(addresses.items())), flush=True)
        echo = bench.EchoProcess(workers)
        echo.start()
        print(f"echo server ({workers} workers) at {echo.address}", flush=True)

        def check():
            if stack is not None:
                bench.ensure_running(stack, echo)
            elif echo.process is not None and echo.process.poll() is not None:
                raise RuntimeError("the echo server exited during the load test")

        def pause():
            time.sleep(0.5 if args.quick else PAUSE_SECONDS)

        if stack is not None:
            by_address = {address: name for name, address in addresses.items()}

            def security(host: str) -> list[str]:
                return stack.ghz_args(by_address[host]) if host in by_address else ["--insecure"]
        else:
            def security(host: str) -> list[str]:
                if host == echo.address:
                    return ["--insecure"]
                if args.certs is None:
                    return ["--insecure"] + token_flags(args.token)
                from recsys_cli.certs import LocalSecurity

                name = next(n for n, a in addresses.items() if a == host)
                return LocalSecurity(args.certs).ghz_args(name, token=args.token)
        ghz = Ghz(ghz_path, ghzhtml_path if os.access(ghzhtml_path, os.X_OK) else None, out, security)
        gateway = addresses["gateway"]
        first = args.rate_list[0]

        ghz.run("warm-up", "Recommend", "recommend.json", gateway,
                f"closed loop, {WARMUP_CONCURRENCY} in flight, the whole data file",
                ["-c", str(WARMUP_CONCURRENCY), "-n", str(200 if args.quick else 2000)], 120, check,
                keep=False)
        pause()
        ghz.run("recommend-proto", "Recommend", "recommend.json", gateway,
                f"open loop {first} req/s, {seconds:g} s, via .proto files", [*open_loop(first, seconds), *GATEWAY_PROTO],
                seconds, check)

        constant: dict[int, Run] = {}
        for rate in args.rate_list:
            pause()
            constant[rate] = ghz.run(f"recommend-const-{rate}", "Recommend", "recommend.json", gateway,
                                     f"open loop {rate} req/s, {seconds:g} s", open_loop(rate, seconds), seconds, check)
        echo_constant: dict[int, Run] = {}
        for rate in args.rate_list:
            pause()
            echo_constant[rate] = ghz.run(f"echo-const-{rate}", "Echo (bare Python gRPC)", "echo.json", echo.address,
                                          f"open loop {rate} req/s, {seconds:g} s", open_loop(rate, seconds),
                                          seconds, check)

        tried = dict(constant)
        if not args.quick:
            low, high = search_capacity(ghz, gateway, tried, args.p99_target_ms, SEARCH_SECONDS, check, pause)
        else:
            good = [r for r, run_ in tried.items() if meets(run_, args.p99_target_ms)]
            low = max(good) if good else 0
            high = min([r for r in tried if r > low], default=None)

        pause()
        levels = (step_end - step_start) // step_size + 1
        step_total = levels * step_seconds
        step_run = ghz.run(
            "recommend-step", "Recommend", "recommend.json", gateway,
            f"step {step_start}->{step_end} req/s by {step_size} every {step_seconds:g} s",
            ["--async", "-c", str(OPEN_LOOP_WORKERS), "--load-schedule=step", f"--load-start={step_start}",
             f"--load-end={step_end}", f"--load-step={step_size}", f"--load-step-duration={step_seconds:g}s",
             "-z", f"{step_total:g}s"],
            step_total, check)
        step_run.steps = per_step(step_run.report, step_start, step_size, step_end, step_seconds)

        closed_seconds = 3.0 if args.quick else 10.0
        closed_args = ["-c", str(CLOSED_LOOP_CONCURRENCY), "-z", f"{closed_seconds:g}s"]
        pause()
        recommend_closed = ghz.run("recommend-closed", "Recommend", "recommend.json", gateway,
                                   f"closed loop, {CLOSED_LOOP_CONCURRENCY} in flight, {closed_seconds:g} s",
                                   closed_args, closed_seconds, check)
        pause()
        echo_closed = ghz.run("echo-closed", "Echo (bare Python gRPC)", "echo.json", echo.address,
                              f"closed loop, {CLOSED_LOOP_CONCURRENCY} in flight, {closed_seconds:g} s",
                              closed_args, closed_seconds, check)

        other_seconds = 3.0 if args.quick else OTHER_RPC_SECONDS
        others = [("similar-items", "SimilarItems", "similar_items", "gateway"),
                  ("ingest-events", "IngestEvents", "ingest_events", "profile"),
                  ("embed-texts", "EmbedTexts", "embed_texts", "embedding")]
        for name, rpc, config, service in others:
            if service not in addresses:
                print(f"\n== {name}: skipped (no --{service} address)", flush=True)
                continue
            rate = OTHER_RPC_RATES[config]
            pause()
            ghz.run(name, rpc, f"{config}.json", addresses[service], f"open loop {rate} req/s, {other_seconds:g} s",
                    open_loop(rate, other_seconds), other_seconds, check)

        # ---- figures
        metrics_lines = []
        if stack is not None:
            texts = scrape_metrics(addresses, out)
            paths = metric_values(texts.get("gateway", ""), "recsys_recommendations_total")
            if paths:
                metrics_lines.append("Gateway `recsys_recommendations_total` by path: " + ", ".join(
                    f"{dict(labels)['path']} {value:.0f}" for labels, value in sorted(paths.items())))
            for service, method in (("gateway", "Recommend"), ("profile", "IngestEvents")):
                handled = metric_values(texts.get(service, ""), "grpc_server_handled_total")
                codes = {dict(l)["grpc_code"]: v for l, v in handled.items() if dict(l)["grpc_method"] == method}
                if codes:
                    metrics_lines.append(f"{service} `grpc_server_handled_total{{grpc_method=\"{method}\"}}` by code: "
                                         + ", ".join(f"{c} {v:.0f}" for c, v in sorted(codes.items())))
            ingested = metric_values(texts.get("profile", ""), "recsys_profile_events_ingested_total")
            duplicates = metric_values(texts.get("profile", ""), "recsys_profile_events_duplicates_total")
            if ingested:
                metrics_lines.append(f"profile events ingested {sum(ingested.values()):.0f}, "
                                     f"duplicates {sum(duplicates.values()):.0f}")
            metrics_lines = [f"- {line}" for line in metrics_lines]

        findings = []
        at = max(args.rate_list)
        top = constant[at]
        findings.append(
            f"Recommend at {at} req/s (open loop, {seconds:g} s): p50 {fmt(top.percentile_ms(50))} ms, "
            f"p95 {fmt(top.percentile_ms(95))} ms, p99 {fmt(top.percentile_ms(99))} ms, "
            f"{fmt(top.throughput)} OK/s, errors {format_errors(top.errors)} "
            f"(target p99 <= 50 ms: {'met' if meets(top, 50) else 'NOT met'}).")
        passing = tried.get(low)
        if low:
            findings.append(
                f"Highest constant rate tried with Recommend p99 <= {args.p99_target_ms:g} ms and no errors: "
                f"{low} req/s (p99 {fmt(passing.percentile_ms(99))} ms)"
                + (f"; {high} req/s did not make it (p99 {fmt(tried[high].percentile_ms(99))} ms, errors "
                   f"{format_errors(tried[high].errors)})." if high else f"; the search stopped at {SEARCH_MAX_RATE} req/s."))
        else:
            findings.append(f"No rate tried kept Recommend's p99 within {args.p99_target_ms:g} ms without errors "
                            f"(lowest tried: {min(tried)} req/s).")
        ratio = recommend_closed.throughput / echo_closed.throughput if echo_closed.throughput else None
        findings.append(
            f"Ceiling, closed loop with {CLOSED_LOOP_CONCURRENCY} in flight: Recommend {fmt(recommend_closed.throughput)} "
            f"OK/s (p99 {fmt(recommend_closed.percentile_ms(99))} ms) vs the bare Python echo server "
            f"{fmt(echo_closed.throughput)} OK/s (p99 {fmt(echo_closed.percentile_ms(99))} ms): ratio "
            f"{fmt(ratio, 3)}.")
        findings.append("At the constant rates, echo p99 vs Recommend p99: " + "; ".join(
            f"{rate} req/s {fmt(echo_constant[rate].percentile_ms(99))} vs {fmt(constant[rate].percentile_ms(99))} ms"
            for rate in args.rate_list) + ".")
        proto_run = next((r for r in ghz.runs if r.name == "recommend-proto"), None)
        if proto_run is not None:
            findings.append(f"Through the .proto files instead of reflection (recommend-proto): {proto_run.ok} of "
                            f"{proto_run.count} OK.")
        busiest = max(ghz.runs, key=lambda r: r.other_cores)
        findings.append(
            f"Other processes took up to {busiest.other_cores:.2f} of {os.cpu_count()} cores during a run "
            f"({busiest.name}); median over runs "
            f"{sorted(r.other_cores for r in ghz.runs)[len(ghz.runs) // 2]:.2f}. "
            + ("Figures were taken on a shared, loaded machine." if busiest.other_cores >= 0.25 else
               "The machine was otherwise quiet."))

        load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
        context = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node() or "this machine", "cpus": os.cpu_count(), "python": platform.python_version(),
            "ghz": ghz_version(ghz_path), "target": target, "load_before": load_before, "load_after": load_after,
            "external": bool(args.gateway),
            "command": " ".join(["python loadtest/run.py", *(sys.argv[1:] if argv_is_cli() else [])]),
        }
        path = write_summary(out, context, ghz.runs, findings, step_run, metrics_lines)
        (out / "summary.json").write_text(json.dumps(
            {"context": context, "findings": findings, "runs": [r.as_dict() for r in ghz.runs]}, indent=2) + "\n")
        print(f"\nload average after: {load_after}")
        print("\n" + "\n".join(f"- {line}" for line in findings))
        print(f"\nreports in {out}/ (summary: {path})")
        return 0
    finally:
        if echo is not None:
            echo.stop()
        if stack is not None:
            stack.stop()
        state.cleanup()


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).resolve() == Path(__file__).resolve()


def ghz_version(ghz: Path) -> str:
    """The module version ghz was built from (go install leaves `ghz --version` at "dev")."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    try:
        info = subprocess.run([go, "version", "-m", str(ghz)], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "unknown"
    for line in info.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "mod" and parts[1] == "github.com/bojand/ghz":
            return parts[2]
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    from recsys_cli.stack import run_script

    args = parse_args(argv)
    return run_script("loadtest/run.py", lambda: run(args), (RuntimeError, TimeoutError, OSError))


if __name__ == "__main__":
    sys.exit(main())

"""bench/abuse.py's own parts, without the stack: how it splits the CPUs
between the stack and the abusers, and what it counts as each process's CPU
and run-queue wait (the end-to-end run is in test_bench_smoke.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from recsys_core.data import paths

sys.path.insert(0, str(paths.REPO_ROOT / "bench"))
abuse = pytest.importorskip("abuse")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity and /proc are Linux's")


def test_cpu_split_reads_explicit_lists_and_none():
    assert abuse.cpu_split("none") is None
    assert abuse.cpu_split("0/1") == ({0}, {1})
    assert abuse.cpu_split("0-2/3,5-6") == ({0, 1, 2}, {3, 5, 6})
    for bad in ("0", "/1", "0/"):
        with pytest.raises(ValueError, match="STACK/ABUSERS"):
            abuse.cpu_split(bad)


def test_cpu_split_auto_gives_the_abusers_cpus_of_their_own():
    cpus = os.sched_getaffinity(0)
    split = abuse.cpu_split("auto")
    if len(cpus) < 2:
        assert split is None
        return
    stack, abusers = split
    assert stack and abusers and not stack & abusers
    assert stack | abusers == cpus


def test_a_process_started_inside_forking_on_runs_on_those_cpus_and_this_thread_moves_back():
    before = os.sched_getaffinity(0)
    one = {min(before)}
    with abuse.forking_on(one):
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert os.sched_getaffinity(child.pid) == one
        assert os.sched_getaffinity(0) == before
    finally:
        child.communicate(b"", timeout=10)
    with abuse.forking_on(None):
        assert os.sched_getaffinity(0) == before


def test_thread_group_joins_a_pools_numbered_threads():
    assert abuse.thread_group("gateway_12") == abuse.thread_group("gateway_3") == "gateway"
    assert abuse.thread_group("event_engine") == "event_engine"
    assert abuse.thread_group("python") == "python"


def test_cpu_account_tells_a_busy_process_from_an_idle_one():
    code = "import sys, time\nend = time.time() + {}\nwhile time.time() < end: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", code.format(1.5)])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        time.sleep(0.2)  # both past interpreter start-up
        account = abuse.CpuAccount({"busy": busy.pid, "idle": idle.pid}, os.sched_getaffinity(0),
                                   frozenset({"busy", "idle"}))
        time.sleep(0.6)
        figures = account.finish()
    finally:
        busy.wait(10)
        idle.wait(10)
    processes = figures["processes"]
    assert processes["busy"]["cpu_cores"] > 0.1 > processes["idle"]["cpu_cores"]
    assert processes["busy"]["runqueue_wait"] >= 0 and processes["busy"]["peak_rss_mib"] > 0
    assert processes["busy"]["threads"] and sum(processes["busy"]["threads"].values()) > 0.1
    assert 0.5 < figures["seconds"] < 5
    assert figures["machine_busy_cores"] >= processes["busy"]["cpu_cores"] - 0.05
    assert figures["cpus"] == os.cpu_count()
    pinned = figures["stack_cpus"]
    assert pinned["cpus"] == sorted(os.sched_getaffinity(0))
    assert pinned["busy_cores"] >= pinned["stack_cores"] - 0.05 and pinned["stack_cores"] > 0.1
    lines = abuse.describe_cpu(figures, threads_of=("busy",))
    assert "busy" in lines[0] and "busy: peak RSS" in lines[-1]


@pytest.mark.integration
def test_oversized_transport_bench_reports_what_the_server_received_and_spent(tmp_path):
    """bench/oversized_transport.py, small: a real TLS server with the gateway's
    options refuses every request over its limit, and the figures are there."""
    out = tmp_path / "oversized.json"
    run = subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "bench" / "oversized_transport.py"), "--senders", "2", "--mib", "1",
         "--seconds", "1", "--json", str(out)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["codes"]) == {"RESOURCE_EXHAUSTED"} and report["requests"] >= 2
    assert report["server_options"]["grpc.max_receive_message_length"] == 64 * 1024
    assert report["server_cores"] > 0 and report["server_peak_rss_mib"] > 0
    if report["bytes_received_per_request"] is not None:  # without `ss`, not counted
        assert report["bytes_received_per_request"] > 64 * 1024

"""bench/recommend.py end to end, small: the whole stack and the echo server
as real processes on the bundled data, a few requests per level."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recsys_core.data import paths

pytestmark = pytest.mark.integration

BENCH = paths.REPO_ROOT / "bench" / "recommend.py"
SERVICES = {"embedding", "profile", "ranking", "gateway"}


def test_bench_runs_both_targets_at_each_level_and_measures_every_service(tmp_path, exported_encoder):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "30", "--concurrency", "1,2", "--seconds", "10", "--json", str(out),
         "--idle-streams", "200"],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["data"]["path"] == str(paths.BUNDLED_DATA_DIR.resolve())
    levels = {level["concurrency"]: level for level in report["levels"]}
    assert set(levels) == {1, 2}
    for level in levels.values():
        assert level["recommend"]["throughput_rps"] > 0
        assert level["echo"]["throughput_rps"] > 0
        assert level["recommend"]["error_count"] == 0, level["recommend"]["errors"]
        assert level["recommend"]["errors"] == {}
        assert level["recommend"]["ok"] == 30
        assert level["throughput_ratio"] > 0
        # Recommend measured again with 200 Watch streams open, and after.
        streams = level["idle_streams"]
        assert streams["count"] == 200
        for phase in ("with_streams", "after_streams"):
            assert streams[phase]["ok"] == 30 and streams[phase]["errors"] == {}, (phase, streams[phase]["errors"])
        assert streams["p99_ratio"] > 0

    # The four services, and Triton when the stack's encoder runs there.
    assert SERVICES <= set(report["memory_mib"]) <= SERVICES | {"triton"}
    for name, mib in report["memory_mib"].items():
        assert mib > 0, name
    assert report["memory_total_mib"] > 0


def test_hops_bench_counts_four_calls_in_four_steps_and_one_for_cold_start(tmp_path, exported_encoder):
    """bench/hops.py end to end, small; its figures also pin the call plan:
    a known shopper costs four calls one after another, an unknown one one."""
    out = tmp_path / "hops.json"
    run = subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "bench" / "hops.py"), "--per-kind", "2", "--json", str(out)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    personalised = results["personalised"]
    assert (personalised["calls"], personalised["levels"]) == (4, 4)
    assert set(personalised["methods"]) == {"GetShopperSignals", "RetrieveCandidates", "GetItemPopularity", "Rank"}
    # No vector travels to ranking: per candidate, Rank carries an id and a
    # few numbers, GetItemPopularity the id alone (one 384-float vector
    # each would make Rank over 100 times larger).
    methods = personalised["methods"]
    assert methods["Rank"]["request"] < 10 * methods["GetItemPopularity"]["request"]
    cold = results["cold start"]
    assert (cold["calls"], cold["levels"], set(cold["methods"])) == (1, 1, {"GetShopperSignals"})
    assert cold["paths"] == {"2": 2}  # RECOMMENDATION_PATH_COLD_START, both


def test_abuse_bench_measures_recommend_quiet_and_abused(tmp_path, exported_encoder):
    """bench/abuse.py end to end, small: Recommend answers throughout, and
    every oversized request is refused with RESOURCE_EXHAUSTED."""
    out = tmp_path / "abuse.json"
    run = subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "bench" / "abuse.py"), "--requests", "20", "--concurrency", "2",
         "--seconds", "10", "--idle-streams", "150", "--oversized", "10", "--oversized-mib", "5", "--json", str(out)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    for phase in ("quiet", "abused", "quiet_again"):
        assert report[phase]["ok"] == 20 and report[phase]["errors"] == {}, (phase, report[phase]["errors"])
    assert set(report["oversized_codes"]) == {"RESOURCE_EXHAUSTED"} and report["oversized_codes"]["RESOURCE_EXHAUSTED"] >= 10
    assert report["p99_ratio"] > 0 and report["p99_quiet_ms"] > 0
    # Where the CPU went: the abusers' processes are counted beside the stack's.
    abused_cpu = report["abused"]["cpu"]["processes"]
    assert {"edge", "gateway", "embedding", "profile", "ranking", "client", "idle-holder",
            "oversized-sender"} <= set(abused_cpu)
    assert abused_cpu["oversized-sender"]["cpu_cores"] > 0 and abused_cpu["gateway"]["threads"]
    if "public_port_mib_received_per_s" in report["abused"]:  # without `ss`, not counted
        assert report["abused"]["public_port_mib_received_per_s"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        stack_cpus, abuser_cpus = report["pinning"]["stack_and_client"], report["pinning"]["abusers"]
        assert stack_cpus and abuser_cpus and not set(stack_cpus) & set(abuser_cpus)

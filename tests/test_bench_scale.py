"""bench/scale.py end to end, small: one 20,000-item synthetic catalogue
(the global scope just reaches HNSW, categories stay flat), few queries."""
from __future__ import annotations

import json
import subprocess
import sys

from recsys_core.data import paths

BENCH = paths.REPO_ROOT / "bench" / "scale.py"


def test_scale_bench_reports_each_size_with_recall_latency_memory_and_kinds(tmp_path):
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "5000,20000", "--categories", "4", "--queries", "60",
         "--warmup", "5", "--recall-queries", "30", "--json", str(out), "--plot", str(png)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())

    assert "failed" not in report
    assert [s["items"] for s in report["sizes"]] == [5000, 20000]
    for size in report["sizes"]:
        # One scope over everything plus one per category, each with the kind auto chose for its size.
        assert set(size["scope_kinds"]) == {"all", "cat0", "cat1", "cat2", "cat3"}
        assert size["build_s"] >= 0 and size["rss_peak_mib"] > 0 and size["rss_anon_index_mib"] > 0
        assert size["queries_timed"] == 55 and size["recall_queries"] == 30
        for scope in ("global", "category"):
            latency = size["latency"][scope]
            assert 0 < latency["p50_ms"] <= latency["p99_ms"]
            recall = size["recall@100"][scope]
            assert 0 < recall["min"] <= recall["mean"] <= 1
    small, large = report["sizes"]
    assert set(small["scope_kinds"].values()) == {"flat"}
    assert large["scope_kinds"]["all"] == "hnsw"
    # Exact scopes are exact: recall against brute force is 1 there.
    assert small["recall@100"]["global"]["mean"] == 1.0
    assert large["recall@100"]["category"]["mean"] == 1.0
    assert set(report["targets"]) >= {"global_p99_ratio", "category_p99_ratio", "recall_at_least_0.95"}
    assert png.stat().st_size > 0

    # Reports of separate runs combine into one JSON and plot.
    merged_json, merged_png = tmp_path / "merged.json", tmp_path / "merged.png"
    merge = subprocess.run(
        [sys.executable, str(BENCH), "--merge", f"{out},{out}", "--json", str(merged_json), "--plot", str(merged_png)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    merged = json.loads(merged_json.read_text())
    assert [s["items"] for s in merged["sizes"]] == [5000, 5000, 20000, 20000]
    assert all(s["command"] == report["command"] for s in merged["sizes"])
    assert merged_png.stat().st_size > 0

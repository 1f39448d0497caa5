"""The interest evaluation (recsys evaluate-interests) on the bundled Beauty
subset with a two-point settings grid: it runs, its subsets partition the
shoppers, and its baseline agrees with the published-protocol evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from recsys_core.data import paths
from recsys_core.signals.interests import ClusterSettings, DriftSettings
from training import interests_eval, protocol
from training.baselines import zero_shot_scorer


@pytest.fixture(scope="module")
def work(exported_encoder):
    return interests_eval.load_workload(paths.BUNDLED_DATA_DIR, "Beauty")


def test_drift_report_partitions_shoppers_and_matches_the_protocol(work, monkeypatch):
    monkeypatch.setattr(interests_eval, "DRIFT_GRID", {"short_share_stable": (0.375, 0.65)})
    report = interests_eval.evaluate_drift(work)
    shoppers = report["shoppers"]
    assert shoppers["off_dominant"] + shoppers["on_dominant"] == shoppers["all"] == len(work.split.users)
    assert report["settings_tried"] == 2
    plain_name = next(name for name in report["all"] if name.startswith("plain"))
    assert report["all"][plain_name] == protocol.evaluate(zero_shot_scorer(work.split, work.vectors), work.split)
    for group in ("off_dominant", "on_dominant", "all"):
        difference = report["drift_minus_plain"][group]["recall@10"]
        low, high = difference["ci95"]
        assert low <= difference["difference"] <= high
        drift = report[group]["drift-aware"]["recall@10"]
        assert difference["difference"] == pytest.approx(drift - report[group][plain_name]["recall@10"])
    # The off-dominant subset is where the target's interest category differs from the history's most frequent one.
    off = interests_eval.off_dominant(work, "test")
    first = int(np.flatnonzero(off)[0])
    history, target = work.split.inputs("test")[first], work.split.targets("test")[first]
    assert work.interest_of[target] != interests_eval.dominant_interest(history, work.interest_of)


def test_spread_lists_trade_a_little_accuracy_for_coverage(work):
    report = interests_eval.evaluate_spread(work, DriftSettings(), ClusterSettings(), explore=2, shoppers=300)
    plain, spread, explored = report["plain"], report["spread"], report["spread + explore"]
    assert explored["category_coverage"] > plain["category_coverage"]
    assert explored["intra_list_diversity"] > plain["intra_list_diversity"]
    for entry in (plain, spread, explored):
        assert 0 <= entry["ndcg@10"] <= entry["recall@10"] <= 1
        assert 1 <= entry["category_coverage"] <= 10


def test_dominant_interest_breaks_ties_toward_the_most_recent():
    interest_of = np.array([0, 1, 2])
    assert interests_eval.dominant_interest(np.array([0, 1]), interest_of) == 1
    assert interests_eval.dominant_interest(np.array([0, 0, 1]), interest_of) == 0

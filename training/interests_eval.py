"""Measures the interest signals of recsys_core/signals/interests.py on the published
protocol (leave-one-out by seq, full ranking): drift-aware shopper vectors
against the plain recency-weighted one, and lists spread across interest
clusters against the plain list.

    recsys evaluate-interests [--data DIR] [--category Beauty] [--json PATH]

Settings are chosen on the validation targets only; test figures are read
once, with the chosen settings. The item vectors are the pretrained encoder's,
the ones serving uses.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from recsys_core.data import shopping, paths
from recsys_core.signals.interests import (
    ClusterSettings,
    DriftSettings,
    cluster_interests,
    interest_category,
    intra_list_diversity,
    measure_drift,
    recency_weights,
    short_term_share,
    spread,
    unit_mix,
)
from training import protocol
from training.baselines import ZERO_SHOT_DECAY, zero_shot_scorer
from training.items import default_encoder, split_item_vectors

log = logging.getLogger(__name__)

# What the settings search tries (validation targets only).
DRIFT_GRID = {
    "recent_events": (3, 5),
    "min_past_events": (2, 5),
    "long_decay": (0.05, 0.15),
    "short_decay": (0.6, 1.0, 1.5),
    "short_share_stable": (0.375, 0.5, 0.65),
    "short_share_drifting": (1.0,),
}
BOOTSTRAP_ROUNDS = 2000
LIST_LENGTH = 10
CANDIDATES = 200


@dataclass(frozen=True)
class Workload:
    split: protocol.CategorySplit
    vectors: np.ndarray  # unit item vectors, one row per split item
    interest_of: np.ndarray  # interest category index per item
    interest_names: list[str]


def load_workload(data_dir: Path, category: str) -> Workload:
    dataset = shopping.Dataset.load(data_dir)
    return workload_of(protocol.category_split(dataset.interactions, dataset.items, category), dataset.items)


def workload_of(split: protocol.CategorySplit, items) -> Workload:
    """A split's items with the pretrained encoder's vectors and interest categories."""
    return workload_with(split, items, split_item_vectors(split, items, default_encoder()))


def workload_with(split: protocol.CategorySplit, items, vectors: np.ndarray) -> Workload:
    """A split's items with these vectors (unit rows, one per split item) and their interest categories."""
    category = split.category
    info = items.set_index("item_id")
    names = [
        interest_category(info.at[i, "category"], info.at[i, "category_path"]) if i in info.index else category
        for i in split.item_ids
    ]
    interest_names = sorted(set(names))
    index = {name: position for position, name in enumerate(interest_names)}
    return Workload(split, vectors, np.asarray([index[n] for n in names]), interest_names)


def dominant_interest(history: np.ndarray, interest_of: np.ndarray) -> int:
    """The history's most frequent interest category; ties go to the most recent."""
    counts = Counter(interest_of[history].tolist())
    best = max(counts.values())
    for item in history[::-1]:
        if counts[interest_of[item]] == best:
            return int(interest_of[item])
    raise ValueError("empty history")


def off_dominant(work: Workload, stage: str) -> np.ndarray:
    """Shoppers whose target lies outside their long-term dominant interest."""
    return np.asarray([
        work.interest_of[target] != dominant_interest(history, work.interest_of)
        for history, target in zip(work.split.inputs(stage), work.split.targets(stage))
    ])


def drift_aware_query(history: np.ndarray, work: Workload, settings: DriftSettings) -> np.ndarray:
    """The shopper's query as serving forms it: long- and short-term interest
    mixed with the short-term share that the drift score sets."""
    vectors = work.vectors[history]
    evidence = np.ones(len(history))
    names = [work.interest_names[i] for i in work.interest_of[history]]
    drift = measure_drift(vectors, evidence, names, settings)
    share = short_term_share(drift.score, settings) if drift.enough_history else settings.short_share_stable
    long_term = unit_mix(vectors, recency_weights(len(history), settings.long_decay))
    short_term = unit_mix(vectors, recency_weights(len(history), settings.short_decay))
    return (1.0 - share) * long_term + share * short_term


def query_scorer(work: Workload, settings: DriftSettings):
    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([drift_aware_query(h, work, settings) for h in histories]) @ work.vectors.T

    return score


def static_settings(settings: DriftSettings) -> DriftSettings:
    """The same mix with drift switched off: the short-term share stays at its stable value."""
    return replace(settings, short_share_drifting=settings.short_share_stable)


def subset_ranks(scorer, work: Workload, stage: str, mask: np.ndarray) -> np.ndarray:
    histories = [h for h, keep in zip(work.split.inputs(stage), mask) if keep]
    return protocol.target_ranks(scorer, histories, work.split.targets(stage)[mask])


def subset_metrics(scorer, work: Workload, stage: str, mask: np.ndarray) -> dict[str, float]:
    return protocol.metrics_from_ranks(subset_ranks(scorer, work, stage, mask))


def paired_difference(ranks: np.ndarray, baseline_ranks: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Recall@10 and NDCG@10 of one scorer minus another on the same shoppers,
    with 95% bootstrap intervals (shoppers resampled, pairs kept)."""
    rng = np.random.default_rng(seed)
    per_shopper = {
        "recall@10": (ranks < 10).astype(float) - (baseline_ranks < 10),
        "ndcg@10": (ranks < 10) / np.log2(ranks + 2) - (baseline_ranks < 10) / np.log2(baseline_ranks + 2),
    }
    result = {}
    for name, difference in per_shopper.items():
        draws = rng.integers(0, len(difference), size=(BOOTSTRAP_ROUNDS, len(difference)))
        means = difference[draws].mean(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
        result[name] = {"difference": float(difference.mean()), "ci95": [float(low), float(high)]}
    return result


def evaluate_drift(work: Workload) -> dict:
    valid_mask = off_dominant(work, "valid")
    test_mask = off_dominant(work, "test")
    log.info("off-dominant shoppers: %d of %d (valid), %d (test)", valid_mask.sum(), len(valid_mask), test_mask.sum())
    base = DriftSettings()
    tried = []
    keys = list(DRIFT_GRID)
    for values in itertools.product(*(DRIFT_GRID[key] for key in keys)):
        settings = replace(base, **dict(zip(keys, values)))
        if settings.short_share_drifting <= settings.short_share_stable:
            continue
        metrics = subset_metrics(query_scorer(work, settings), work, "valid", valid_mask)
        tried.append((metrics["recall@10"], metrics["ndcg@10"], settings))
        log.info("valid %s: recall@10 %.4f", dict(zip(keys, values)), metrics["recall@10"])
    _, _, chosen = max(tried, key=lambda entry: (entry[0], entry[1]))
    # The flag marks about the top quarter of shoppers with enough history.
    chosen = replace(chosen, threshold=base.threshold)
    plain = zero_shot_scorer(work.split, work.vectors, ZERO_SHOT_DECAY)
    report = {"chosen_settings": asdict(chosen), "settings_tried": len(tried), "shoppers": {}, "drift_minus_plain": {}}
    everyone = np.ones(len(test_mask), dtype=bool)
    for name, mask in (("off_dominant", test_mask), ("on_dominant", ~test_mask), ("all", everyone)):
        report["shoppers"][name] = int(mask.sum())
        plain_ranks = subset_ranks(plain, work, "test", mask)
        drift_ranks = subset_ranks(query_scorer(work, chosen), work, "test", mask)
        report[name] = {
            f"plain recency-weighted (e^-{ZERO_SHOT_DECAY}·age)": protocol.metrics_from_ranks(plain_ranks),
            "drift-aware": protocol.metrics_from_ranks(drift_ranks),
        }
        report["drift_minus_plain"][name] = paired_difference(drift_ranks, plain_ranks)
        static_ranks = subset_ranks(query_scorer(work, static_settings(chosen)), work, "test", mask)
        report[name]["long+short mix, no drift"] = protocol.metrics_from_ranks(static_ranks)
        report.setdefault("drift_minus_static", {})[name] = paired_difference(drift_ranks, static_ranks)
    report["drift_scores"] = drift_score_summary(work, chosen)
    return report


def drift_score_summary(work: Workload, settings: DriftSettings) -> dict:
    scores, is_off_list, flagged_off, flagged_on = [], [], [], []
    off = off_dominant(work, "test")
    for history, is_off in zip(work.split.inputs("test"), off):
        names = [work.interest_names[i] for i in work.interest_of[history]]
        drift = measure_drift(work.vectors[history], np.ones(len(history)), names, settings)
        if drift.enough_history:
            scores.append(drift.score)
            is_off_list.append(bool(is_off))
            (flagged_off if is_off else flagged_on).append(drift.drifting)
    scores = np.asarray(scores)
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([np.ones(len(flagged_off)), np.zeros(len(flagged_on))])
    ordered = np.concatenate([[s for s, o in zip(scores, is_off_list) if o], [s for s, o in zip(scores, is_off_list) if not o]])
    return {
        "auc_off_dominant_target": float(roc_auc_score(labels, ordered)) if 0 < labels.mean() < 1 else None,
        "shoppers_with_enough_history": int(len(scores)),
        "quantiles": {q: float(np.quantile(scores, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "flagged_share": float(np.mean(scores >= settings.threshold)),
        "flagged_share_off_dominant": float(np.mean(flagged_off)) if flagged_off else 0.0,
        "flagged_share_on_dominant": float(np.mean(flagged_on)) if flagged_on else 0.0,
        "histogram": np.histogram(scores, bins=20, range=(0, 1))[0].tolist(),
    }


# -- clusters and spread lists ------------------------------------------------------


CLUSTER_SWEEP = {"average": (0.4, 0.5, 0.6, 0.7), "ward": (0.8, 1.0, 1.2, 1.5)}


def cluster_agreement(work: Workload, settings: ClusterSettings, histories: Sequence[np.ndarray]) -> dict:
    """How well clusters follow the category tree, which they never see:
    adjusted mutual information between a shopper's clusters and their items'
    interest categories (0 = chance, 1 = the same partition), and purity
    (share of a cluster's items in its majority category)."""
    from sklearn.metrics import adjusted_mutual_info_score

    pure, total, counts, agreement = 0, 0, [], []
    for history in histories:
        clusters = cluster_interests(work.vectors[history], np.ones(len(history)), settings)
        counts.append(len(clusters))
        labels = np.zeros(len(history), dtype=int)
        for number, cluster in enumerate(clusters):
            labels[cluster.members] = number
            names = Counter(work.interest_of[history[cluster.members]].tolist())
            pure += max(names.values())
            total += len(cluster.members)
        agreement.append(adjusted_mutual_info_score(work.interest_of[history], labels))
    categories = [len(set(work.interest_of[h].tolist())) for h in histories]
    return {"ami": float(np.mean(agreement)), "purity": pure / total, "clusters_per_shopper": float(np.mean(counts)),
            "categories_per_shopper": float(np.mean(categories)), "shoppers": len(histories)}


def cluster_sweep(work: Workload, shoppers: int = 1500, min_events: int = 10) -> dict:
    """Cluster settings against the category tree, on shoppers with enough history to have several interests."""
    histories = [h for h in work.split.inputs("test") if len(h) >= min_events][:shoppers]
    return {
        f"{method} {distance}": cluster_agreement(work, ClusterSettings(linkage=method, distance=distance), histories)
        for method, distances in CLUSTER_SWEEP.items()
        for distance in distances
    }


def evaluate_spread(work: Workload, drift: DriftSettings, clusters: ClusterSettings, explore: int,
                    shoppers: int, seed: int = 0) -> dict:
    """Top-10 lists from the serving query, plain and spread across the
    shopper's interest clusters (with `explore` slots for interest
    categories the shopper never touched), on the test targets."""
    rng = np.random.default_rng(seed)
    histories = work.split.inputs("test")
    targets = work.split.targets("test")
    chosen = rng.choice(len(histories), size=min(shoppers, len(histories)), replace=False)
    lists = {"plain": [], "spread": [], "spread + explore": []}
    for index in chosen:
        history = histories[index]
        scores = work.vectors @ drift_aware_query(history, work, drift)
        scores[history] = -np.inf
        pool = np.argsort(-scores)[:CANDIDATES]
        found = cluster_interests(work.vectors[history], np.ones(len(history)), clusters)
        centroids = np.stack([c.centroid for c in found])
        weights = np.asarray([c.weight for c in found])
        touched = set(work.interest_of[history].tolist())
        novel = np.asarray([work.interest_of[i] not in touched for i in pool])
        lists["plain"].append(pool[:LIST_LENGTH])
        lists["spread"].append(pool[spread(scores[pool], work.vectors[pool], centroids, weights, LIST_LENGTH)])
        lists["spread + explore"].append(
            pool[spread(scores[pool], work.vectors[pool], centroids, weights, LIST_LENGTH, explore, novel)])
    report = {"shoppers": int(len(chosen)), "explore_slots": explore}
    for name, recommended in lists.items():
        hits = [np.flatnonzero(r == t) for r, t in zip(recommended, targets[chosen])]
        report[name] = {
            "recall@10": float(np.mean([len(h) > 0 for h in hits])),
            "ndcg@10": float(np.mean([1.0 / np.log2(h[0] + 2) if len(h) else 0.0 for h in hits])),
            "category_coverage": float(np.mean([len(set(work.interest_of[r].tolist())) for r in recommended])),
            "intra_list_diversity": float(np.mean([intra_list_diversity(work.vectors[r]) for r in recommended])),
        }
    return report


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    drift = report["drift"]
    groups = ["off_dominant", "on_dominant", "all"]
    models = list(drift["all"])
    width = 0.8 / len(models)
    for position, model in enumerate(models):
        axes[0].bar(np.arange(len(groups)) + position * width, [drift[g][model]["recall@10"] for g in groups],
                    width, label=model)
    axes[0].set_xticks(np.arange(len(groups)) + width * (len(models) - 1) / 2)
    axes[0].set_xticklabels([f"{g}\n({drift['shoppers'][g]} shoppers)" for g in groups])
    axes[0].set_ylabel("Recall@10 (test)")
    axes[0].set_title("Drift-aware shopper vector")
    axes[0].legend(fontsize=8)
    histogram = drift["drift_scores"]["histogram"]
    axes[1].bar(np.linspace(0.025, 0.975, len(histogram)), histogram, width=0.045)
    axes[1].axvline(drift["chosen_settings"]["threshold"], color="red", linestyle="--", label="flag threshold")
    axes[1].set_xlabel("drift score")
    axes[1].set_ylabel("shoppers")
    axes[1].set_title("Drift scores")
    axes[1].legend()
    spread_report = report["spread"]
    names = [n for n in spread_report if isinstance(spread_report[n], dict)]
    for name in names:
        entry = spread_report[name]
        axes[2].scatter(entry["category_coverage"], entry["recall@10"], s=80, label=name)
    axes[2].set_xlabel("interest categories in the top 10")
    axes[2].set_ylabel("Recall@10 (test)")
    axes[2].set_title("Spreading across interest clusters")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys evaluate-interests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="amazon-2014 schema directory (default: ../shared/data/amazon-2014 if present, else the bundled subset)")
    parser.add_argument("--category", default="Beauty")
    parser.add_argument("--spread-shoppers", type=int, default=5000)
    parser.add_argument("--explore", type=int, default=2, help="exploration slots in a top-10 list")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data_dir = args.data or (paths.shared_data_dir() if paths.shared_data_dir().is_dir() else paths.BUNDLED_DATA_DIR)
    started = time.monotonic()
    work = load_workload(data_dir, args.category)
    drift = evaluate_drift(work)
    chosen_drift = DriftSettings(**drift["chosen_settings"])
    report = {
        "data": str(data_dir),
        "category": args.category,
        "drift": drift,
        "clusters": {"chosen": f"{ClusterSettings.linkage} {ClusterSettings.distance}", "sweep": cluster_sweep(work)},
        "spread": evaluate_spread(work, chosen_drift, ClusterSettings(), args.explore, args.spread_shoppers),
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.plot:
        plot(report, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

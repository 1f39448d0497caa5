"""`recsys value-curve`: the value-aware ranking objective's trade-off, NDCG@10
against the value of what is shown, at several value weights (docs/results.md,
"Value-aware ranking").

Objective (recsys_core/ranking/scoring.py): the ranking service's score plus
w_value * the item's value, the value being the shrunk share of the item's
purchases after which the shopper bought again on a later occasion
(recsys_core/signals/item_value.py). The value measure is value@10: the
mean item value of the ten items shown (history left out), per shopper, on
average; beside it NDCG@10 of the held-out item, on the published protocol
(training/protocol.py).

Data. A category of the Amazon data as published; the UCI Online Retail
invoices as next-item sequences: per customer, each item at its first
purchase (a recommender shows what the shopper has not bought), in invoice
time order, a customer with 3 or more distinct items kept, and the same
leave-one-out as Amazon (last item test, the one before validation).
Popularity, co-purchase counts and item values all come from the training
part of each sequence (all but the last two items), for validation and test
alike, so no held-out item is in any of them.

The weight is chosen on validation targets only: the largest swept weight
whose NDCG@10 is within MAX_NDCG_LOSS (relative) of weight 0 on every data
set; test figures are then read at weight 0 and at the chosen weight.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from recsys_core.data import paths, retail, shopping
from recsys_core.ranking.scoring import SERVING_WEIGHTS, add_value
from recsys_core.signals.copurchase import CoPurchases
from recsys_core.signals.item_value import ItemValues, purchase_counts, return_shares, shrunk
from training import crosscat, protocol
from training.interests_eval import paired_difference

log = logging.getLogger(__name__)

WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# The NDCG@10 a shop gives up for value, relative to the plain order.
MAX_NDCG_LOSS = 0.02
K = 10
BATCH = 256
RESULTS = paths.REPO_ROOT / "docs" / "results" / "value_curve.json"
PLOT = paths.REPO_ROOT / "docs" / "results-value.png"
ITEM_VALUES = paths.REPO_ROOT / "var" / "item_values.json"


@dataclass(frozen=True)
class Workload:
    name: str
    split: protocol.CategorySplit
    index: CoPurchases
    vectors: np.ndarray
    values: np.ndarray  # per item of the split, 0..1
    rows: np.ndarray  # the shoppers measured (positions in split.users)


def retail_interactions(retail_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) in the amazon-2014 schema, plus each event's
    `occasion` (its invoice's position among the customer's invoices)."""
    lines, _ = retail.clean(retail.load_transactions(retail_dir))
    items = shopping.with_text(retail.retail_items(lines))
    events = retail.retail_events(lines)
    first = events[events.amount > 0].drop_duplicates(["user_id", "item_id"], keep="first").copy()
    first["seq"] = first.groupby("user_id").cumcount()
    new_invoice = (first.order_id != first.order_id.shift()) | (first.user_id != first.user_id.shift())
    first["occasion"] = new_invoice.astype(int).groupby(first.user_id).cumsum() - 1
    first["rating"] = np.nan
    return items, first.reset_index(drop=True)


def occasions_of(split: protocol.CategorySplit, interactions: pd.DataFrame) -> list[np.ndarray]:
    """Each split sequence's occasions, parallel to it."""
    by_user = {user: group.sort_values("seq").occasion.to_numpy()
               for user, group in interactions[interactions.user_id.isin(set(split.users))].groupby("user_id")}
    return [by_user[user] for user in split.users]


def measured_rows(split: protocol.CategorySplit, max_users: int, seed: int) -> np.ndarray:
    rows = np.arange(len(split.users))
    if 0 < max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    return rows


def workload(name: str, items: pd.DataFrame, interactions: pd.DataFrame, category: str, encoder,
             max_users: int = 0, seed: int = 0, with_occasions: bool = False) -> Workload:
    from training.items import split_item_vectors

    split = protocol.category_split(interactions, items, category)
    training = split.training_sequences()
    occasions = [o[:-2] for o in occasions_of(split, interactions)] if with_occasions else None
    values = return_shares(training, split.num_items, occasions)
    vectors = split_item_vectors(split, items, encoder, show_progress=False)
    index = crosscat.training_copurchases(interactions[interactions.category == category])
    return Workload(name, split, index, vectors, values, measured_rows(split, max_users, seed))


def measure(work: Workload, weights: Sequence[float], stage: str,
            progress: bool = True) -> tuple[dict[float, dict], dict[float, np.ndarray]]:
    """NDCG@10, Recall@10 and value@10 at each value weight, with the ranking
    service's scoring function (crosscat.category_scorer with the serving
    weights, then add_value at each weight)."""
    histories = work.split.inputs(stage)
    targets = work.split.targets(stage)
    users = work.split.users
    # The rest of the score does not depend on the value weight: scored once
    # per shopper, the value term added at each weight by serving's own add_value.
    relevance = crosscat.category_scorer(work.split, work.index, work.vectors, replace(SERVING_WEIGHTS, value=0.0))
    values = work.values.astype(np.float32)
    ranks = {w: [] for w in weights}
    shown_value = {w: [] for w in weights}
    batches = range(0, len(work.rows), BATCH)
    for start in tqdm(batches, desc=f"{work.name} {stage}", unit="batch", disable=not progress):
        rows = work.rows[start:start + BATCH]
        batch_histories = [histories[r] for r in rows]
        batch_users = [users[r] for r in rows]
        plain = np.asarray(relevance(batch_histories, batch_users), dtype=np.float32)
        for w in weights:
            scores = add_value(plain.copy(), values, w)
            ranks[w].append(protocol.target_ranks(lambda _h, s=scores: s, batch_histories, targets[rows],
                                                  batch=len(rows)))
            shown = np.array(scores, dtype=np.float64)
            for row, history in enumerate(batch_histories):
                shown[row, history] = -np.inf
            top = np.argsort(-shown, axis=1, kind="stable")[:, :K]
            shown_value[w].append(work.values[top].mean(axis=1))
    result, per_shopper = {}, {}
    for w in weights:
        per_shopper[w] = np.concatenate(ranks[w])
        metrics = protocol.metrics_from_ranks(per_shopper[w])
        result[w] = {"ndcg@10": metrics["ndcg@10"], "recall@10": metrics["recall@10"],
                     "value@10": float(np.concatenate(shown_value[w]).mean()), "users": metrics["users"]}
    return result, per_shopper


def with_intervals(metrics: dict[float, dict], ranks: dict[float, np.ndarray]) -> dict[float, dict]:
    """Each weight's NDCG@10 change against weight 0 on the same shoppers,
    with its 95 % bootstrap interval (shoppers resampled, pairs kept): how
    much of a 1 or 2 % change is noise."""
    out = {}
    for w, m in metrics.items():
        change = paired_difference(ranks[w], ranks[0.0])["ndcg@10"]
        out[w] = {**m, "ndcg@10_change": change["difference"], "ndcg@10_change_ci95": change["ci95"]}
    return out


def choose(curves: dict[str, dict[float, dict]], max_loss: float = MAX_NDCG_LOSS) -> float:
    """The largest weight whose validation NDCG@10 is within `max_loss` of
    weight 0's on every data set (0 when none is)."""
    allowed = [w for w in sorted(next(iter(curves.values())))
               if all(curve[w]["ndcg@10"] >= (1 - max_loss) * curve[0.0]["ndcg@10"] for curve in curves.values())]
    return max(allowed, default=0.0)


def run(workloads: Sequence[Workload], weights: Sequence[float] = WEIGHTS, progress: bool = True) -> dict:
    weights = sorted(set(weights) | {0.0})
    valid = {work.name: with_intervals(*measure(work, weights, "valid", progress)) for work in workloads}
    chosen = choose(valid)
    test = {work.name: with_intervals(*measure(work, sorted({0.0, chosen}), "test", progress)) for work in workloads}
    return {
        "objective": "score = ranking service score + w * item value; item value = shrunk share of the item's "
                     "purchases followed by another purchase on a later occasion (training events only)",
        "rule": f"largest w with validation NDCG@10 >= (1 - {MAX_NDCG_LOSS:g}) x that at w = 0 on every data set",
        "chosen_weight": chosen,
        "data": {work.name: {"users_measured": int(len(work.rows)), "shoppers": len(work.split.users),
                             "items": work.split.num_items,
                             "valid": {str(w): rounded(m) for w, m in valid[work.name].items()},
                             "test": {str(w): rounded(m) for w, m in test[work.name].items()}}
                 for work in workloads},
    }


def markdown(report: dict) -> str:
    """The validation curve and the test figures, as docs/results.md shows them."""
    names = list(report["data"])
    head = "| w | " + " | ".join(f"{n} NDCG@10 | {n} value@10" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for w in report["data"][names[0]]["valid"]:
        cells = []
        for n in names:
            valid = report["data"][n]["valid"]
            base, row = valid["0.0"], valid[w]
            interval = ""
            if "ndcg@10_change_ci95" in row and float(w):
                low, high = (100 * x / base["ndcg@10"] for x in row["ndcg@10_change_ci95"])
                interval = f", {low:+.1f} to {high:+.1f}"
            cells.append(f"{row['ndcg@10']:.4f} ({100 * (row['ndcg@10'] / base['ndcg@10'] - 1):+.1f} %{interval})")
            cells.append(f"{row['value@10']:.4f} ({row['value@10'] - base['value@10']:+.4f})")
        chosen = " (chosen)" if float(w) == float(report["chosen_weight"]) else ""
        lines.append(f"| {float(w):g}{chosen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rounded(metrics: dict) -> dict:
    def one(v):
        return round(v, 6) if isinstance(v, float) else [one(x) for x in v] if isinstance(v, list) else v

    return {k: one(v) for k, v in metrics.items()}


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["data"])
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        valid = report["data"][name]["valid"]
        weights = [float(w) for w in valid]
        x = [valid[w]["value@10"] for w in valid]
        y = [valid[w]["ndcg@10"] for w in valid]
        axis.plot(x, y, marker="o")
        for w, xi, yi in zip(weights, x, y):
            # The small weights sit on top of each other: their labels would too.
            if 0 < w < 0.1 and w != report["chosen_weight"]:
                continue
            axis.annotate(f"w={w:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        base = valid["0.0"]["ndcg@10"]
        axis.axhline((1 - MAX_NDCG_LOSS) * base, color="grey", linestyle="--", linewidth=0.8,
                     label=f"NDCG@10 -{MAX_NDCG_LOSS:.0%}")
        chosen = str(float(report["chosen_weight"]))
        axis.plot([valid[chosen]["value@10"]], [valid[chosen]["ndcg@10"]], marker="*", markersize=14,
                  color="tab:red", linestyle="none", label=f"chosen w={report['chosen_weight']:g}")
        axis.set_xlabel("value@10 (mean return share of the shown top 10)")
        axis.set_ylabel("NDCG@10 (validation)")
        axis.set_title(f"{name} ({report['data'][name]['users_measured']} shoppers)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def value_curve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys value-curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="amazon-2014 directory (default: ../shared/data/amazon-2014, else the bundled subset)")
    parser.add_argument("--retail-dir", type=Path, default=None,
                        help="Online Retail directory (default: ../shared/data/online-retail, else the bundled subset)")
    parser.add_argument("--category", action="append", default=None,
                        help="Amazon category (repeatable; default Office_Products)")
    parser.add_argument("--no-retail", action="store_true", help="leave the retail data out")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    parser.add_argument("--max-users", type=int, default=0,
                        help="measure this many shoppers per data set, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    if any(not np.isfinite(w) or w < 0 for w in args.weights):
        parser.error("--weights must be finite and 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from training.items import default_encoder

    data_dir, retail_dir = data_dirs(args)
    encoder = default_encoder()
    started = time.monotonic()
    workloads = []
    if not args.no_retail:
        items, interactions = retail_interactions(retail_dir)
        workloads.append(workload("Online_Retail", items, interactions, retail.RETAIL_CATEGORY, encoder,
                                  args.max_users, args.seed, with_occasions=True))
    dataset = shopping.Dataset.load(data_dir)
    for category in args.category or ["Office_Products"]:
        workloads.append(workload(category, dataset.items, dataset.interactions, category, encoder,
                                  args.max_users, args.seed))
    report = run(workloads, args.weights)
    report["command"] = " ".join(["recsys value-curve", *(argv if argv is not None else sys.argv[1:])])
    report["data_dirs"] = {"amazon": str(data_dir), "retail": str(retail_dir)}
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(json.dumps({name: {"valid": d["valid"], "test": d["test"]} for name, d in report["data"].items()}, indent=1))
    print(markdown(report))
    print(f"chosen value weight (validation): {report['chosen_weight']:g}; wrote {args.out} and {args.plot}")
    return 0


def serving_values(dataset: shopping.Dataset | None, retail_data: tuple[pd.DataFrame, pd.DataFrame] | None) -> ItemValues:
    """The ranking service's table (RANKING_ITEM_VALUES): every purchase
    counts, held-out ones included, since serving has no held-out item."""
    ids, bought, returned = [], [], []
    sources = []
    if dataset is not None:
        sources += [(dataset.items, dataset.interactions, category, False)
                    for category in sorted(dataset.interactions.category.unique())]
    if retail_data is not None:
        sources.append((*retail_data, retail.RETAIL_CATEGORY, True))
    for items, interactions, category, with_occasions in sources:
        split = protocol.category_split(interactions, items, category, min_events=1)
        occasions = occasions_of(split, interactions) if with_occasions else None
        counts = purchase_counts(split.sequences, split.num_items, occasions)
        ids += split.item_ids
        bought.append(counts[0])
        returned.append(counts[1])
    bought, returned = np.concatenate(bought), np.concatenate(returned)
    shares, overall = shrunk(bought, returned)
    return ItemValues({ids[i]: round(float(shares[i]), 6) for i in np.flatnonzero(bought)}, round(overall, 6))


def item_values_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys item-values",
        description="write the ranking service's item-value table (RANKING_ITEM_VALUES) from the shop's events")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="amazon-2014 directory (default: ../shared/data/amazon-2014, else the bundled subset)")
    parser.add_argument("--retail-dir", type=Path, default=None,
                        help="Online Retail directory (default: ../shared/data/online-retail, else the bundled subset)")
    parser.add_argument("--no-amazon", action="store_true")
    parser.add_argument("--no-retail", action="store_true")
    parser.add_argument("--out", type=Path, default=ITEM_VALUES)
    args = parser.parse_args(argv)
    data_dir, retail_dir = data_dirs(args)
    dataset = None if args.no_amazon else shopping.Dataset.load(data_dir)
    retail_data = None if args.no_retail else retail_interactions(retail_dir)
    table = serving_values(dataset, retail_data)
    table.save(args.out)
    print(f"{len(table.values)} item values (default {table.default:g}) written to {args.out}")
    return 0


def data_dirs(args) -> tuple[Path, Path]:
    data_dir = args.data_dir or (paths.shared_data_dir() if paths.shared_data_dir().is_dir() else paths.BUNDLED_DATA_DIR)
    retail_dir = args.retail_dir or (retail.SHARED_RETAIL_DIR if retail.SHARED_RETAIL_DIR.is_dir()
                                     else retail.BUNDLED_RETAIL_DIR)
    return data_dir, retail_dir

"""`recsys train-ranker`: a LightGBM LambdaRank model over the candidates
serving pools, trained on validation positions and measured on test ones.

The candidate pool is what the gateway's composer pools for a known shopper
(services/gateway/composer.py): the neighbours of the long-term and of the
short-term interest (each `per_source` deep, the gateway's 50 for a page of
10), other shoppers' co-purchases with the history (the `per_source` most
shared), and optionally the most popular items; the shopper's own items
left out. Interests are the profile service's (recency-weighted unit mixes
with its decays), drift its measure, similarities `scoring.features` (the
embedding service's function) and the feature rows
`recsys_core.ranking.learned.feature_matrix` (the ranking service's). The
hand-weighted order is `scoring.score_features` with the served weights.

No test item reaches training: co-purchases and popularity come from each
sequence's training part (all but its last two events), the model learns
from validation positions (the history before the validation item, that
item the one relevant candidate), early stopping watches a held-out fifth
of those shoppers, and only the final report reads test positions (the
history then includes the validation item, as it would when serving).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from recsys_core.data import paths, shopping
from recsys_core.ranking.learned import FEATURE_GROUPS, FEATURE_NAMES, LearnedRanker, feature_matrix, \
    manifest_path_of
from recsys_core.ranking.scoring import SERVING_WEIGHTS, UserVectors, features, score_features
from recsys_core.signals.copurchase import CoPurchases
from recsys_core.signals.interests import DriftSettings, interest_category, measure_drift, recency_weights, \
    unit_mix
from training import protocol, versions
from training.baselines import popularity_scorer
from training.crosscat import training_copurchases

log = logging.getLogger(__name__)

SOURCES = ("long_term", "short_term", "model", "co_purchase", "popular")

# A served model's shopper vectors for a batch of histories (item indices of
# the split): what the profile service's user tower answers.
ShopperModel = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass
class Pools:
    """One stage's pooled candidates per shopper, with their feature rows."""
    stage: str
    users: list[int]  # rows of the split
    targets: np.ndarray
    candidates: list[np.ndarray] = field(default_factory=list)  # item indices
    matrices: list[np.ndarray] = field(default_factory=list)
    hand: list[np.ndarray] = field(default_factory=list)  # the hand-weighted scores
    # What a Rank request carries for each shopper, as `feature_matrix` takes
    # it: (vector features, popularity, max popularity, drift, co-purchases).
    inputs: list[tuple] = field(default_factory=list)
    source_hits: dict[str, np.ndarray] = field(default_factory=dict)  # target in each source's list

    def labels(self) -> list[np.ndarray]:
        return [(c == t).astype(np.float32) for c, t in zip(self.candidates, self.targets)]

    def recall(self) -> float:
        return float(np.mean([t in set(c.tolist()) for c, t in zip(self.candidates, self.targets)]))


@dataclass(frozen=True)
class PoolSettings:
    per_source: int = 50
    popular: int = 0
    drift: DriftSettings = DriftSettings()


def _top(scores: np.ndarray, k: int, banned: np.ndarray) -> np.ndarray:
    """The k best-scored items outside `banned`, best first."""
    scores = scores.copy()
    scores[banned] = -np.inf
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best[np.isfinite(scores[best])]


def build_pools(split: protocol.CategorySplit, stage: str, rows: list[int], vectors: np.ndarray,
                grains: list[str], index: CoPurchases, popularity: np.ndarray, settings: PoolSettings,
                progress: bool = False, shopper_model: ShopperModel | None = None) -> Pools:
    """`vectors`: the item vectors the embedding service indexes over the
    split's items; `grains`: each item's interest category (for drift);
    `popularity`: training events per item; `shopper_model`: a served
    model's user tower, whose vector retrieves the "model" source."""
    histories, all_targets = split.inputs(stage), split.targets(stage)
    model_interests = _model_interests(shopper_model, [histories[row] for row in rows], progress, split.category,
                                       stage)
    pools = Pools(stage, list(rows), all_targets[rows])
    hits = {source: np.zeros(len(rows), dtype=bool) for source in SOURCES}
    most_popular = np.argsort(-popularity, kind="stable")
    max_popularity = float(max(popularity.max(), 1))
    item_ids = split.item_ids
    column_of = {item_id: i for i, item_id in enumerate(item_ids)}
    for position, row in enumerate(tqdm(rows, desc=f"{split.category} {stage} pools", disable=not progress)):
        history, target = histories[row], all_targets[row]
        seen = np.unique(history)
        history_vectors = vectors[history]
        n = len(history)
        long_term = unit_mix(history_vectors, recency_weights(n, settings.drift.long_decay))
        short_term = unit_mix(history_vectors, recency_weights(n, settings.drift.short_decay))
        # Rounded as the wire's float32 rounds it (measure_drift can exceed 1 by an ulp).
        drift = float(np.float32(min(measure_drift(history_vectors, np.ones(n), [grains[i] for i in history],
                                                   settings.drift).score, 1.0)))
        lists = {}
        model_interest = None if model_interests is None else model_interests[position]
        for source, query in (("long_term", long_term), ("short_term", short_term), ("model", model_interest)):
            lists[source] = _top(vectors @ query, settings.per_source, seen) if query is not None else \
                np.zeros(0, dtype=np.int64)
        shared = index.most_shared([item_ids[i] for i in history], settings.per_source, [split.category],
                                   exclude=[item_ids[i] for i in seen], leave_out_user=split.users[row])
        co_items = np.asarray([column_of[item_id] for item_id, _ in shared if item_id in column_of], dtype=np.int64)
        co_counts = {column_of[item_id]: count for item_id, count in shared if item_id in column_of}
        lists["co_purchase"] = co_items
        lists["popular"] = most_popular[~np.isin(most_popular, seen)][:settings.popular]
        for source, found in lists.items():
            hits[source][position] = target in set(found.tolist())
        pool = np.asarray(list(dict.fromkeys(np.concatenate(list(lists.values())).tolist())), dtype=np.int64)
        user = UserVectors(long_term=long_term, short_term=short_term, context=None, history=None,
                           drift_score=drift, model_interest=model_interest)
        vector_features = features(user, vectors[pool])
        counts = popularity[pool].astype(np.float32)
        most = np.full(len(pool), max_popularity, dtype=np.float32)
        co = np.asarray([co_counts.get(i, 0) for i in pool], dtype=np.float32)
        pools.candidates.append(pool)
        pools.inputs.append((vector_features, counts, most, drift, co))
        pools.matrices.append(feature_matrix(vector_features, counts, most, drift, None, co))
        pools.hand.append(score_features(vector_features, counts, most, SERVING_WEIGHTS, drift, None, co))
    pools.source_hits = hits
    return pools


def _model_interests(shopper_model: ShopperModel | None, histories: list[np.ndarray], progress: bool,
                     category: str, stage: str, batch: int = 512) -> np.ndarray | None:
    if shopper_model is None:
        return None
    chunks = range(0, len(histories), batch)
    return np.concatenate([np.asarray(shopper_model(histories[start:start + batch]), dtype=np.float32)
                           for start in tqdm(chunks, desc=f"{category} {stage} shopper vectors",
                                             disable=not progress)]) if histories else None


def pool_ranks(pools: Pools, scores: list[np.ndarray], num_items: int) -> np.ndarray:
    """The protocol's 0-based rank of each target (ties against it), every
    item outside the pool ranked below the pool: a target retrieval missed
    is a miss at any cutoff."""
    ranks = np.full(len(pools.targets), num_items, dtype=np.int64)
    for i, (candidates, scored, target) in enumerate(zip(pools.candidates, scores, pools.targets)):
        where = np.flatnonzero(candidates == target)
        if len(where):
            mine = scored[where[0]]
            ranks[i] = int((scored > mine).sum() + (scored == mine).sum() - 1)
    return ranks


def evaluate_scores(pools: Pools, scores: list[np.ndarray], num_items: int) -> dict[str, float]:
    """The protocol's metrics, plus recall@100: the candidates a page of 10
    could be re-ranked from if the pool were cut to 100 in this order."""
    ranks = pool_ranks(pools, scores, num_items)
    return {**protocol.metrics_from_ranks(ranks), "recall@100": float((ranks < 100).mean())}


# `--search`: tree shapes and step sizes tried, each scored by NDCG@10 on
# the held-out validation shoppers (never on test positions); the first is
# the default. How deep a tree the data supports differs with the
# category's size.
SEARCH_GRID: tuple[dict, ...] = (
    {},
    {"num_leaves": 15, "min_data_in_leaf": 200},
    {"num_leaves": 63, "min_data_in_leaf": 20},
    {"learning_rate": 0.02},
    {"learning_rate": 0.1},
    {"num_leaves": 63, "min_data_in_leaf": 100, "lambda_l2": 10.0},
)


def lightgbm_params(threads: int, seed: int, **overrides) -> dict:
    return {
        "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": 0.05,
        "num_leaves": 31, "min_data_in_leaf": 50, "feature_fraction": 0.9, "bagging_fraction": 0.8,
        "bagging_freq": 1, "lambda_l2": 1.0, "num_threads": threads, "seed": seed, "verbose": -1,
        # The label is one item per shopper: NDCG over the top 20 is what is measured.
        "lambdarank_truncation_level": 20,
        # The same data gives the same model whatever the threads do.
        "deterministic": True, "force_col_wise": True,
        **overrides,
    }


def _dataset(pools: Pools, rows: np.ndarray, names: list[str], reference=None):
    import lightgbm

    columns = [FEATURE_NAMES.index(name) for name in names]
    labels = pools.labels()
    # A shopper whose item retrieval missed has no positive: no gradient, left out.
    kept = [i for i in rows if labels[i].any()]
    matrix = np.concatenate([pools.matrices[i][:, columns] for i in kept])
    label = np.concatenate([labels[i] for i in kept])
    return lightgbm.Dataset(matrix, label, group=[len(labels[i]) for i in kept], feature_name=names,
                            reference=reference, free_raw_data=False)


def fit(pools: Pools, names: list[str], threads: int = 2, seed: int = 0, rounds: int = 1000,
        patience: int = 50, held_out: float = 0.2, overrides: dict | None = None):
    """A LambdaRank booster on validation pools; early stopping on NDCG@10 of
    a held-out part of those shoppers. Returns (booster, best iteration, its held-out NDCG@10)."""
    import lightgbm

    order = np.random.default_rng(seed).permutation(len(pools.targets))
    cut = int(len(order) * (1 - held_out))
    train = _dataset(pools, np.sort(order[:cut]), names)
    valid = _dataset(pools, np.sort(order[cut:]), names, reference=train)
    booster = lightgbm.train(lightgbm_params(threads, seed, **(overrides or {})), train, num_boost_round=rounds,
                             valid_sets=[valid], valid_names=["held_out"],
                             callbacks=[lightgbm.early_stopping(patience, verbose=False)])
    return booster, booster.best_iteration, float(booster.best_score["held_out"]["ndcg@10"])


def choose(pools: Pools, names: list[str], threads: int, seed: int, grid: Sequence[dict]):
    """`fit` with each of `grid`'s overrides; the one with the best held-out
    validation NDCG@10 (the first on a tie). Returns (its fit, its
    overrides, every try's figures)."""
    tried, best, chosen = [], None, {}
    for overrides in grid:
        candidate = fit(pools, names, threads, seed, overrides=overrides)
        tried.append({"overrides": overrides, "best_iteration": candidate[1],
                      "held_out_ndcg@10": round(candidate[2], 5)})
        log.info("%s: held-out validation NDCG@10 %.5f at iteration %d", overrides or "default settings",
                 candidate[2], candidate[1])
        if best is None or candidate[2] > best[2]:
            best, chosen = candidate, overrides
    return best, chosen, tried


def score_pools(booster, pools: Pools, names: list[str]) -> list[np.ndarray]:
    columns = [FEATURE_NAMES.index(name) for name in names]
    sizes = [len(m) for m in pools.matrices]
    predicted = booster.predict(np.concatenate([m[:, columns] for m in pools.matrices]))
    return np.split(predicted.astype(np.float32), np.cumsum(sizes)[:-1])


# The pool ordered by one column alone: what the learned order must beat
# besides the hand weights (a missing source orders nothing: all tie).
SINGLE_SOURCES = ("long_term_similarity", "short_term_similarity", "model_similarity", "log_co_purchases",
                  "log_popularity")


def single_source(pools: Pools, name: str) -> list[np.ndarray]:
    column = FEATURE_NAMES.index(name)
    return [np.nan_to_num(m[:, column], nan=-np.inf) for m in pools.matrices]


@dataclass
class RankerResult:
    booster: object
    manifest: dict


@dataclass(frozen=True)
class CategoryData:
    """What pooling needs of one category, from its training part only."""
    split: protocol.CategorySplit
    vectors: np.ndarray  # the indexed item vectors over the split's items
    grains: list[str]  # each item's interest category, for drift
    index: CoPurchases
    popularity: np.ndarray  # training events per item
    shopper_model: ShopperModel | None = None

    def pools(self, stage: str, rows: list[int], settings: PoolSettings = PoolSettings(),
              progress: bool = False) -> Pools:
        return build_pools(self.split, stage, rows, self.vectors, self.grains, self.index, self.popularity, settings,
                           progress, self.shopper_model)


def prepare(dataset: shopping.Dataset, category: str, vectors_of,
            shopper_model_of: Callable[[protocol.CategorySplit], ShopperModel] | None = None) -> CategoryData:
    """`vectors_of(split)`: the split's item vectors (the encoder's, cached);
    `shopper_model_of(split)`: a served model's user tower over that split,
    `vectors_of` then giving that model's item vectors (`served_model`)."""
    split = protocol.category_split(dataset.interactions, dataset.items, category)
    vectors = np.asarray(vectors_of(split), dtype=np.float32)
    if shopper_model_of is None:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    # else the embedding service indexes a model's text + ID vectors as they
    # are, and ranks by inner product: so do the pools.
    meta = dataset.items.drop_duplicates("item_id").set_index("item_id")
    grains = [interest_category(str(meta.category.get(i, category)), str(meta.category_path.get(i, "") or ""))
              if i in meta.index else category for i in split.item_ids]
    index = training_copurchases(dataset.interactions[dataset.interactions.category == category])
    popularity = popularity_scorer(split)([np.array([])])[0]
    return CategoryData(split, vectors, grains, index, popularity,
                        None if shopper_model_of is None else shopper_model_of(split))


def served_model(model_dir: Path, items, progress: bool = True):
    """(vectors_of, shopper_model_of) for `prepare` from a `recsys train`
    model directory: the item vectors `recsys serve --model` indexes and the
    user tower the profile service runs (in torch, fp32: the served ONNX
    tower matches it, training/modeldir.py checks at export)."""
    from training import modeldir, twotower

    loaded: dict = {}

    def model_of(split):
        if loaded.get("split") is not split:
            loaded.update(split=split, model=modeldir.load_for_scoring(model_dir, split, items, progress))
        return loaded["model"]

    def vectors_of(split) -> np.ndarray:
        import torch

        with torch.no_grad():
            return model_of(split).item_matrix().numpy().copy()

    def shopper_model_of(split) -> ShopperModel:
        model = model_of(split)
        return lambda histories: twotower.shopper_vectors(model, histories)

    return vectors_of, shopper_model_of


def train_ranker(dataset: shopping.Dataset, category: str, vectors_of, settings: PoolSettings = PoolSettings(),
                 threads: int = 2, seed: int = 0, max_shoppers: int | None = None, ablation: bool = True,
                 progress: bool = False, data_label: str = "", compare: dict | None = None,
                 shopper_model_of=None, model_label: str = "", search: bool = False) -> RankerResult:
    """Pools, fit, test report. `vectors_of(split)`: the split's item vectors.
    `compare`: label -> a LearnedRanker (e.g. the promoted version) scored on
    the same test pools, into the manifest's test.compared.
    numpy's BLAS is held to `threads` too: it would start a thread per core
    for every small product of the pooling, which on a shared machine made
    pooling ten times slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        return _train_ranker(dataset, category, vectors_of, settings, threads, seed, max_shoppers, ablation, progress,
                             data_label, compare or {}, shopper_model_of, model_label, search)


def _train_ranker(dataset, category, vectors_of, settings, threads, seed, max_shoppers, ablation, progress,
                  data_label, compare, shopper_model_of, model_label, search) -> RankerResult:
    started = time.monotonic()
    category_data = prepare(dataset, category, vectors_of, shopper_model_of)
    split = category_data.split
    rows = list(range(len(split.users)))
    if max_shoppers and len(rows) > max_shoppers:
        rows = sorted(np.random.default_rng(seed).choice(rows, max_shoppers, replace=False).tolist())
    valid = category_data.pools("valid", rows, settings, progress)
    test = category_data.pools("test", rows, settings, progress)
    names = list(FEATURE_NAMES)
    (booster, best_iteration, held_out), chosen, tried = choose(valid, names, threads, seed,
                                                                SEARCH_GRID if search else SEARCH_GRID[:1])
    learned = evaluate_scores(test, score_pools(booster, test, names), split.num_items)
    hand = evaluate_scores(test, test.hand, split.num_items)
    single = {name: rounded(evaluate_scores(test, single_source(test, name), split.num_items))
              for name in SINGLE_SOURCES if name != "model_similarity" or shopper_model_of is not None}
    gains = booster.feature_importance("gain")
    importance = {name: round(float(gain) / max(float(gains.sum()), 1e-12), 4)
                  for name, gain in sorted(zip(names, gains), key=lambda pair: -pair[1])}
    groups = {}
    if ablation:
        for group, members in FEATURE_GROUPS.items():
            kept = [name for name in names if name not in members]
            reduced, iterations, _ = fit(valid, kept, threads, seed, overrides=chosen)
            groups[group] = {"iterations": iterations,
                             **rounded(evaluate_scores(test, score_pools(reduced, test, kept), split.num_items))}
    pool_sizes = [len(c) for c in test.candidates]
    manifest = {
        "kind": "lightgbm-lambdarank",
        "feature_names": names,
        "feature_groups": {group: list(members) for group, members in FEATURE_GROUPS.items()},
        "data": {"path": data_label, "category": category, "shoppers": len(rows),
                 "served_model": model_label or None,
                 "trained_on": "validation positions (history before each shopper's second-to-last item)",
                 "early_stopping": "NDCG@10 on a held-out fifth of those shoppers",
                 "evaluated_on": "test positions (each shopper's last item)",
                 "co_purchases_and_popularity_from": "each sequence's training part (all but its last two events)"},
        "pool": {"per_source": settings.per_source, "popular": settings.popular,
                 "mean_size": round(float(np.mean(pool_sizes)), 1),
                 "recall_valid": round(valid.recall(), 4), "recall_test": round(test.recall(), 4),
                 "source_recall_test": {s: round(float(h.mean()), 4) for s, h in test.source_hits.items()}},
        "training": {"params": lightgbm_params(threads, seed, **chosen), "best_iteration": best_iteration,
                     **({"search": tried} if search else {}),
                     "held_out_ndcg@10": round(held_out, 4), "minutes": None},
        "test": {"learned": rounded(learned), "hand_weighted": rounded(hand), "single_source": single,
                 **({"compared": {label: rounded(evaluate_scores(test, score_pools(other.booster, test,
                                                                                     list(other.feature_names)),
                                                                 split.num_items))
                                  for label, other in compare.items()}} if compare else {})},
        "ablation_without_group": groups,
        "importance_gain_share": importance,
    }
    manifest["training"]["minutes"] = round((time.monotonic() - started) / 60, 2)
    return RankerResult(booster, manifest)


def rounded(metrics: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def save(result: RankerResult, out: Path) -> None:
    """The model (LightGBM text) and its manifest beside it, each replaced in
    one step; the manifest last, and checked by loading the model as the
    ranking service will."""
    with paths.replacing(out) as tmp:
        result.booster.save_model(str(tmp))
    with paths.replacing(manifest_path_of(out)) as tmp:
        tmp.write_text(json.dumps(result.manifest, indent=2) + "\n")
    LearnedRanker.load(out)


def markdown(manifest: dict, command: str) -> str:
    """The manifest as docs/results.md's tables: test figures beside the hand
    weights and each source alone, the pool's recall, the ablation and the
    importances."""
    test, pool = manifest["test"], manifest["pool"]
    def row(name: str, metrics: dict) -> str:
        recall_100 = f"{metrics['recall@100']:.4f}" if "recall@100" in metrics else ""
        return (f"| {name} | {metrics['recall@10']:.4f} | {metrics['ndcg@10']:.4f} | {metrics['recall@20']:.4f} | "
                f"{metrics['ndcg@20']:.4f} | {metrics['mrr']:.4f} | {recall_100} |")

    lines = [f"### {manifest['data']['category']}: {manifest['data']['shoppers']} shoppers\n", "```sh", command, "```",
             "", "| order of the pooled candidates (test positions) | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | MRR | "
                 "Recall@100 |",
             "|---|---|---|---|---|---|---|",
             row("**learned (LambdaRank)**", test["learned"]),
             row("hand-set weights (the ranking service's default)", test["hand_weighted"])]
    lines += [row(f"{name} alone", metrics) for name, metrics in test.get("single_source", {}).items()]
    sources = ", ".join(f"{source} {recall:.4f}" for source, recall in pool["source_recall_test"].items())
    lines += ["", f"Candidate pool: {pool['per_source']} per source (+{pool['popular']} popular), "
                  f"{pool['mean_size']} candidates on average; the test item is in the pool for "
                  f"{pool['recall_test']:.4f} of shoppers (validation: {pool['recall_valid']:.4f}), which bounds "
                  f"every order's recall; Recall@100 is the pool cut to 100 in each order. Each source's own "
                  f"list: {sources}.", ""]
    training = manifest["training"]
    lines.append(f"Trained in {training['minutes']} min (wall, pools included), best iteration "
                 f"{training['best_iteration']}, held-out validation NDCG@10 {training['held_out_ndcg@10']:.4f}.\n")
    if manifest.get("ablation_without_group"):
        lines += ["| retrained without the group | features | NDCG@10 | change | Recall@10 | iterations |",
                  "|---|---|---|---|---|---|"]
        full = test["learned"]["ndcg@10"]
        for group, metrics in manifest["ablation_without_group"].items():
            members = ", ".join(manifest["feature_groups"][group])
            lines.append(f"| {group} | {members} | {metrics['ndcg@10']:.4f} | {metrics['ndcg@10'] - full:+.4f} | "
                         f"{metrics['recall@10']:.4f} | {metrics['iterations']} |")
        lines.append("")
    lines += ["| feature | share of the gain |", "|---|---|"]
    lines += [f"| {name} | {share:.3f} |" for name, share in manifest["importance_gain_share"].items() if share > 0]
    unused = [name for name, share in manifest["importance_gain_share"].items() if share <= 0]
    if unused:
        lines.append(f"\nUnused (no signal in this data): {', '.join(unused)}.")
    return "\n".join(lines) + "\n"


def train_ranker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys train-ranker", description=(
        "Train the ranking service's LightGBM LambdaRank model on one category: candidates pooled as the "
        "gateway pools them, trained on validation positions, early stopping on held-out validation shoppers, "
        "measured on test positions beside the hand-weighted order; writes OUT (LightGBM text) and OUT.json."))
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir(),
                        help="directory in the amazon-2014 schema (default: ../shared/data/amazon-2014)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", type=Path, required=True, help="model file to write (its manifest: OUT.json)")
    parser.add_argument("--per-source", type=int, default=PoolSettings.per_source,
                        help="candidates per source (the gateway's: 50 for a page of 10)")
    parser.add_argument("--popular", type=int, default=0, help="also pool this many most popular items")
    parser.add_argument("--model", type=Path, help=(
        "a `recsys train` model directory, as `recsys serve --model` serves it: its item vectors replace the "
        "pretrained encoder's and its user tower's vector pools a source of its own (model_similarity)"))
    parser.add_argument("--max-shoppers", type=int, help="a random sample of the category's shoppers")
    parser.add_argument("--threads", type=int, default=2, help="LightGBM threads (keep low on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ablation", action="store_true", help="skip retraining without each feature group")
    parser.add_argument("--search", action="store_true", help=(
        "choose LightGBM's tree shape and learning rate among a small grid by NDCG@10 on the held-out "
        "validation shoppers (never test positions); default: the first of them"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the figures as docs/results.md's tables here")
    versions.add_register_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.per_source < 1 or args.popular < 0 or args.threads < 1:
        parser.error("--per-source and --threads must be >= 1, --popular >= 0")
    dataset = shopping.Dataset.load(args.data)
    if args.category not in set(dataset.interactions.category.unique()):
        parser.error(f"--category {args.category}: not in {args.data}")
    if args.model is not None:
        from training import modeldir

        if not modeldir.is_model_dir(args.model):
            parser.error(f"--model {args.model}: not a model directory written by `recsys train` (no manifest)")
        vectors_of, shopper_model_of = served_model(args.model, dataset.items, not args.no_progress)
    else:
        from training.items import default_encoder, split_item_vectors

        encoder = default_encoder()
        shopper_model_of = None

        def vectors_of(split):
            return split_item_vectors(split, dataset.items, encoder, not args.no_progress)
    result = train_ranker(
        dataset, args.category, vectors_of, PoolSettings(per_source=args.per_source, popular=args.popular),
        threads=args.threads, seed=args.seed, max_shoppers=args.max_shoppers, ablation=not args.no_ablation,
        progress=not args.no_progress, data_label=str(args.data), shopper_model_of=shopper_model_of,
        model_label=str(args.model or ""), search=args.search)
    save(result, args.out)
    if args.markdown:
        command = "recsys train-ranker " + " ".join(argv if argv is not None else sys.argv[2:])
        with paths.replacing(args.markdown) as tmp:
            tmp.write_text(markdown(result.manifest, command))
    registered = versions.register(
        args, "ranker", args.out, versions.data_window(dataset.interactions[dataset.interactions.category == args.category]),
        {"test": result.manifest["test"]["learned"], "hand_weighted_test": result.manifest["test"]["hand_weighted"],
         "held_out_ndcg@10": result.manifest["training"]["held_out_ndcg@10"]}, data=str(args.data),
        shoppers_trained_on=result.manifest["data"]["shoppers"])
    if registered:
        print(f"registered {registered.label}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), **{k: result.manifest[k] for k in ("pool", "test",
                                                                               "ablation_without_group")},
                      "importance_gain_share": result.manifest["importance_gain_share"]}, indent=2))
    return 0

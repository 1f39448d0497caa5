"""Recommendations as serving ranks them without a trained model, on the
published protocol and on the cross-category task (the shopper's history in
the source category only): every item of the target category ranked by the
ranking service's own scoring function (recsys_core/ranking/scoring.py), with
the co-purchase counts the profile service serves (recsys_core/signals/copurchase.py).

The counts come from every shopper's training events (all but the last two
of each shopper's sequence in each category, the published protocol's
training part), so no validation or test item is in them, and each shopper's
own baskets are left out when they are scored.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recsys_core.signals.copurchase import CoPurchases
from training.baselines import ZERO_SHOT_DECAY, popularity_scorer, recency_mix
from training.protocol import CategorySplit, CrossCategoryTask
from recsys_core.ranking.scoring import SERVING_WEIGHTS, UserVectors, Weights, score


def serving_weights(co_purchase: float | None = None, text: bool = True) -> Weights:
    """The ranking service's default weights, its co-purchase weight or this
    one (`text` False: the co-purchase count alone)."""
    defaults = SERVING_WEIGHTS
    return Weights(long_term=defaults.long_term if text else 0.0, short_term=defaults.short_term,
                   context=defaults.context, popularity=defaults.popularity if text else 0.0,
                   co_purchase=defaults.co_purchase if co_purchase is None else co_purchase)


def training_copurchases(interactions: pd.DataFrame) -> CoPurchases:
    events = interactions.sort_values(["user_id", "category", "seq"], kind="stable")
    position_from_end = events.groupby(["user_id", "category"]).cumcount(ascending=False)
    training = events[position_from_end >= 2]
    index = CoPurchases()
    index.add_many(zip(training.user_id, training.item_id, training.category))
    return index


def ranking_scorer(split: CategorySplit, target: str, candidates: np.ndarray, index: CoPurchases,
                   item_vectors: np.ndarray, popularity: np.ndarray, weights: Weights,
                   values: np.ndarray | None = None):
    """Scores (histories, shoppers) -> [n, items] over the split's items:
    the shopper's query is the recency-weighted mix of their history's
    vectors (the long-term interest of a shopper the service knows only
    from it); items outside `candidates` (of category `target`) score -inf.
    `values`: per item of the split, its value for the value term."""
    vectors = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    target_items = np.flatnonzero(candidates)
    item_ids = split.item_ids
    column_of = {item_ids[i]: column for column, i in enumerate(target_items)}
    candidate_vectors = vectors[target_items].astype(np.float32)
    counts = popularity[target_items].astype(np.float32)
    most = np.full(len(target_items), max(float(counts.max()), 1.0), dtype=np.float32)
    candidate_values = None if values is None else np.asarray(values, dtype=np.float32)[target_items]

    def scorer(histories: Sequence[np.ndarray], users: Sequence[str]) -> np.ndarray:
        out = np.full((len(histories), len(item_ids)), -np.inf)
        for row, (history, user_id) in enumerate(zip(histories, users)):
            query = recency_mix(vectors[history], ZERO_SHOT_DECAY)
            query = (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)
            shared = np.zeros(len(target_items), dtype=np.float32)
            related = index.related([item_ids[i] for i in history], [target], leave_out_user=user_id)
            for item_id, shoppers in related.items():
                if item_id in column_of:
                    shared[column_of[item_id]] = shoppers
            out[row, target_items] = score(UserVectors(long_term=query, short_term=None, context=None, history=None),
                                           candidate_vectors, counts, most, weights, shared, candidate_values)
        return out

    return scorer


def category_scorer(split: CategorySplit, index: CoPurchases, item_vectors: np.ndarray, weights: Weights,
                    values: np.ndarray | None = None):
    """The published protocol in one category: every item a candidate, the
    popularity prior from the split's training events."""
    popularity = popularity_scorer(split)([np.array([])])[0]
    return ranking_scorer(split, split.category, np.ones(split.num_items, dtype=bool), index, item_vectors,
                          popularity, weights, values)


def cross_scorer(task: CrossCategoryTask, index: CoPurchases, item_vectors: np.ndarray, popularity: np.ndarray,
                 weights: Weights):
    return ranking_scorer(task.split, task.target, task.candidates, index, item_vectors, popularity, weights)

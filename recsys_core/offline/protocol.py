"""The published evaluation protocol (S3-Rec's full-sort evaluation).

Per (shopper, category): events ordered by `seq`; the last one is the test
target, the one before it the validation target, the rest is training history.
A model ranks every item of the category; the items already in the input
sequence are left out of the ranking, and Recall@K, NDCG@K and MRR are read off
the target's rank.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

CUTOFFS = (10, 20)


@dataclass(frozen=True)
class CategorySplit:
    category: str
    item_ids: list[str]  # index -> ASIN; an item's index is its column in score matrices
    users: list[str]
    sequences: list[np.ndarray]  # full sequence of item indices per user, in seq order

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def inputs(self, stage: str) -> list[np.ndarray]:
        """The history a model sees: all but the last event for test, all but
        the last two for validation, all but the last three for training targets."""
        cut = {"test": 1, "valid": 2, "train": 3}[stage]
        return [s[:-cut] for s in self.sequences]

    def targets(self, stage: str) -> np.ndarray:
        offset = {"test": 1, "valid": 2}[stage]
        return np.asarray([s[-offset] for s in self.sequences])

    def training_sequences(self) -> list[np.ndarray]:
        """Sequences with the validation and test targets removed: all a model may learn from."""
        return [s[:-2] for s in self.sequences]


def category_split(interactions: pd.DataFrame, items: pd.DataFrame, category: str, min_events: int = 3) -> CategorySplit:
    events = interactions[interactions.category == category].sort_values(["user_id", "seq"], kind="stable")
    item_ids = sorted(set(items.loc[items.category == category, "item_id"]) | set(events.item_id))
    index_of = {item_id: position for position, item_id in enumerate(item_ids)}
    users, sequences = [], []
    for user_id, group in events.groupby("user_id", sort=True):
        if len(group) < min_events:
            continue
        users.append(user_id)
        sequences.append(np.asarray([index_of[i] for i in group.item_id], dtype=np.int64))
    return CategorySplit(category=category, item_ids=item_ids, users=users, sequences=sequences)


# Scores [n_users, n_items] for a batch of input histories (item indices).
Scorer = Callable[[Sequence[np.ndarray]], np.ndarray]


def target_ranks(scorer: Scorer, histories: Sequence[np.ndarray], targets: np.ndarray, batch: int = 512,
                 progress: str | None = None) -> np.ndarray:
    """0-based rank of each target among all items not in its history; ties
    count against the target, so a constant scorer cannot look good."""
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in tqdm(range(0, len(targets), batch), desc=progress, disable=progress is None, unit="batch"):
        chunk = slice(start, start + batch)
        scores = np.asarray(scorer(histories[chunk]), dtype=np.float64).copy()
        for row, history in enumerate(histories[chunk]):
            target = targets[start + row]
            removed = history[history != target]
            scores[row, removed] = -np.inf
        rows = np.arange(scores.shape[0])
        target_scores = scores[rows, targets[chunk]][:, None]
        ranks[chunk] = (scores > target_scores).sum(axis=1) + ((scores == target_scores).sum(axis=1) - 1)
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    result = {}
    for k in CUTOFFS:
        hit = ranks < k
        result[f"recall@{k}"] = float(hit.mean())
        result[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean())
    result["mrr"] = float((1.0 / (ranks + 1)).mean())
    result["users"] = int(len(ranks))
    return result


def evaluate(scorer: Scorer, split: CategorySplit, stage: str = "test", progress: str | None = None) -> dict[str, float]:
    return metrics_from_ranks(target_ranks(scorer, split.inputs(stage), split.targets(stage), progress=progress))

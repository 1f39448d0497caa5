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


def category_split(interactions: pd.DataFrame, items: pd.DataFrame, category: str | Sequence[str],
                   min_events: int = 3) -> CategorySplit:
    """The benchmark split of one category, or of several at once (one item
    space, one sequence per shopper and category) for multi-category training."""
    categories = [category] if isinstance(category, str) else list(category)
    events = interactions[interactions.category.isin(categories)].sort_values(
        ["user_id", "category", "seq"], kind="stable")
    item_ids = sorted(set(items.loc[items.category.isin(categories), "item_id"]) | set(events.item_id))
    index_of = {item_id: position for position, item_id in enumerate(item_ids)}
    users, sequences = [], []
    for (user_id, _), group in events.groupby(["user_id", "category"], sort=True):
        if len(group) < min_events:
            continue
        users.append(user_id)
        sequences.append(np.asarray([index_of[i] for i in group.item_id], dtype=np.int64))
    return CategorySplit(category="+".join(categories), item_ids=item_ids, users=users, sequences=sequences)


@dataclass(frozen=True)
class CrossCategoryTask:
    """Shoppers active in both categories: their whole history in `source`
    is the input, their held-out (last) item in `target` is what to find,
    ranked among every item of `target` only."""
    source: str
    target: str
    split: CategorySplit  # items: source's then target's; each sequence ends with the target item
    candidates: np.ndarray  # bool over items: True for the target category's items
    # The shopper's item in `target` before the held-out one: what a model
    # is chosen on, from the same history.
    valid_targets: np.ndarray

    def inputs(self) -> list[np.ndarray]:
        return self.split.inputs("test")

    def targets(self, stage: str = "test") -> np.ndarray:
        return self.split.targets("test") if stage == "test" else self.valid_targets


def cross_category_task(interactions: pd.DataFrame, items: pd.DataFrame, source: str, target: str) -> CrossCategoryTask:
    both = set(interactions.loc[interactions.category == source, "user_id"]) & set(
        interactions.loc[interactions.category == target, "user_id"])
    events = interactions[interactions.user_id.isin(both)]
    source_items = sorted(set(items.loc[items.category == source, "item_id"]) | set(events.loc[events.category == source, "item_id"]))
    target_items = sorted(set(items.loc[items.category == target, "item_id"]) | set(events.loc[events.category == target, "item_id"]) - set(source_items))
    item_ids = source_items + target_items
    index_of = {item_id: position for position, item_id in enumerate(item_ids)}
    users, sequences, valid_targets = [], [], []
    for user_id, group in events.sort_values(["user_id", "seq"], kind="stable").groupby("user_id", sort=True):
        history = group[group.category == source].item_id
        in_target = group[group.category == target].item_id
        users.append(user_id)
        sequences.append(np.asarray([index_of[i] for i in history] + [index_of[in_target.iloc[-1]]], dtype=np.int64))
        valid_targets.append(index_of[in_target.iloc[-2]] if len(in_target) > 1 else -1)
    candidates = np.zeros(len(item_ids), dtype=bool)
    candidates[len(source_items):] = True
    split = CategorySplit(category=f"{source}->{target}", item_ids=item_ids, users=users, sequences=sequences)
    return CrossCategoryTask(source=source, target=target, split=split, candidates=candidates,
                             valid_targets=np.asarray(valid_targets, dtype=np.int64))


# Scores [n_users, n_items] for a batch of input histories (item indices).
Scorer = Callable[[Sequence[np.ndarray]], np.ndarray]


def target_ranks(scorer: Scorer, histories: Sequence[np.ndarray], targets: np.ndarray, batch: int = 512,
                 progress: str | None = None, candidates: np.ndarray | None = None,
                 users: Sequence[str] | None = None) -> np.ndarray:
    """0-based rank of each target among all items not in its history (and,
    given `candidates`, among those only); ties count against the target, so
    a constant scorer cannot look good. Given `users` (parallel to the
    histories), the scorer is called with them too: (histories, users)."""
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in tqdm(range(0, len(targets), batch), desc=progress, disable=progress is None, unit="batch"):
        chunk = slice(start, start + batch)
        scored = scorer(histories[chunk]) if users is None else scorer(histories[chunk], users[chunk])
        scores = np.asarray(scored, dtype=np.float64).copy()
        if candidates is not None:
            scores[:, ~candidates] = -np.inf
        for row, history in enumerate(histories[chunk]):
            target = targets[start + row]
            removed = history[history != target]
            scores[row, removed] = -np.inf
        rows = np.arange(scores.shape[0])
        target_scores = scores[rows, targets[chunk]][:, None]
        ranks[chunk] = (scores > target_scores).sum(axis=1) + ((scores == target_scores).sum(axis=1) - 1)
    return ranks


# The rank of a target a returned list does not hold: past every cutoff, and
# close enough to nothing in MRR (which over a list of K is MRR@K, a lower bound).
MISS_RANK = 2 ** 40


def list_ranks(returned: Sequence[Sequence], targets: Sequence) -> np.ndarray:
    """0-based rank of each target in the list returned for it (a served
    reply, best first), MISS_RANK where the list does not hold it: what
    `target_ranks` gives for a scorer whose top items are that list, so
    metrics_from_ranks reads both the same way."""
    ranks = np.full(len(targets), MISS_RANK, dtype=np.int64)
    for row, (items, target) in enumerate(zip(returned, targets)):
        for position, item in enumerate(items):
            if item == target:
                ranks[row] = position
                break
    return ranks


def heldout_interactions(interactions: pd.DataFrame, min_events: int = 3) -> pd.DataFrame:
    """The events without any test target: each (shopper, category) that
    `category_split` evaluates (min_events or more) loses its last event by
    `seq`. What a stack must be served on for a served evaluation to see no
    test item in its popularity or co-purchase counts."""
    ordered = interactions.sort_values(["user_id", "category", "seq"], kind="stable")
    groups = ordered.groupby(["user_id", "category"], sort=False)
    last = groups.cumcount(ascending=False) == 0
    evaluated = groups["item_id"].transform("size") >= min_events
    return interactions.loc[ordered.index[~(last & evaluated).to_numpy()]].sort_index()


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    result = {}
    for k in CUTOFFS:
        hit = ranks < k
        result[f"recall@{k}"] = float(hit.mean())
        result[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean())
    result["mrr"] = float((1.0 / (ranks + 1)).mean())
    result["users"] = int(len(ranks))
    return result


def evaluate(scorer: Scorer, split: CategorySplit, stage: str = "test", progress: str | None = None,
             with_users: bool = False) -> dict[str, float]:
    """`with_users`: the scorer takes (histories, shopper ids)."""
    return metrics_from_ranks(target_ranks(scorer, split.inputs(stage), split.targets(stage), progress=progress,
                                           users=split.users if with_users else None))


def evaluate_cross(scorer: Scorer, task: CrossCategoryTask, progress: str | None = None, stage: str = "test",
                   with_users: bool = False) -> dict[str, float]:
    """`stage` "valid": the shopper's item before the held-out one (shoppers
    with only one item in the target are left out). `with_users`: the scorer
    takes (histories, shopper ids), to leave each shopper's own baskets out."""
    targets = task.targets(stage)
    keep = np.flatnonzero(targets >= 0)
    inputs = task.inputs()
    users = [task.split.users[i] for i in keep] if with_users else None
    return metrics_from_ranks(target_ranks(scorer, [inputs[i] for i in keep], targets[keep], progress=progress,
                                           candidates=task.candidates, users=users))

"""Baselines on the benchmark protocol: popularity, item-to-item
co-occurrence, and the pretrained encoder zero-shot."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from training.protocol import CategorySplit

ZERO_SHOT_DECAY = 0.3


def popularity_scorer(split: CategorySplit):
    counts = np.zeros(split.num_items, dtype=np.float64)
    for sequence in split.training_sequences():
        np.add.at(counts, sequence, 1)

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(counts, (len(histories), split.num_items))

    return score


def fixed_scorer(scores: np.ndarray):
    """The same scores for every shopper (popularity in a cross-category task's target)."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(scores, (len(histories), len(scores)))

    return score


def target_popularity(interactions, items, task) -> np.ndarray:
    """Training events per item of a cross-category task's target category
    (every shopper of that category), over the task's item space."""
    from training.protocol import category_split

    target_split = category_split(interactions, items, task.target)
    counts = popularity_scorer(target_split)([np.array([])])[0]
    by_id = dict(zip(target_split.item_ids, counts))
    return np.asarray([by_id.get(i, 0.0) for i in task.split.item_ids])


def cooccurrence_scorer(split: CategorySplit, window: int = 3, decay: float = 0.3):
    """Items that followed the shopper's recent items in others' sequences
    (within `window` steps), weighted toward the most recent, popularity as tie-break."""
    rows, cols, weights = [], [], []
    counts = np.zeros(split.num_items, dtype=np.float64)
    for sequence in split.training_sequences():
        np.add.at(counts, sequence, 1)
        for gap in range(1, window + 1):
            if len(sequence) > gap:
                rows.append(sequence[:-gap])
                cols.append(sequence[gap:])
                weights.append(np.full(len(sequence) - gap, 1.0 / gap))
    n = split.num_items
    follows = sparse.csr_matrix(
        (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    ) if rows else sparse.csr_matrix((n, n))
    # Both directions: "bought together" is symmetric enough in review data.
    co = (follows + follows.T).tocsr()
    prior = 1e-6 * counts / max(counts.max(), 1)

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        out = np.tile(prior, (len(histories), 1))
        for row, history in enumerate(histories):
            recent = history[-10:][::-1]
            recency = np.exp(-decay * np.arange(len(recent)))
            out[row] += np.asarray(co[recent].T @ recency).ravel()
        return out

    return score


def recency_mix(history_vectors: np.ndarray, decay: float) -> np.ndarray:
    """sum_i exp(-decay * age_i) v_i, age 0 being the latest; not normalised
    (cosine ranking does not need it)."""
    ages = np.arange(len(history_vectors) - 1, -1, -1)
    return np.exp(-decay * ages) @ history_vectors


def zero_shot_scorer(split: CategorySplit, item_vectors: np.ndarray, decay: float = ZERO_SHOT_DECAY):
    """The pretrained encoder alone: a recency-weighted mean of the history's
    item embeddings against every item's embedding."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        queries = np.stack([recency_mix(item_vectors[h], decay) for h in histories])
        return queries @ item_vectors.T

    return score

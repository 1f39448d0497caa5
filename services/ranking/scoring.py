"""The first ranking function: interest similarity plus a popularity prior.

score = w_long * cos(long-term interest, item)
      + w_short * cos(short-term interest, item)
      + w_context * cos(items being looked at, item)
      + w_pop * log(1 + events) / log(1 + events of the most popular item)

Terms whose user vector is absent drop out. Learned ranking replaces this later.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys_core.errors import InvalidArgument


@dataclass(frozen=True)
class Weights:
    long_term: float
    short_term: float
    context: float
    popularity: float


@dataclass(frozen=True)
class UserVectors:
    long_term: np.ndarray | None
    short_term: np.ndarray | None
    context: np.ndarray | None
    # Recent history item embeddings, most recent first (rows), for explanations.
    history: np.ndarray | None


@dataclass(frozen=True)
class Ranked:
    order: np.ndarray  # candidate positions, best first
    scores: np.ndarray  # parallel to order
    because: np.ndarray  # history row most similar to each ranked candidate, -1 if none


def check_dimensions(user: UserVectors, candidates: np.ndarray) -> None:
    dimension = candidates.shape[1]
    for name, vector in (
        ("user.long_term_interest", user.long_term),
        ("user.short_term_interest", user.short_term),
        ("user.context_interest", user.context),
    ):
        if vector is not None and vector.shape != (dimension,):
            raise InvalidArgument(name, f"has {vector.shape[0]} values, candidates have {dimension}")
    if user.history is not None and user.history.shape[1] != dimension:
        raise InvalidArgument("user.recent_items", f"embeddings must have {dimension} values")


def rank(
    user: UserVectors,
    candidates: np.ndarray,
    popularity: np.ndarray,
    max_popularity: np.ndarray,
    weights: Weights,
    k: int,
) -> Ranked:
    check_dimensions(user, candidates)
    scores = np.zeros(len(candidates), dtype=np.float32)
    for vector, weight in (
        (user.long_term, weights.long_term),
        (user.short_term, weights.short_term),
        (user.context, weights.context),
    ):
        if vector is not None and weight:
            scores += weight * (candidates @ vector)
    if weights.popularity:
        denominator = np.log1p(np.maximum(max_popularity, 1)).astype(np.float32)
        scores += weights.popularity * np.log1p(np.maximum(popularity, 0)).astype(np.float32) / denominator
    k = len(candidates) if k <= 0 else min(k, len(candidates))
    # Stable sort on the negated score keeps retrieval order among ties.
    order = np.argsort(-scores, kind="stable")[:k]
    if user.history is not None and len(user.history):
        because = np.argmax(candidates[order] @ user.history.T, axis=1)
    else:
        because = np.full(len(order), -1)
    return Ranked(order=order, scores=scores[order], because=because)

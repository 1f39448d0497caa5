"""The first ranking function: interest similarity plus a popularity prior.

score = w_long * cos(long-term interest, item)
      + w_short * cos(short-term interest, item)
      + w_context * cos(items being looked at, item)
      + w_pop * (1 + churn_boost * churn) * log(1 + events) / log(1 + events of the most popular item)
      - w_dislike * max(0, max cos(disliked item, item))
      + w_model * (item . model interest) / |model interest|
      + w_co * other shoppers who bought it beside the shopper's items
               / the most such shoppers among the candidates
      + w_value * the item's value: the share of its purchases after which
               the shopper came back and bought again (0..1,
               recsys_core.signals.item_value)

With a drift score, w_long and w_short keep their sum but lean to the short
term as drift rises (recsys_core.signals.interests.drift_aware_weights, the rule the
offline evaluation measured). The model interest is a trained user tower's
shopper vector (recsys serve --model DIR), which the model scores items
against by inner product: the term keeps that order among the candidates,
divided by the vector's length (the tower's learned logit scale, about 20)
so that w_model weighs it like a cosine term whatever model is served.
The co-purchase term (recsys_core.signals.copurchase) carries what item text cannot
across categories; its weight was chosen on the cross-category task's
validation targets with this very function (scripts/results.py, `cross`).
The value term is the stated value-aware objective (docs/results.md,
"Value-aware ranking"): it trades some NDCG@10 for showing items after which
shoppers keep buying; its weight was chosen on validation targets of the
retail and Office data with this function (`recsys value-curve`).
Terms whose user signal is absent drop out.

The score comes in two halves, so that serving and offline evaluation share
one implementation while no vector has to travel to the ranking service:
`features` is the vector half (the similarities above, computed by the
embedding service where the item vectors are), `score_features` the rest
(weights, drift, popularity, co-purchases; the ranking service). `score`
and `rank` chain both for callers that hold the vectors (training/).
With RANKING_MODEL the ranking service scores with a learned model instead
(recsys_core/ranking/learned.py), over feature rows built from the same
`Features` and request fields; these weights stay the default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys_core.errors import InvalidArgument
from recsys_core.signals.interests import DriftSettings, drift_aware_weights


@dataclass(frozen=True)
class Weights:
    long_term: float
    short_term: float
    context: float
    popularity: float
    churn_boost: float = 0.0
    dislike: float = 0.0
    drift: DriftSettings = DriftSettings()
    model: float = 0.0
    co_purchase: float = 0.0
    value: float = 0.0


# The weights the ranking service serves unless RANKING_*_WEIGHT says
# otherwise; offline evaluation scores "what serving answers" with these same
# numbers, so they live here, below both.
SERVING_WEIGHTS = Weights(
    long_term=0.5,
    short_term=0.3,
    # A shopper on a product page wants that page's neighbourhood first.
    context=1.2,
    popularity=0.1,
    # The popularity weight grows by this factor times the churn probability.
    churn_boost=1.0,
    # How hard a candidate close to a disliked item is pushed down.
    dislike=0.3,
    # The trained user tower's order (recsys serve --model DIR): the strongest
    # single term, since the model was trained for exactly this.
    model=1.0,
    # Other shoppers' co-purchases; chosen on the cross-category task's
    # validation targets (docs/results.md).
    co_purchase=0.4,
    # The value-aware objective's weight: the largest of the swept weights
    # whose validation NDCG@10 stays within 2 % of the plain order's on both
    # the retail and the Office data (docs/results.md, "Value-aware ranking").
    value=0.03,
)

@dataclass(frozen=True)
class UserVectors:
    long_term: np.ndarray | None
    short_term: np.ndarray | None
    context: np.ndarray | None
    # Recent history item embeddings, most recent first (rows), for explanations.
    history: np.ndarray | None
    drift_score: float | None = None
    churn_probability: float | None = None
    disliked: np.ndarray | None = None  # rows
    model_interest: np.ndarray | None = None


@dataclass(frozen=True)
class Features:
    """Per candidate (parallel arrays, float32), the terms of the score that
    need vectors: serving computes them where the vectors live (the embedding
    service) and ranking scores from them alone; offline evaluation does both
    here. A term whose user vector is absent is 0."""
    long_term: np.ndarray
    short_term: np.ndarray
    context: np.ndarray
    # (item . model interest) / |model interest|
    model: np.ndarray
    # max(0, max cos(disliked item, item))
    disliked: np.ndarray

    def __len__(self) -> int:
        return len(self.long_term)


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
        ("user.model_interest", user.model_interest),
    ):
        if vector is not None and vector.shape != (dimension,):
            raise InvalidArgument(name, f"has {vector.shape[0]} values, candidates have {dimension}")
    if user.history is not None and user.history.shape[1] != dimension:
        raise InvalidArgument("user.recent_items", f"embeddings must have {dimension} values")
    if user.disliked is not None and user.disliked.shape[1] != dimension:
        raise InvalidArgument("user.disliked", f"embeddings must have {dimension} values")
    check_shares(user.drift_score, user.churn_probability)


def check_shares(drift_score: float | None, churn_probability: float | None) -> None:
    for name, value in (("user.drift_score", drift_score), ("user.churn_probability", churn_probability)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InvalidArgument(name, f"must be between 0 and 1, got {value}")


def features(user: UserVectors, candidates: np.ndarray) -> Features:
    """The vector half of the score: each candidate's similarity to the
    shopper's vectors (rows of `candidates` are unit item vectors)."""
    check_dimensions(user, candidates)
    zeros = np.zeros(len(candidates), dtype=np.float32)

    def similarity(vector):
        return zeros if vector is None else (candidates @ vector).astype(np.float32, copy=False)

    model = zeros
    if user.model_interest is not None:
        length = float(np.linalg.norm(user.model_interest))
        if length > 0:
            model = ((candidates @ user.model_interest) / length).astype(np.float32, copy=False)
    disliked = zeros
    if user.disliked is not None and len(user.disliked):
        disliked = np.maximum(candidates @ user.disliked.T, 0.0).max(axis=1).astype(np.float32, copy=False)
    return Features(similarity(user.long_term), similarity(user.short_term), similarity(user.context), model,
                    disliked)


def explain(candidates: np.ndarray, history: np.ndarray | None) -> np.ndarray:
    """Per candidate, the history row most similar to it; -1 without history."""
    if history is None or not len(history):
        return np.full(len(candidates), -1)
    return np.argmax(candidates @ history.T, axis=1)


def score_features(
    features: Features,
    popularity: np.ndarray,
    max_popularity: np.ndarray,
    weights: Weights,
    drift_score: float | None = None,
    churn_probability: float | None = None,
    co_purchases: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Every candidate's score (the formula above) from its features;
    `co_purchases`: per candidate, shoppers who bought it beside the
    shopper's items; `values`: per candidate, its value (0..1; see
    check_values)."""
    scores = np.zeros(len(features), dtype=np.float32)
    long_weight, short_weight = drift_aware_weights(weights.long_term, weights.short_term, drift_score, weights.drift)
    # The terms are added in one fixed order: float32 sums depend on it.
    for feature, weight in (
        (features.long_term, long_weight),
        (features.short_term, short_weight),
        (features.context, weights.context),
    ):
        if weight:
            scores += weight * feature
    popularity_weight = weights.popularity * (1.0 + weights.churn_boost * (churn_probability or 0.0))
    if popularity_weight:
        denominator = np.log1p(np.maximum(max_popularity, 1)).astype(np.float32)
        scores += popularity_weight * np.log1p(np.maximum(popularity, 0)).astype(np.float32) / denominator
    if weights.dislike:
        scores -= weights.dislike * features.disliked
    if weights.model:
        scores += weights.model * features.model
    if co_purchases is not None and weights.co_purchase and len(co_purchases):
        strongest = float(np.max(co_purchases))
        if strongest > 0:
            scores += (weights.co_purchase / strongest) * np.maximum(co_purchases, 0).astype(np.float32)
    if values is not None:
        add_value(scores, values, weights.value)
    return scores


def add_value(scores: np.ndarray, values: np.ndarray, weight: float) -> np.ndarray:
    """The value term, added in place as the score's last term: serving
    (score_features) and the offline weight sweep (training/value_curve.py,
    which scores the rest once per shopper and adds this at each weight)
    call this one function, so the curve measures what serving ranks."""
    if weight and len(values):
        scores += weight * values.astype(np.float32, copy=False)
    return scores


def check_values(values: np.ndarray) -> None:
    """An item value is a share (0..1): outside it, or not finite, the value
    term would swamp the relevance terms and the order would mean nothing."""
    bad = ~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"candidates[{position}].value", f"must be between 0 and 1, got {values[position]:g}")


def score(
    user: UserVectors,
    candidates: np.ndarray,
    popularity: np.ndarray,
    max_popularity: np.ndarray,
    weights: Weights,
    co_purchases: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Every candidate's score from vectors: `features`, then `score_features`."""
    return score_features(features(user, candidates), popularity, max_popularity, weights, user.drift_score,
                          user.churn_probability, co_purchases, values)


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores (every one for k <= 0), best first."""
    k = len(scores) if k <= 0 else min(k, len(scores))
    # Stable sort on the negated score keeps retrieval order among ties.
    return np.argsort(-scores, kind="stable")[:k]


def rank(
    user: UserVectors,
    candidates: np.ndarray,
    popularity: np.ndarray,
    max_popularity: np.ndarray,
    weights: Weights,
    k: int,
    co_purchases: np.ndarray | None = None,
) -> Ranked:
    scores = score(user, candidates, popularity, max_popularity, weights, co_purchases)
    order = top(scores, k)
    return Ranked(order=order, scores=scores[order], because=explain(candidates[order], user.history))

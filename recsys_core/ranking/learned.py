"""The learned ranker: per (shopper, candidate) features in one place, and a
LightGBM LambdaRank model scoring from them.

`feature_matrix` is the one feature builder. The ranking service calls it
on what a Rank request carries (the embedding service's similarities, the
profile's popularity, co-purchases, drift and churn), and offline training
(training/ranker.py) calls it on the same quantities computed by the same
functions (`scoring.features` over the same interest vectors), so a model is
trained on exactly the columns it is served. Nothing here needs a new field
on the wire: the per-source ranks and shares are computed among the
request's candidates.

LightGBM rather than XGBoost: LambdaRank is native (`objective=lambdarank`,
queries as groups, NDCG@k as the early-stopping metric), training on a few
million rows is fast on two CPU cores with histogram binning, the model is a
small text file, and scoring goes through the Booster's C++ predictor (no
Python per tree), a few hundred candidates per request in well under a
millisecond of model time.

A model names its columns (Booster.feature_name()); loading refuses a model
that asks for a column this builder does not make, so a model trained on a
newer feature set cannot be served silently with zeros. A model may use a
subset of the columns (the ablation models do): it is given just those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_core.errors import InvalidArgument
from recsys_core.ranking.scoring import Features

# Per-source retrieval signals: each similarity is one source's score (the
# long-term, short-term, context and model interests each retrieve their own
# neighbours); its rank among the candidates says how high that source put it.
SIMILARITIES = ("long_term_similarity", "short_term_similarity", "context_similarity", "model_similarity")

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "retrieval": SIMILARITIES + ("long_term_rank", "short_term_rank", "context_rank", "model_rank",
                                 "retrieval_score"),
    "dislike": ("disliked_similarity",),
    "popularity": ("log_popularity", "popularity_share", "popularity_rank"),
    "co_purchase": ("log_co_purchases", "co_purchase_share", "co_purchase_rank"),
    # The same for every candidate of a shopper: they act only through
    # interactions with the others (a drifting shopper's short-term
    # similarity counting for more, say).
    "shopper": ("drift_score", "churn_probability", "candidates"),
}
FEATURE_NAMES: tuple[str, ...] = tuple(name for group in FEATURE_GROUPS.values() for name in group)
MANIFEST_SUFFIX = ".json"


def _ranks(values: np.ndarray) -> np.ndarray:
    """0-based rank of each value among all, highest first; ties share the
    best rank, so the order of the candidates in a request does not matter."""
    descending = np.sort(-values)
    return np.searchsorted(descending, -values, side="left").astype(np.float32)


def _source(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A source's values and ranks; missing (NaN) when the source is absent
    for this shopper (every value 0: the wire's "no user signal")."""
    if not np.any(values):
        missing = np.full(len(values), np.nan, dtype=np.float32)
        return missing, missing
    return values.astype(np.float32, copy=False), _ranks(values)


def feature_matrix(features: Features, popularity: np.ndarray, max_popularity: np.ndarray,
                   drift_score: float | None = None, churn_probability: float | None = None,
                   co_purchases: np.ndarray | None = None) -> np.ndarray:
    """[candidates, len(FEATURE_NAMES)] float32, columns in FEATURE_NAMES'
    order; NaN marks a value that is unknown (LightGBM's missing value)."""
    n = len(features)
    columns: dict[str, np.ndarray] = {}
    sources = []
    for name in SIMILARITIES:
        values, ranks = _source(getattr(features, name.removesuffix("_similarity")))
        columns[name] = values
        columns[name.replace("_similarity", "_rank")] = ranks
        sources.append(values)
    present = [values for values in sources if not np.isnan(values).all()]
    columns["retrieval_score"] = (np.max(present, axis=0) if present
                                  else np.full(n, np.nan, dtype=np.float32)).astype(np.float32)
    columns["disliked_similarity"] = features.disliked.astype(np.float32, copy=False)
    events = np.log1p(np.maximum(np.asarray(popularity, dtype=np.float32), 0))
    columns["log_popularity"] = events
    columns["popularity_share"] = events / np.log1p(np.maximum(np.asarray(max_popularity, dtype=np.float32), 1))
    columns["popularity_rank"] = _ranks(events)
    shared = np.zeros(n, dtype=np.float32) if co_purchases is None else np.maximum(
        np.asarray(co_purchases, dtype=np.float32), 0)
    strongest = float(shared.max()) if n else 0.0
    columns["log_co_purchases"] = np.log1p(shared)
    columns["co_purchase_share"] = shared / strongest if strongest > 0 else np.zeros(n, dtype=np.float32)
    columns["co_purchase_rank"] = _ranks(shared) if strongest > 0 else np.full(n, np.nan, dtype=np.float32)
    columns["drift_score"] = np.full(n, np.nan if drift_score is None else drift_score, dtype=np.float32)
    columns["churn_probability"] = np.full(n, np.nan if churn_probability is None else churn_probability,
                                           dtype=np.float32)
    columns["candidates"] = np.full(n, n, dtype=np.float32)
    return np.column_stack([columns[name] for name in FEATURE_NAMES]).astype(np.float32, copy=False) if n else \
        np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)


class ModelError(ValueError):
    """A ranking model that cannot be served: unreadable, or asking for
    columns the feature builder does not make."""


@dataclass(frozen=True)
class LearnedRanker:
    booster: object  # lightgbm.Booster
    columns: np.ndarray  # positions in FEATURE_NAMES of the model's features, in its order
    feature_names: tuple[str, ...]
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> "LearnedRanker":
        """The model file (LightGBM text format) and its manifest beside it
        (`<model>.json`, optional); fails with ModelError saying what is wrong."""
        import lightgbm

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        try:
            booster = lightgbm.Booster(model_file=str(path))
        except lightgbm.basic.LightGBMError as error:
            raise ModelError(f"{path}: not a LightGBM model ({str(error).strip()})") from error
        names = tuple(booster.feature_name())
        unknown = [name for name in names if name not in FEATURE_NAMES]
        if unknown:
            raise ModelError(f"{path}: the model uses features the ranking service does not compute: {unknown} "
                             f"(known: {list(FEATURE_NAMES)})")
        manifest_path = manifest_path_of(path)
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        listed = manifest.get("feature_names")
        if listed is not None and tuple(listed) != names:
            raise ModelError(f"{path}: the manifest's feature names {listed} differ from the model's {list(names)}")
        position = {name: i for i, name in enumerate(FEATURE_NAMES)}
        return cls(booster, np.asarray([position[name] for name in names], dtype=np.int64), names, manifest)

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Scores for rows of `feature_matrix`; a row of the wrong width is refused."""
        if matrix.ndim != 2 or matrix.shape[1] != len(FEATURE_NAMES):
            raise InvalidArgument("candidates", f"expected {len(FEATURE_NAMES)} feature columns, got {matrix.shape}")
        if not len(matrix):
            return np.zeros(0, dtype=np.float32)
        # One thread: a request scores a few hundred rows, where thread
        # start-up costs more than it saves, and the service runs many at once.
        return self.booster.predict(matrix[:, self.columns], num_threads=1).astype(np.float32)


def score_learned(ranker: LearnedRanker, features: Features, popularity: np.ndarray, max_popularity: np.ndarray,
                  drift_score: float | None = None, churn_probability: float | None = None,
                  co_purchases: np.ndarray | None = None) -> np.ndarray:
    """`scoring.score_features`' counterpart: the model's score per candidate."""
    return ranker.score(feature_matrix(features, popularity, max_popularity, drift_score, churn_probability,
                                       co_purchases))


def manifest_path_of(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + MANIFEST_SUFFIX)

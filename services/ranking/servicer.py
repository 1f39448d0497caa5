"""gRPC face of the scorer: parse, call the domain, build the reply."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import InvalidArgument, quoted
from recsys_core.experiments.arms import HAND, ranker_version
from recsys_core.models.hot_swap import Loaded, Served
from recsys_core.models.registry import MANIFEST
from recsys_core.ranking.versions import RankerVersions
from recsys_core.rpc.grpc_util import handle_errors
from recsys_core.rpc.runtime import BlockingPool
from services.ranking.config import RankingConfig
from recsys_core.signals.interests import DriftSettings
from recsys_core.signals.item_value import ItemValues
from recsys_core.ranking.learned import LearnedRanker, score_learned
from recsys_core.ranking.scoring import Features, Weights, check_shares, check_values, score_features, top


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, config: RankingConfig, blocking: BlockingPool,
                 ranker: LearnedRanker | Served[LearnedRanker | None] | None = None,
                 versions: RankerVersions | None = None, item_values: ItemValues | None = None):
        self.config = config
        # RANKING_ITEM_VALUES: what the value term reads when a request carries no value.
        self.item_values = item_values
        self.blocking = blocking
        # What a request naming no version gets: the learned model
        # (RANKING_MODEL's, or the registry's promoted version, swapped on
        # promotion), or None: the weights.
        self.models = ranker if isinstance(ranker, Served) else Served(Loaded(ranker))
        # Registry versions an A/B arm's request names (RankRequest.model_version).
        self.versions = versions if versions is not None else RankerVersions(None)
        # How replies name RANKING_MODEL's file: read once, not per call.
        self._model_file_label = model_label(config.model) if config.model else ""
        self.weights = Weights(
            long_term=config.long_term_weight,
            short_term=config.short_term_weight,
            context=config.context_weight,
            popularity=config.popularity_weight,
            churn_boost=config.churn_popularity_boost,
            dislike=config.dislike_weight,
            model=config.model_weight,
            co_purchase=config.co_purchase_weight,
            value=config.value_weight,
            drift=DriftSettings(
                short_share_stable=config.drift_short_share_stable,
                short_share_drifting=config.drift_short_share_drifting,
            ),
        )

    @property
    def ranker(self) -> LearnedRanker | None:
        return self.models.current.value

    @handle_errors
    async def Rank(self, request, context):
        if not request.candidates:
            _, label = await self._model(request.model_version)
            return ranking_pb2.RankResponse(model_version=label)
        if len(request.candidates) > self.config.max_candidates:
            raise InvalidArgument(
                "candidates", f"at most {self.config.max_candidates} candidates, got {len(request.candidates)}"
            )
        if request.k < 0:
            raise InvalidArgument("k", "must not be negative")
        user = request.user
        drift = user.drift_score if user.HasField("drift_score") else None
        churn = user.churn_probability if user.HasField("churn_probability") else None
        check_shares(drift, churn)
        features = candidate_features(request.candidates)
        popularity = np.asarray([c.popularity for c in request.candidates], dtype=np.float32)
        max_popularity = np.asarray([c.max_popularity for c in request.candidates], dtype=np.float32)
        co_purchases = np.asarray([c.co_purchases for c in request.candidates], dtype=np.float32)
        values = np.asarray([c.value for c in request.candidates], dtype=np.float32)
        check_values(values)
        if self.item_values is not None and not values.any():
            values = self.item_values.of([c.item_id for c in request.candidates])
        ranker, label = await self._model(request.model_version)
        if ranker is not None:
            scores = await self.blocking.run(score_learned, ranker, features, popularity, max_popularity,
                                             drift, churn, co_purchases)
        else:
            scores = await self.blocking.run(score_features, features, popularity, max_popularity, self.weights,
                                             drift, churn, co_purchases, values)
        reply = ranking_pb2.RankResponse(model_version=label)
        for position in top(scores, request.k):
            reply.candidates.add(item_id=request.candidates[position].item_id, score=float(scores[position]))
        return reply

    def default_label(self, ranker: LearnedRanker | None) -> str:
        return HAND if ranker is None else self._model_file_label

    async def _model(self, asked: str) -> tuple[LearnedRanker | None, str]:
        """The model a request names and its label: None for the weights."""
        if not asked:
            # Read once: a swap during this call does not change who scores it.
            loaded = self.models.current
            return loaded.value, loaded.label or self.default_label(loaded.value)
        if asked == HAND:
            return None, HAND
        version = ranker_version(asked)
        if version is None:
            raise InvalidArgument("model_version", f"{quoted(asked)}: expected 'hand' or 'ranker/<version>'")
        promoted = self.models.get(version)
        if promoted is not None:
            return promoted.value, asked
        held = self.versions.held_ranker(version)
        if held is not None:
            return held, asked
        # A first use reads the file: off the event loop.
        return await self.blocking.run(self.versions.get, version), asked


def model_label(path: str) -> str:
    """How replies name RANKING_MODEL's model: its registry label when the
    file sits in a registry version, else its path."""
    folder = Path(path).resolve().parent
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return f"{manifest['kind']}/{int(manifest['version'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return path


FEATURE_FIELDS = ("long_term_similarity", "short_term_similarity", "context_similarity", "model_similarity",
                  "disliked_similarity")


# Features are similarities: cosines for the pretrained encoder's unit
# vectors, a little more with a trained model's (encoder output plus an ID
# vector, not unit). Far beyond that a finite value (3.4e38) overflows the
# weighted sum to an infinite or NaN score, and the reply's order means nothing.
FEATURE_BOUND = 1e6


def candidate_features(candidates) -> Features:
    """The candidates' features as parallel float32 arrays; non-finite values
    and values beyond +-FEATURE_BOUND are refused, naming the first candidate that has one."""
    columns = np.asarray(
        [[getattr(c.features, name) for name in FEATURE_FIELDS] for c in candidates], dtype=np.float32
    ).reshape(len(candidates), len(FEATURE_FIELDS))
    finite = np.isfinite(columns)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise InvalidArgument(f"candidates[{row}].features.{FEATURE_FIELDS[column]}", "must be finite")
    outside = np.abs(columns) > FEATURE_BOUND
    if outside.any():
        row, column = np.argwhere(outside)[0]
        raise InvalidArgument(f"candidates[{row}].features.{FEATURE_FIELDS[column]}",
                              f"is {columns[row, column]:g}; a similarity lies within +-{FEATURE_BOUND:g}")
    return Features(*(np.ascontiguousarray(columns[:, i]) for i in range(len(FEATURE_FIELDS))))

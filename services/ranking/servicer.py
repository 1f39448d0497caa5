"""gRPC face of the scorer: parse, call the domain, build the reply."""
from __future__ import annotations

import numpy as np

from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import InvalidArgument
from recsys_core.rpc.grpc_util import handle_errors
from recsys_core.rpc.runtime import BlockingPool
from recsys_core.rpc.messages import from_vector, has_values, stack
from services.ranking.config import RankingConfig
from recsys_core.signals.interests import DriftSettings
from recsys_core.ranking.scoring import UserVectors, Weights, rank


def optional_vector(vector, field: str) -> np.ndarray | None:
    return from_vector(vector, field) if has_values(vector) else None


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, config: RankingConfig, blocking: BlockingPool):
        self.config = config
        self.blocking = blocking
        self.weights = Weights(
            long_term=config.long_term_weight,
            short_term=config.short_term_weight,
            context=config.context_weight,
            popularity=config.popularity_weight,
            churn_boost=config.churn_popularity_boost,
            dislike=config.dislike_weight,
            model=config.model_weight,
            co_purchase=config.co_purchase_weight,
            drift=DriftSettings(
                short_share_stable=config.drift_short_share_stable,
                short_share_drifting=config.drift_short_share_drifting,
            ),
        )

    @handle_errors
    async def Rank(self, request, context):
        if not request.candidates:
            return ranking_pb2.RankResponse()
        if len(request.candidates) > self.config.max_candidates:
            raise InvalidArgument(
                "candidates", f"at most {self.config.max_candidates} candidates, got {len(request.candidates)}"
            )
        if request.k < 0:
            raise InvalidArgument("k", "must not be negative")
        candidates = stack([c.embedding for c in request.candidates], "candidates.embedding")
        if candidates.shape[1] == 0:
            raise InvalidArgument("candidates[0].embedding", "is empty")
        history_items = [h for h in request.user.recent_items if has_values(h.embedding)]
        user = UserVectors(
            long_term=optional_vector(request.user.long_term_interest, "user.long_term_interest"),
            short_term=optional_vector(request.user.short_term_interest, "user.short_term_interest"),
            context=optional_vector(request.user.context_interest, "user.context_interest"),
            history=stack([h.embedding for h in history_items], "user.recent_items.embedding") if history_items else None,
            drift_score=request.user.drift_score if request.user.HasField("drift_score") else None,
            churn_probability=request.user.churn_probability if request.user.HasField("churn_probability") else None,
            disliked=stack(list(request.user.disliked), "user.disliked") if request.user.disliked else None,
            model_interest=optional_vector(request.user.model_interest, "user.model_interest"),
        )
        ranked = await self.blocking.run(
            rank,
            user,
            candidates,
            np.asarray([c.popularity for c in request.candidates], dtype=np.float32),
            np.asarray([c.max_popularity for c in request.candidates], dtype=np.float32),
            self.weights,
            request.k,
            np.asarray([c.co_purchases for c in request.candidates], dtype=np.float32),
        )
        reply = ranking_pb2.RankResponse()
        for position, score, because in zip(ranked.order, ranked.scores, ranked.because):
            reply.candidates.add(
                item_id=request.candidates[position].item_id,
                score=float(score),
                because_item_id=history_items[because].item_id if because >= 0 else "",
            )
        return reply

"""gRPC face of the gateway: parse, call the composer, build the reply.

The composer calls downstream with grpc.aio stubs on the server's event
loop, so no thread waits on the network; each call takes a slot of the
blocking pool's bound (`admitted`), which refuses work beyond it with
RESOURCE_EXHAUSTED as for every other server.
"""
from __future__ import annotations

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_core.rpc.access import audit
from recsys_core.rpc.grpc_util import Deadline, Readiness, handle_errors
from recsys_core.rpc.runtime import BlockingPool
from services.gateway.composer import (COLD_START, EMBEDDING, FALLBACK, PERSONALISED, PROFILE, RANKING, Composer,
                                       Recommendation)
from services.gateway.config import GatewayConfig
from services.gateway.exposures import ExposureLog, exposure

PATHS = {
    PERSONALISED: gateway_pb2.RECOMMENDATION_PATH_PERSONALISED,
    COLD_START: gateway_pb2.RECOMMENDATION_PATH_COLD_START,
    FALLBACK: gateway_pb2.RECOMMENDATION_PATH_FALLBACK,
}
STAGES = {
    PROFILE: gateway_pb2.STAGE_PROFILE,
    EMBEDDING: gateway_pb2.STAGE_EMBEDDING,
    RANKING: gateway_pb2.STAGE_RANKING,
}


def item_messages(recommendations: list[Recommendation]) -> list[gateway_pb2.RecommendedItem]:
    return [
        gateway_pb2.RecommendedItem(item_id=r.item_id, category=r.category, title=r.title, score=r.score, reason=r.reason)
        for r in recommendations
    ]


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, readiness: Readiness, composer: Composer, config: GatewayConfig, blocking: BlockingPool,
                 exposures: ExposureLog | None = None):
        self.readiness = readiness
        self.composer = composer
        self.config = config
        self.blocking = blocking
        # A/B arms (GATEWAY_AB_ARMS): the shopper's arm picks the ranking
        # model; what was shown goes to the exposure log. None: no experiment.
        self.experiment = config.experiment
        self.exposures = exposures

    @handle_errors
    async def Recommend(self, request, context):
        self.readiness.require()
        arm = self.experiment.assign(request.user_id) if self.experiment is not None and request.user_id else None
        with self.blocking.admitted():
            recommendations, path, skipped, ranked_by = await self.composer.recommend(
                user_id=request.user_id,
                k=request.k,
                categories=list(request.categories),
                exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
                context_ids=list(request.context_item_ids),
                deadline=Deadline(context, self.config.request_timeout_seconds),
                spread_interests=request.spread_interests,
                explore_slots=request.explore_slots,
                model_version=arm.model_version if arm is not None else "",
            )
        if arm is not None and recommendations and self.exposures is not None:
            self.exposures.offer(exposure(request.user_id, self.experiment.salt, arm.name, ranked_by,
                                          [r.item_id for r in recommendations]))
        return gateway_pb2.RecommendResponse(items=item_messages(recommendations), path=PATHS[path],
                                             skipped_stages=[STAGES[stage] for stage in skipped],
                                             arm=arm.name if arm is not None else "", model_version=ranked_by)

    @handle_errors
    async def GetProfile(self, request, context):
        self.readiness.require()
        with self.blocking.admitted():
            return await self.composer.shopper_profile(
                request.user_id, request.history_limit, Deadline(context, self.config.request_timeout_seconds),
            )

    @handle_errors
    async def DeleteUser(self, request, context):
        self.readiness.require()
        with self.blocking.admitted():
            reply = await self.composer.delete_user(
                request.user_id, Deadline(context, self.config.request_timeout_seconds),
            )
        # The profile service logs the gateway's certificate as the caller;
        # this line names who asked the gateway.
        audit("gateway", "DeleteUser", user_id=reply.user_id, events_removed=reply.events_removed,
              items_affected=reply.items_affected)
        return reply

    @handle_errors
    async def SimilarItems(self, request, context):
        self.readiness.require()
        with self.blocking.admitted():
            recommendations, model_version = await self.composer.similar_items(
                item_id=request.item_id,
                k=request.k,
                categories=list(request.categories),
                deadline=Deadline(context, self.config.request_timeout_seconds),
            )
        return gateway_pb2.SimilarItemsResponse(items=item_messages(recommendations), model_version=model_version)

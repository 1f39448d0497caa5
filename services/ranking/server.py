"""Ranking service: scores candidates for a shopper. Stateless."""
from __future__ import annotations

import logging
import sys

from prometheus_client import Histogram

from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import FailedPrecondition
from recsys_core.models.registry import Registry
from recsys_core.ranking.learned import LearnedRanker, ModelError
from recsys_core.ranking.versions import RankerVersions
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.grpc_util import ManagedServer, build_server, serve_main
from services.ranking.config import RankingConfig
from services.ranking.servicer import RankingServicer

log = logging.getLogger(__name__)
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


CANDIDATE_BUCKETS = (0, 10, 25, 50, 100, 200, 300, 500, 1000, 2000, 5000)


def register_metrics(server: ManagedServer) -> None:
    """recsys_ranking_candidates: candidates per answered Rank request."""
    candidates = Histogram(
        "recsys_ranking_candidates", "Candidates per successful Rank request.",
        buckets=CANDIDATE_BUCKETS, registry=server.metrics.registry,
    )
    server.metrics.on_reply(SERVICE_NAME, "Rank", lambda request, _reply: candidates.observe(len(request.candidates)))


def load_model(config: RankingConfig) -> LearnedRanker | None:
    """RANKING_MODEL's model, or None for the hand weights; a bad one stops
    the start (ConfigError naming the variable) before any port is bound."""
    if not config.model:
        log.info("ranking with the hand-set weights (RANKING_MODEL unset)")
        return None
    try:
        ranker = LearnedRanker.load(config.model)
    except ModelError as error:
        raise ConfigError(f"RANKING_MODEL: {error}") from error
    log.info("ranking with the learned model %s (%d features, %d trees)", config.model,
             len(ranker.feature_names), ranker.booster.num_trees())
    return ranker


def load_versions(config: RankingConfig) -> RankerVersions:
    """The registry's rankers A/B arms may name; RANKING_MODEL_VERSIONS
    loaded now, so a missing one stops the start (ConfigError)."""
    # Unset: the registry's default (RECSYS_MODEL_REGISTRY, else var/models),
    # where `recsys train-ranker` versions land locally.
    registry = Registry(config.model_registry or None)
    versions = RankerVersions(registry, capacity=config.max_model_versions)
    for version in config.model_versions:
        try:
            versions.get(version)
        except FailedPrecondition as error:
            raise ConfigError(f"RANKING_MODEL_VERSIONS: {error}") from error
    return versions


def create_server(config: RankingConfig) -> tuple[ManagedServer, int]:
    ranker = load_model(config)
    versions = load_versions(config)
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "ranking", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port,
        tracing=config.tracing,
    )
    register_metrics(server)
    server.add(ranking_pb2_grpc.add_RankingServiceServicer_to_server, RankingServicer(config, server.blocking, ranker,
                                                                                       versions))
    # The model, if any, is loaded already: ready as soon as it is built.
    server.readiness.start(lambda: None)
    return server, port


def main() -> int:
    return serve_main("ranking", RankingConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())

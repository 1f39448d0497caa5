"""Ranking service: scores candidates for a shopper. Stateless."""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily

from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import FailedPrecondition
from recsys_core.models.hot_swap import Loaded, Served, follow_promotions
from recsys_core.models.registry import MANIFEST as VERSION_MANIFEST, ModelVersion, Registry
from recsys_core.ranking.learned import MANIFEST_SUFFIX, LearnedRanker, ModelError
from recsys_core.ranking.versions import RankerVersions
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.signals.item_value import ItemValues, ItemValuesError
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


def load_item_values(config: RankingConfig) -> ItemValues | None:
    """RANKING_ITEM_VALUES' table, or None; a bad one stops the start."""
    if not config.item_values:
        return None
    try:
        table = ItemValues.load(config.item_values)
    except ItemValuesError as error:
        raise ConfigError(f"RANKING_ITEM_VALUES: {error}") from error
    log.info("item values for %d items from %s (value weight %g)", len(table.values), config.item_values,
             config.value_weight)
    return table


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


RANKER_KIND = "ranker"


def ranker_file(folder: Path) -> Path:
    """The model file of a registry ranker version: what `recsys train-ranker`
    wrote (ranker.txt and its ranker.txt.json), the registry's manifest aside."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name != VERSION_MANIFEST
             and not p.name.endswith(MANIFEST_SUFFIX)]
    if len(files) != 1:
        raise ModelError(f"{folder}: expected one LightGBM model file beside {VERSION_MANIFEST}, found "
                         f"{sorted(p.name for p in files) or 'none'}")
    return files[0]


def load_version(version: ModelVersion) -> Loaded[LearnedRanker]:
    ranker = LearnedRanker.load(ranker_file(version.path))
    log.info("ranker %s loaded from %s (%d features, %d trees)", version.label, version.path,
             len(ranker.feature_names), ranker.booster.num_trees())
    return Loaded(ranker, version.version, version.label)


def initial_models(config: RankingConfig) -> Served[LearnedRanker | None]:
    """What ranks at start: RANKING_MODEL's file, the registry's promoted
    ranker, or the hand weights (a None ranker). A bad model stops the start."""
    if not config.model_registry:
        return Served(Loaded(load_model(config)))
    promoted = Registry(config.model_registry).promoted(RANKER_KIND)
    if promoted is None:
        log.info("no ranker promoted in %s yet: ranking with the hand-set weights until one is",
                 config.model_registry)
        return Served(Loaded(None))
    try:
        return Served(load_version(promoted))
    except ModelError as error:
        raise ConfigError(f"RANKING_MODEL_REGISTRY: promoted {promoted.label}: {error}") from error


class RankerCollector:
    """The serving ranker version (0: none from the registry) and swaps so far."""

    def __init__(self, models: Served):
        self.models = models

    def collect(self):
        version = GaugeMetricFamily("recsys_ranking_model_version",
                                    "Registry version of the ranker serving (0: RANKING_MODEL's file or the weights).")
        version.add_metric([], float(self.models.current.version or 0))
        yield version
        swaps = GaugeMetricFamily("recsys_ranking_model_swaps", "Rankers swapped in since start.")
        swaps.add_metric([], float(self.models.swaps))
        yield swaps


def follow_rankers(config: RankingConfig, models: Served, stop: threading.Event) -> None:
    def swap(version: ModelVersion) -> None:
        # Loaded whole before the swap: a model that fails to load raises
        # here, and follow_promotions logs it and keeps the old one.
        models.add(load_version(version))
        log.info("ranking with %s", version.label)

    follow_promotions(Registry(config.model_registry), RANKER_KIND, swap, stop, config.model_poll_seconds,
                      already=models.current.version, name="ranking")


def create_server(config: RankingConfig) -> tuple[ManagedServer, int]:
    models = initial_models(config)
    versions = load_versions(config)
    item_values = load_item_values(config)
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "ranking", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port,
        tracing=config.tracing,
    )
    register_metrics(server)
    server.metrics.registry.register(RankerCollector(models))
    server.add(ranking_pb2_grpc.add_RankingServiceServicer_to_server,
               RankingServicer(config, server.blocking, models, versions, item_values))
    if config.model_registry:
        threading.Thread(target=follow_rankers, args=(config, models, server.stopping), name="ranker-follow",
                         daemon=True).start()
    # The model, if any, is loaded already: ready as soon as it is built.
    server.readiness.start(lambda: None)
    return server, port


def main() -> int:
    return serve_main("ranking", RankingConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())

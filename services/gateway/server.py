"""Gateway: the platform's public API, composing the other services."""
from __future__ import annotations

import logging
import sys
import time

import grpc
from prometheus_client import Counter, Gauge

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.grpc_util import ManagedServer, build_server, serve_main
from recsys_core.rpc.runtime import EventLoopThread
from services.gateway.composer import Composer, describe
from services.gateway.config import GatewayConfig
from services.gateway.exposures import ExposureLog
from services.gateway.servicer import PATHS, STAGES, GatewayServicer

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def wait_for_catalogue(composer: Composer, config: GatewayConfig, loop: EventLoopThread) -> None:
    """Ready once the embedding service answers with its categories; it may
    still be encoding the catalogue when the gateway starts. The call runs on
    the server's loop, whose aio channels the composer keeps."""
    give_up = time.monotonic() + config.startup_timeout_seconds
    while True:
        try:
            categories = loop.run(lambda: composer.refresh_categories(timeout=2.0))
            log.info("catalogue categories: %s", ", ".join(sorted(categories)))
            break
        except grpc.RpcError as error:
            if time.monotonic() > give_up:
                raise TimeoutError(
                    f"embedding service at {config.embedding_address} not ready after "
                    f"{config.startup_timeout_seconds:.0f}s: {error.details() if isinstance(error, grpc.Call) else error}"
                ) from error
            time.sleep(0.5)
    # The popular-items cache, Recommend's last resort, filled before the
    # first call where the profile service answers; else at the first calls.
    try:
        count = loop.run(lambda: composer.refresh_popular(timeout=2.0))
        log.info("%d popular items cached", count)
    except grpc.RpcError as error:
        count = 0
        log.warning("no popular items cached yet (the profile service did not answer), trying every second in the "
                    "background: %s", describe(error))
    if count == 0:
        loop.submit(composer.fill_popular)


def register_metrics(server: ManagedServer) -> None:
    """recsys_recommendations_total{path}: which path answered each Recommend;
    recsys_recommend_skipped_stages_total{stage}: the stages replies went without."""
    answered = Counter(
        "recsys_recommendations_total", "Recommend replies by the path that produced them.", ["path"],
        registry=server.metrics.registry,
    )
    path_of = {number: name for name, number in PATHS.items()}
    for name in path_of.values():
        answered.labels(name)  # every path shows, at 0, from the start
    skipped = Counter(
        "recsys_recommend_skipped_stages", "Recommend replies made without a stage whose service was unavailable.",
        ["stage"], registry=server.metrics.registry,
    )
    stage_of = {number: name for name, number in STAGES.items()}
    for name in stage_of.values():
        skipped.labels(name)

    def count(_request, reply) -> None:
        answered.labels(path_of.get(reply.path, "unspecified")).inc()
        for stage in reply.skipped_stages:
            skipped.labels(stage_of.get(stage, "unspecified")).inc()

    server.metrics.on_reply(SERVICE_NAME, "Recommend", count)


def create_server(config: GatewayConfig) -> tuple[ManagedServer, int]:
    if not config.auth.configured:
        raise ConfigError("gateway: callers must present tokens, and none can be checked: set "
                          "GATEWAY_AUTH_JWT_KEY_FILE and/or GATEWAY_AUTH_API_KEYS_FILE (docs/operations.md, \"Security\")")
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "gateway", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port, public=True,
        tracing=config.tracing, connection_age_seconds=config.connection_age_seconds,
    )
    register_metrics(server)
    composer = Composer(config, run_cpu=server.blocking.run_admitted, tracing=server.tracing)
    exposures = None
    if config.experiment is not None:
        log.info("A/B %s", config.experiment.describe())
        exposures = ExposureLog(lambda request, timeout: composer.profile.RecordExposures(request, timeout=timeout),
                                config.exposure_queue, config.exposure_batch, config.exposure_flush_seconds,
                                registry=server.metrics.registry)
        # What is still queued goes out before the channels close.
        server.after_drain(exposures.close)
    servicer = GatewayServicer(server.readiness, composer, config, server.blocking, exposures)
    server.add(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer)
    Gauge("recsys_gateway_popular_items_cached",
          "Popular items this gateway holds for when the profile service is down (Recommend's last resort).",
          registry=server.metrics.registry).set_function(lambda: composer.popular_cached)
    server.after_drain(composer.close)
    server.readiness.start(lambda: wait_for_catalogue(composer, config, server.loop))
    return server, port


def main() -> int:
    return serve_main("gateway", GatewayConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())

"""Gateway: the platform's public API, composing the other services."""
from __future__ import annotations

import logging
import sys
import time

import grpc
from prometheus_client import Counter

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.grpc_util import ManagedServer, build_server, serve_main
from recsys_core.rpc.runtime import EventLoopThread
from services.gateway.composer import Composer
from services.gateway.config import GatewayConfig
from services.gateway.servicer import PATHS, GatewayServicer

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
            return
        except grpc.RpcError as error:
            if time.monotonic() > give_up:
                raise TimeoutError(
                    f"embedding service at {config.embedding_address} not ready after "
                    f"{config.startup_timeout_seconds:.0f}s: {error.details() if isinstance(error, grpc.Call) else error}"
                ) from error
            time.sleep(0.5)


def register_metrics(server: ManagedServer) -> None:
    """recsys_recommendations_total{path}: which path answered each Recommend."""
    answered = Counter(
        "recsys_recommendations_total", "Recommend replies by the path that produced them.", ["path"],
        registry=server.metrics.registry,
    )
    path_of = {number: name for name, number in PATHS.items()}
    for name in path_of.values():
        answered.labels(name)  # every path shows, at 0, from the start
    server.metrics.on_reply(
        SERVICE_NAME, "Recommend", lambda _request, reply: answered.labels(path_of.get(reply.path, "unspecified")).inc()
    )


def create_server(config: GatewayConfig) -> tuple[ManagedServer, int]:
    if not config.auth.configured:
        raise ConfigError("gateway: callers must present tokens, and none can be checked: set "
                          "GATEWAY_AUTH_JWT_KEY_FILE and/or GATEWAY_AUTH_API_KEYS_FILE (docs/operations.md, \"Security\")")
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "gateway", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port, public=True,
        tracing=config.tracing,
    )
    register_metrics(server)
    composer = Composer(config, run_cpu=server.blocking.run_admitted, tracing=server.tracing)
    servicer = GatewayServicer(server.readiness, composer, config, server.blocking)
    server.add(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer)
    server.after_drain(composer.close)
    server.readiness.start(lambda: wait_for_catalogue(composer, config, server.loop))
    return server, port


def main() -> int:
    return serve_main("gateway", GatewayConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())

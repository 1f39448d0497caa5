from __future__ import annotations

import re
from dataclasses import dataclass

from recsys_core.experiments.arms import Arm, ArmsError, Experiment, parse_arms

from recsys_core.rpc.access import AuthConfig
from recsys_core.rpc.tracing import TracingConfig
from recsys_core.rpc.limits import DEFAULTS as LIMIT_DEFAULTS, ServerLimits, service_limits
from recsys_core.rpc.transport import Security
from recsys_core.rpc.envconfig import ConfigError, EnvReader


@dataclass(frozen=True)
class GatewayConfig:
    address: str = "127.0.0.1:50051"
    workers: int = 16
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    # Transport (mTLS certificates, or explicit plaintext for development) and
    # token checks: GATEWAY_TLS_*, GATEWAY_INSECURE, GATEWAY_REFLECTION,
    # GATEWAY_AUTH_* (docs/operations.md, "Security"). No certificates: no start.
    # A plaintext port serving grpc.health.v1 alone, for Kubernetes' gRPC
    # probes (they speak no TLS); unset: none.
    health_port: int | None = None
    # Callers' connections are closed (GOAWAY, their calls finishing) after
    # about this long, and a draining gateway waits up to that long for its
    # callers to reconnect elsewhere before it stops: outside callers resend
    # nothing, and a call that reaches a stopping server is cancelled
    # (docs/operations.md, "Draining"). Keep it below grace_seconds.
    connection_age_seconds: float = 5.0
    security: Security = Security(service="gateway")
    auth: AuthConfig = AuthConfig()
    # OpenTelemetry spans of every call, off by default: GATEWAY_TRACING=otlp|console|file,
    # GATEWAY_TRACING_* and the standard OTEL_* (recsys_core/rpc/tracing.py; docs/operations.md, "Tracing").
    tracing: TracingConfig = TracingConfig()
    # Request size, streams per connection, calls per second per caller:
    # GATEWAY_MAX_REQUEST_BYTES, _MAX_CONCURRENT_STREAMS, _RATE_LIMIT_PER_SECOND,
    # _RATE_LIMIT_BURST (recsys_core/rpc/limits.py; docs/operations.md, "Limits").
    limits: ServerLimits = LIMIT_DEFAULTS["gateway"]
    profile_address: str = "127.0.0.1:50053"
    embedding_address: str = "127.0.0.1:50052"
    ranking_address: str = "127.0.0.1:50054"
    # Budget for a whole request when the caller set no deadline.
    request_timeout_seconds: float = 5.0
    # Candidates retrieved per query vector: at least this many, or 3k.
    min_candidates: int = 50
    # The embedding service answers at most EMBEDDING_MAX_K (1000) per query.
    max_candidates: int = 1000
    # Recent history items that can explain a recommendation.
    explain_history: int = 20
    max_context_items: int = 50
    # How long to wait at start for the embedding service's catalogue.
    startup_timeout_seconds: float = 900.0
    categories_refresh_seconds: float = 30.0
    # The last resort when the profile service is down: its most popular
    # items (with titles) as last fetched, refreshed in the background at
    # most this often while Recommend calls come in.
    popular_cache_items: int = 500
    popular_refresh_seconds: float = 60.0
    # A/B arms (docs/operations.md, "A/B arms"): GATEWAY_AB_ARMS
    # `control=ranker/3:50,treatment=ranker/4:50` and GATEWAY_AB_SALT, the
    # experiment's id, which the stable hash of each shopper's arm is salted
    # with (required with arms). Unset: no experiment, no exposure log.
    ab_arms: tuple[Arm, ...] = ()
    ab_salt: str = ""
    # The exposure log: replies waiting to be recorded beyond this many are
    # dropped (and counted), never waited for; sent in batches of at most
    # exposure_batch, at least every exposure_flush_seconds.
    exposure_queue: int = 10_000
    exposure_batch: int = 200
    exposure_flush_seconds: float = 1.0

    @property
    def experiment(self) -> Experiment | None:
        return Experiment(self.ab_salt, self.ab_arms) if self.ab_arms else None

    @classmethod
    def from_env(cls, environ=None) -> "GatewayConfig":
        env = EnvReader("GATEWAY_", environ)
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            health_port=env.optional_int("HEALTH_PORT", minimum=1, maximum=65535),
            connection_age_seconds=env.float("CONNECTION_AGE_SECONDS", cls.connection_age_seconds, minimum=0.1,
                                             maximum=3600),
            security=Security.from_env(env, "gateway", public=True),
            auth=AuthConfig.from_env(env),
            tracing=TracingConfig.from_env(env),
            limits=service_limits(env, "gateway"),
            profile_address=env.str("PROFILE_ADDRESS", cls.profile_address),
            embedding_address=env.str("EMBEDDING_ADDRESS", cls.embedding_address),
            ranking_address=env.str("RANKING_ADDRESS", cls.ranking_address),
            request_timeout_seconds=env.float("REQUEST_TIMEOUT_SECONDS", cls.request_timeout_seconds, minimum=0.01),
            min_candidates=env.int("MIN_CANDIDATES", cls.min_candidates, minimum=1),
            max_candidates=env.int("MAX_CANDIDATES", cls.max_candidates, minimum=1),
            explain_history=env.int("EXPLAIN_HISTORY", cls.explain_history, minimum=0),
            max_context_items=env.int("MAX_CONTEXT_ITEMS", cls.max_context_items, minimum=0),
            startup_timeout_seconds=env.float("STARTUP_TIMEOUT_SECONDS", cls.startup_timeout_seconds, minimum=1),
            categories_refresh_seconds=env.float("CATEGORIES_REFRESH_SECONDS", cls.categories_refresh_seconds, minimum=0),
            popular_cache_items=env.int("POPULAR_CACHE_ITEMS", cls.popular_cache_items, minimum=0, maximum=1000),
            popular_refresh_seconds=env.float("POPULAR_REFRESH_SECONDS", cls.popular_refresh_seconds, minimum=0.1),
            **ab_settings(env),
            exposure_queue=env.int("EXPOSURE_QUEUE", cls.exposure_queue, minimum=1, maximum=1_000_000),
            exposure_batch=env.int("EXPOSURE_BATCH", cls.exposure_batch, minimum=1, maximum=1000),
            exposure_flush_seconds=env.float("EXPOSURE_FLUSH_SECONDS", cls.exposure_flush_seconds, minimum=0.01),
        )


def ab_settings(env: EnvReader) -> dict:
    try:
        arms = parse_arms(env.str("AB_ARMS", ""))
    except ArmsError as error:
        raise ConfigError(f"GATEWAY_AB_ARMS: {error}") from None
    salt = env.str("AB_SALT", "").strip()
    if arms and not salt:
        raise ConfigError("GATEWAY_AB_SALT: required with GATEWAY_AB_ARMS (the experiment's id; a new one "
                          "reshuffles shoppers across arms)")
    if salt and not re.fullmatch(r"[A-Za-z0-9_./:-]{1,64}", salt):
        raise ConfigError("GATEWAY_AB_SALT: 1..64 of A-Z a-z 0-9 _ . / : - (it names the experiment in the reports)")
    return {"ab_arms": arms, "ab_salt": salt}

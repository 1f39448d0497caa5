from __future__ import annotations

import math
from dataclasses import dataclass

from recsys_core.rpc.access import AuthConfig
from recsys_core.rpc.tracing import TracingConfig
from recsys_core.rpc.limits import DEFAULTS as LIMIT_DEFAULTS, ServerLimits, service_limits
from recsys_core.rpc.transport import Security
from recsys_core.rpc.envconfig import ConfigError, EnvReader
from recsys_core.ranking.scoring import SERVING_WEIGHTS

MAX_VALUE_WEIGHT = 10.0


@dataclass(frozen=True)
class RankingConfig:
    address: str = "127.0.0.1:50054"
    workers: int = 8
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    # Transport (mTLS certificates, or explicit plaintext for development) and
    # token checks: RANKING_TLS_*, RANKING_INSECURE, RANKING_REFLECTION,
    # RANKING_AUTH_* (docs/operations.md, "Security"). No certificates: no start.
    # A plaintext port serving grpc.health.v1 alone, for Kubernetes' gRPC
    # probes (they speak no TLS); unset: none.
    health_port: int | None = None
    security: Security = Security(service="ranking")
    auth: AuthConfig = AuthConfig()
    # OpenTelemetry spans of every call, off by default: RANKING_TRACING=otlp|console|file,
    # RANKING_TRACING_* and the standard OTEL_* (recsys_core/rpc/tracing.py; docs/operations.md, "Tracing").
    tracing: TracingConfig = TracingConfig()
    # Request size, streams per connection, calls per second per caller:
    # RANKING_MAX_REQUEST_BYTES, _MAX_CONCURRENT_STREAMS, _RATE_LIMIT_PER_SECOND,
    # _RATE_LIMIT_BURST (recsys_core/rpc/limits.py; docs/operations.md, "Limits").
    limits: ServerLimits = LIMIT_DEFAULTS["ranking"]
    # Defaults and their reasons: recsys_core/ranking/scoring.py, SERVING_WEIGHTS.
    long_term_weight: float = SERVING_WEIGHTS.long_term
    short_term_weight: float = SERVING_WEIGHTS.short_term
    context_weight: float = SERVING_WEIGHTS.context
    popularity_weight: float = SERVING_WEIGHTS.popularity
    churn_popularity_boost: float = SERVING_WEIGHTS.churn_boost
    dislike_weight: float = SERVING_WEIGHTS.dislike
    # Short-term share of the long/short balance at drift 0 and drift 1
    # (chosen on validation targets: docs/profiles.md, "Interest drift").
    drift_short_share_stable: float = SERVING_WEIGHTS.drift.short_share_stable
    drift_short_share_drifting: float = SERVING_WEIGHTS.drift.short_share_drifting
    model_weight: float = SERVING_WEIGHTS.model
    co_purchase_weight: float = SERVING_WEIGHTS.co_purchase
    # The value-aware objective's weight on Candidate.value (chosen on
    # validation: docs/results.md, "Value-aware ranking"); 0 ranks on
    # relevance alone.
    value_weight: float = SERVING_WEIGHTS.value
    # The item values the term reads when a Rank request carries none
    # (Candidate.value all 0): `recsys item-values` writes the table; a
    # file that cannot be read stops the start. Unset: the request's values
    # only (none today: the gateway sends none).
    item_values: str = ""
    max_candidates: int = 5000
    # A LightGBM model from `recsys train-ranker` (its manifest beside it,
    # MODEL.json) scores the candidates instead of the weights above; unset:
    # the weights. A model that cannot be read or asks for features this
    # service does not compute stops the service at start.
    model: str = ""
    # A/B arms (docs/operations.md, "A/B arms"): the model registry whose
    # ranker versions a Rank request may name (RankRequest.model_version
    # "ranker/<n>"), loaded on first use and kept, at most max_model_versions;
    # model_versions ("3,4") are loaded at start, so that their first
    # requests do not wait, and a missing one stops the start. Unset
    # registry: the registry's default (RECSYS_MODEL_REGISTRY, else
    # var/models). A version it lacks is refused (FAILED_PRECONDITION).
    model_registry: str = ""
    model_versions: tuple[int, ...] = ()
    max_model_versions: int = 8
    # With a registry set (RANKING_MODEL_REGISTRY), the service also serves its
    # promoted ranker version by default, polls PROMOTED every
    # model_poll_seconds and swaps a newly promoted one in without a restart
    # (one that fails to load is refused and the old one keeps ranking).
    # Before any is promoted: the weights. Exclusive with `model`.
    model_poll_seconds: float = 1.0

    @classmethod
    def from_env(cls, environ=None) -> "RankingConfig":
        env = EnvReader("RANKING_", environ)
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            health_port=env.optional_int("HEALTH_PORT", minimum=1, maximum=65535),
            security=Security.from_env(env, "ranking"),
            auth=AuthConfig.from_env(env),
            tracing=TracingConfig.from_env(env),
            limits=service_limits(env, "ranking"),
            long_term_weight=env.float("LONG_TERM_WEIGHT", cls.long_term_weight, minimum=0),
            short_term_weight=env.float("SHORT_TERM_WEIGHT", cls.short_term_weight, minimum=0),
            context_weight=env.float("CONTEXT_WEIGHT", cls.context_weight, minimum=0),
            popularity_weight=env.float("POPULARITY_WEIGHT", cls.popularity_weight, minimum=0),
            churn_popularity_boost=env.float("CHURN_POPULARITY_BOOST", cls.churn_popularity_boost, minimum=0),
            dislike_weight=env.float("DISLIKE_WEIGHT", cls.dislike_weight, minimum=0),
            drift_short_share_stable=env.float(
                "DRIFT_SHORT_SHARE_STABLE", cls.drift_short_share_stable, minimum=0, maximum=1),
            drift_short_share_drifting=env.float(
                "DRIFT_SHORT_SHARE_DRIFTING", cls.drift_short_share_drifting, minimum=0, maximum=1),
            model_weight=env.float("MODEL_WEIGHT", cls.model_weight, minimum=0),
            co_purchase_weight=env.float("CO_PURCHASE_WEIGHT", cls.co_purchase_weight, minimum=0),
            # Far past the swept weights (at most 2) value alone decides the order.
            value_weight=env.float("VALUE_WEIGHT", cls.value_weight, minimum=0, maximum=MAX_VALUE_WEIGHT),
            item_values=env.str("ITEM_VALUES", cls.item_values),
            max_candidates=env.int("MAX_CANDIDATES", cls.max_candidates, minimum=1),
            model=env.str("MODEL", cls.model),
            model_registry=env.str("MODEL_REGISTRY", cls.model_registry),
            model_versions=parse_versions(env.str("MODEL_VERSIONS", "")),
            max_model_versions=env.int("MAX_MODEL_VERSIONS", cls.max_model_versions, minimum=1, maximum=64),
            model_poll_seconds=env.float("MODEL_POLL_SECONDS", cls.model_poll_seconds, minimum=0.05, maximum=60),
        )

    def __post_init__(self):
        if not math.isfinite(self.value_weight) or not 0 <= self.value_weight <= MAX_VALUE_WEIGHT:
            raise ConfigError(f"RANKING_VALUE_WEIGHT={self.value_weight} must be between 0 and {MAX_VALUE_WEIGHT:g}")
        if self.model and self.model_registry:
            raise ConfigError("RANKING_MODEL and RANKING_MODEL_REGISTRY are exclusive: serve one file, or the "
                              "registry's promoted ranker")


def parse_versions(spec: str) -> tuple[int, ...]:
    """RANKING_MODEL_VERSIONS: "3,4" (or "ranker/3,ranker/4")."""
    versions = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        number = part.removeprefix("ranker/")
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"RANKING_MODEL_VERSIONS: {part!r} is not a ranker version (e.g. 3 or ranker/3)")
        versions.append(int(number))
    return tuple(versions)

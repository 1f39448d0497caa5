from __future__ import annotations

from dataclasses import dataclass

from recsys_core.envconfig import EnvReader


@dataclass(frozen=True)
class RankingConfig:
    address: str = "127.0.0.1:50054"
    workers: int = 8
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    long_term_weight: float = 0.5
    short_term_weight: float = 0.3
    # A shopper on a product page wants that page's neighbourhood first.
    context_weight: float = 1.2
    popularity_weight: float = 0.1
    max_candidates: int = 5000

    @classmethod
    def from_env(cls, environ=None) -> "RankingConfig":
        env = EnvReader("RANKING_", environ)
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            long_term_weight=env.float("LONG_TERM_WEIGHT", cls.long_term_weight, minimum=0),
            short_term_weight=env.float("SHORT_TERM_WEIGHT", cls.short_term_weight, minimum=0),
            context_weight=env.float("CONTEXT_WEIGHT", cls.context_weight, minimum=0),
            popularity_weight=env.float("POPULARITY_WEIGHT", cls.popularity_weight, minimum=0),
            max_candidates=env.int("MAX_CANDIDATES", cls.max_candidates, minimum=1),
        )

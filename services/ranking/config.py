from __future__ import annotations

from dataclasses import dataclass

from recsys_core.rpc.envconfig import EnvReader
from recsys_core.signals.interests import DriftSettings


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
    # The popularity weight grows by this factor times the churn probability.
    churn_popularity_boost: float = 1.0
    # How hard a candidate close to a disliked item is pushed down.
    dislike_weight: float = 0.3
    # Short-term share of the long/short balance at drift 0 and drift 1
    # (chosen on validation targets: docs/profiles.md, "Interest drift").
    drift_short_share_stable: float = DriftSettings.short_share_stable
    drift_short_share_drifting: float = DriftSettings.short_share_drifting
    # The trained user tower's order (recsys serve --model DIR; scoring.py):
    # the strongest single term, since the model was trained for exactly this.
    model_weight: float = 1.0
    # Other shoppers' co-purchases (scoring.py); the weight was chosen on the
    # cross-category task's validation targets (docs/results.md).
    co_purchase_weight: float = 0.4
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
            churn_popularity_boost=env.float("CHURN_POPULARITY_BOOST", cls.churn_popularity_boost, minimum=0),
            dislike_weight=env.float("DISLIKE_WEIGHT", cls.dislike_weight, minimum=0),
            drift_short_share_stable=env.float(
                "DRIFT_SHORT_SHARE_STABLE", cls.drift_short_share_stable, minimum=0, maximum=1),
            drift_short_share_drifting=env.float(
                "DRIFT_SHORT_SHARE_DRIFTING", cls.drift_short_share_drifting, minimum=0, maximum=1),
            model_weight=env.float("MODEL_WEIGHT", cls.model_weight, minimum=0),
            co_purchase_weight=env.float("CO_PURCHASE_WEIGHT", cls.co_purchase_weight, minimum=0),
            max_candidates=env.int("MAX_CANDIDATES", cls.max_candidates, minimum=1),
        )

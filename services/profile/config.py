from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsys_core.data import paths
from recsys_core.rpc.access import AuthConfig
from recsys_core.rpc.tracing import TracingConfig
from recsys_core.rpc.limits import DEFAULTS as LIMIT_DEFAULTS, ServerLimits, service_limits
from recsys_core.rpc.transport import Security
from recsys_core.rpc.envconfig import EnvReader
from recsys_core.signals.interests import ClusterSettings, DriftSettings


@dataclass(frozen=True)
class ProfileConfig:
    address: str = "127.0.0.1:50053"
    workers: int = 8
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    # Transport (mTLS certificates, or explicit plaintext for development) and
    # token checks: PROFILE_TLS_*, PROFILE_INSECURE, PROFILE_REFLECTION,
    # PROFILE_AUTH_* (docs/operations.md, "Security"). No certificates: no start.
    # A plaintext port serving grpc.health.v1 alone, for Kubernetes' gRPC
    # probes (they speak no TLS); unset: none.
    health_port: int | None = None
    security: Security = Security(service="profile")
    auth: AuthConfig = AuthConfig()
    # OpenTelemetry spans of every call, off by default: PROFILE_TRACING=otlp|console|file,
    # PROFILE_TRACING_* and the standard OTEL_* (recsys_core/rpc/tracing.py; docs/operations.md, "Tracing").
    tracing: TracingConfig = TracingConfig()
    # Request size, streams per connection, calls per second per caller:
    # PROFILE_MAX_REQUEST_BYTES, _MAX_CONCURRENT_STREAMS, _RATE_LIMIT_PER_SECOND,
    # _RATE_LIMIT_BURST (recsys_core/rpc/limits.py; docs/operations.md, "Limits").
    limits: ServerLimits = LIMIT_DEFAULTS["profile"]
    # Event store backend: "sqlite" (store_path) or "redis" (redis_url); docs/profiles.md.
    store: str = "sqlite"
    store_path: str = str(paths.REPO_ROOT / "var" / "profile.sqlite3")
    redis_url: str = "redis://127.0.0.1:6379/0"
    # "single": one Redis server (redis_url); "cluster": a Redis Cluster found
    # from redis_url's node and redis_cluster_nodes (host:port,host:port), with
    # redis_url's credentials. docs/operations.md, "Profile replicas".
    redis_mode: str = "single"
    redis_cluster_nodes: tuple[str, ...] = ()
    redis_prefix: str = "recsys:profile:"
    # The service's Redis ACL user and a file holding its password (a mounted
    # Secret); or both in redis_url (redis://user:password@host:port/0).
    redis_username: str = ""
    redis_password_file: str = ""
    # What Redis persistence the store insists on: always | everysec | unchecked.
    redis_durability: str = "always"
    # Events loaded into an empty store at start; empty means none.
    data_dir: str = str(paths.BUNDLED_DATA_DIR)
    # Online-retail invoices (recsys_core/data/retail.py) loaded as purchase
    # events with amounts; empty means none.
    retail_dir: str = str(paths.BUNDLED_RETAIL_DIR)
    # The churn and lifetime-value model (`recsys train-value`); empty means
    # the one train-value writes by default. Without it GetProfile has no `value`.
    value_model: str = ""
    # The model registry (recsys_core/models/registry.py) whose promoted
    # `value` version GetProfile serves, polling PROMOTED every
    # value_poll_seconds and swapping a newly promoted one in without a
    # restart (one that fails to load is refused; the old one keeps
    # serving). Before any is promoted: value_model's. Empty: no registry.
    value_model_registry: str = ""
    value_poll_seconds: float = 1.0
    # The time forecasts are made at: "data" = the latest event of the
    # shopper's categories (historical data sets end years ago; against the
    # wall clock every shopper would have churned), "now" = the wall clock.
    value_clock: str = "data"
    embedding_address: str = "127.0.0.1:50052"
    # Outbound calls never wait longer than this, even for callers without a deadline.
    embedding_timeout_seconds: float = 5.0
    long_term_decay: float = DriftSettings.long_decay
    short_term_decay: float = DriftSettings.short_decay
    # Drift: the last `drift_recent_events` against the taste before them;
    # docs/profiles.md ("Interest drift") has the definition and its evaluation.
    drift_recent_events: int = DriftSettings.recent_events
    drift_min_past_events: int = DriftSettings.min_past_events
    drift_threshold: float = DriftSettings.threshold
    max_interests: int = ClusterSettings.max_clusters
    interest_distance: float = ClusterSettings.distance
    # How many recent events shape the interest vectors.
    interest_window: int = 200
    max_events_per_request: int = 1000
    profile_cache_size: int = 20_000
    # The trained user tower on Triton (recsys serve --model DIR sets the URL;
    # services/profile/user_tower.py): GetProfile's model_interest. Empty: none.
    user_tower_triton_url: str = ""
    user_tower_model: str = "user_tower"
    # Triton serving the review classifier (model_repo/review_sentiment):
    # GetProfile's preferences, and negative reviews as evidence against their
    # item. Empty: reviews are stored but not read.
    review_triton_url: str = ""
    review_model: str = "review_sentiment"

    @classmethod
    def from_env(cls, environ=None) -> "ProfileConfig":
        env = EnvReader("PROFILE_", environ)
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            health_port=env.optional_int("HEALTH_PORT", minimum=1, maximum=65535),
            security=Security.from_env(env, "profile"),
            auth=AuthConfig.from_env(env),
            tracing=TracingConfig.from_env(env),
            limits=service_limits(env, "profile"),
            store=env.choice("STORE", cls.store, ("sqlite", "redis")),
            store_path=env.str("STORE_PATH", cls.store_path),
            redis_url=env.str("REDIS_URL", cls.redis_url),
            redis_mode=env.choice("REDIS_MODE", cls.redis_mode, ("single", "cluster")),
            redis_cluster_nodes=env.host_ports("REDIS_CLUSTER_NODES"),
            redis_prefix=env.str("REDIS_PREFIX", cls.redis_prefix),
            redis_username=env.str("REDIS_USERNAME", cls.redis_username),
            redis_password_file=env.str("REDIS_PASSWORD_FILE", cls.redis_password_file),
            redis_durability=env.choice(
                "REDIS_DURABILITY", cls.redis_durability, ("always", "everysec", "unchecked")
            ),
            data_dir=env.optional_path("DATA_DIR", cls.data_dir),
            retail_dir=env.optional_path("RETAIL_DIR", cls.retail_dir),
            value_model=env.str("VALUE_MODEL", cls.value_model),
            value_model_registry=env.str("VALUE_MODEL_REGISTRY", cls.value_model_registry),
            value_poll_seconds=env.float("VALUE_POLL_SECONDS", cls.value_poll_seconds, minimum=0.01),
            value_clock=env.choice("VALUE_CLOCK", cls.value_clock, ("data", "now")),
            embedding_address=env.str("EMBEDDING_ADDRESS", cls.embedding_address),
            embedding_timeout_seconds=env.float("EMBEDDING_TIMEOUT_SECONDS", cls.embedding_timeout_seconds, minimum=0.01),
            long_term_decay=env.float("LONG_TERM_DECAY", cls.long_term_decay, minimum=0),
            short_term_decay=env.float("SHORT_TERM_DECAY", cls.short_term_decay, minimum=0),
            interest_window=env.int("INTEREST_WINDOW", cls.interest_window, minimum=1),
            drift_recent_events=env.int("DRIFT_RECENT_EVENTS", cls.drift_recent_events, minimum=1),
            drift_min_past_events=env.int("DRIFT_MIN_PAST_EVENTS", cls.drift_min_past_events, minimum=1),
            drift_threshold=env.float("DRIFT_THRESHOLD", cls.drift_threshold, minimum=0, maximum=1),
            max_interests=env.int("MAX_INTERESTS", cls.max_interests, minimum=1, maximum=50),
            interest_distance=env.float("INTEREST_DISTANCE", cls.interest_distance, minimum=0, maximum=2),
            max_events_per_request=env.int("MAX_EVENTS_PER_REQUEST", cls.max_events_per_request, minimum=1),
            profile_cache_size=env.int("PROFILE_CACHE_SIZE", cls.profile_cache_size, minimum=0),
            user_tower_triton_url=env.str("USER_TOWER_TRITON_URL", cls.user_tower_triton_url),
            user_tower_model=env.str("USER_TOWER_MODEL", cls.user_tower_model),
            review_triton_url=env.str("REVIEW_TRITON_URL", cls.review_triton_url),
            review_model=env.str("REVIEW_MODEL", cls.review_model),
        )

    @property
    def drift_settings(self) -> DriftSettings:
        return DriftSettings(
            recent_events=self.drift_recent_events,
            min_past_events=self.drift_min_past_events,
            long_decay=self.long_term_decay,
            short_decay=self.short_term_decay,
            threshold=self.drift_threshold,
        )

    @property
    def cluster_settings(self) -> ClusterSettings:
        return ClusterSettings(max_clusters=self.max_interests, distance=self.interest_distance,
                               decay=self.long_term_decay)

    @property
    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    @property
    def retail_path(self) -> Path | None:
        return Path(self.retail_dir) if self.retail_dir else None

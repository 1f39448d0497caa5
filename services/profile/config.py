from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recsys_core import paths
from recsys_core.envconfig import EnvReader


def _set_but_empty(environ, name: str) -> bool:
    value = (os.environ if environ is None else environ).get(name)
    return value is not None and not value.strip()


@dataclass(frozen=True)
class ProfileConfig:
    address: str = "127.0.0.1:50053"
    workers: int = 8
    grace_seconds: float = 10.0
    # Prometheus /metrics port, on the host of `address`; 0 picks a free one
    # (every process of a local stack needs its own; Kubernetes sets 9090).
    metrics_port: int = 0
    # Event store backend: "sqlite" (store_path) or "redis" (redis_url); docs/profiles.md.
    store: str = "sqlite"
    store_path: str = str(paths.REPO_ROOT / "var" / "profile.sqlite3")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "recsys:profile:"
    # What Redis persistence the store insists on: always | everysec | unchecked.
    redis_durability: str = "always"
    # Events loaded into an empty store at start; empty means none.
    data_dir: str = str(paths.BUNDLED_DATA_DIR)
    embedding_address: str = "127.0.0.1:50052"
    # Outbound calls never wait longer than this, even for callers without a deadline.
    embedding_timeout_seconds: float = 5.0
    long_term_decay: float = 0.05
    short_term_decay: float = 0.5
    # How many recent events shape the interest vectors.
    interest_window: int = 200
    max_events_per_request: int = 1000
    profile_cache_size: int = 20_000

    @classmethod
    def from_env(cls, environ=None) -> "ProfileConfig":
        env = EnvReader("PROFILE_", environ)
        return cls(
            address=env.str("ADDRESS", cls.address),
            workers=env.int("WORKERS", cls.workers, minimum=1, maximum=256),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, minimum=0),
            metrics_port=env.int("METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            store=env.choice("STORE", cls.store, ("sqlite", "redis")),
            store_path=env.str("STORE_PATH", cls.store_path),
            redis_url=env.str("REDIS_URL", cls.redis_url),
            redis_prefix=env.str("REDIS_PREFIX", cls.redis_prefix),
            redis_durability=env.choice(
                "REDIS_DURABILITY", cls.redis_durability, ("always", "everysec", "unchecked")
            ),
            # Set but empty means no data set (EnvReader would read it as unset).
            data_dir="" if _set_but_empty(environ, "PROFILE_DATA_DIR") else env.str("DATA_DIR", cls.data_dir),
            embedding_address=env.str("EMBEDDING_ADDRESS", cls.embedding_address),
            embedding_timeout_seconds=env.float("EMBEDDING_TIMEOUT_SECONDS", cls.embedding_timeout_seconds, minimum=0.01),
            long_term_decay=env.float("LONG_TERM_DECAY", cls.long_term_decay, minimum=0),
            short_term_decay=env.float("SHORT_TERM_DECAY", cls.short_term_decay, minimum=0),
            interest_window=env.int("INTEREST_WINDOW", cls.interest_window, minimum=1),
            max_events_per_request=env.int("MAX_EVENTS_PER_REQUEST", cls.max_events_per_request, minimum=1),
            profile_cache_size=env.int("PROFILE_CACHE_SIZE", cls.profile_cache_size, minimum=0),
        )

    @property
    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

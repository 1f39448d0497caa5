"""Opening the event store a profile configuration selects.

Kept apart from the backends so that neither backend imports the other."""
from __future__ import annotations

from recsys_core.store.events import EventStore
from recsys_core.store.sqlite_store import SQLiteEventStore


def open_store(config, sweep: bool = False) -> EventStore:
    """The store a ProfileConfig selects (PROFILE_STORE=sqlite|redis).
    `sweep`: the Redis store applies count updates that a writer died
    before applying (a serving profile replica sets it)."""
    if config.store == "redis":
        # Imported here: redis-py is a good part of a replica's imports, which
        # a restart waits for, and the SQLite store needs none of it.
        from recsys_core.store.redis_store import RedisEventStore

        password = None
        password_file = getattr(config, "redis_password_file", "")
        if password_file:
            from pathlib import Path

            password = Path(password_file).read_text().strip()
        return RedisEventStore(config.redis_url, prefix=config.redis_prefix, durability=config.redis_durability,
                               username=getattr(config, "redis_username", "") or None, password=password,
                               mode=getattr(config, "redis_mode", "single"),
                               cluster_nodes=getattr(config, "redis_cluster_nodes", ()), sweep=sweep)
    return SQLiteEventStore(config.store_path)

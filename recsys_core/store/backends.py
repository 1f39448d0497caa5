"""Opening the event store a profile configuration selects.

Kept apart from the backends so that neither backend imports the other."""
from __future__ import annotations

from recsys_core.store.events import EventStore
from recsys_core.store.redis_store import RedisEventStore
from recsys_core.store.sqlite_store import SQLiteEventStore


def open_store(config) -> EventStore:
    """The store a ProfileConfig selects (PROFILE_STORE=sqlite|redis)."""
    if config.store == "redis":
        password = None
        password_file = getattr(config, "redis_password_file", "")
        if password_file:
            from pathlib import Path

            password = Path(password_file).read_text().strip()
        return RedisEventStore(config.redis_url, prefix=config.redis_prefix, durability=config.redis_durability,
                               username=getattr(config, "redis_username", "") or None, password=password)
    return SQLiteEventStore(config.store_path)

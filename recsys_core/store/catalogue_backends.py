"""Opening the catalogue store an embedding configuration selects.

Kept apart from the backends so that neither backend imports the other."""
from __future__ import annotations

from pathlib import Path

from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore
from recsys_core.store.catalogue_store import STORES, CatalogueStore


def open_catalogue_store(kind: str, path: str = "", redis_url: str = "", prefix: str = "",
                         username: str = "", password_file: str = "", durability: str = "always",
                         redis_mode: str = "single", cluster_nodes: tuple[str, ...] = ()) -> CatalogueStore:
    """The store an embedding configuration selects (EMBEDDING_CATALOGUE_STORE=sqlite|redis)."""
    if kind == "redis":
        # Imported here: redis-py (with the OpenTelemetry SDK it pulls in) is
        # a third of an embedding replica's imports, which a restart waits for.
        from recsys_core.store.catalogue_redis import DEFAULT_PREFIX, RedisCatalogueStore

        password = Path(password_file).read_text().strip() if password_file else None
        return RedisCatalogueStore(redis_url, prefix=prefix or DEFAULT_PREFIX, durability=durability,
                                   username=username or None, password=password, mode=redis_mode,
                                   cluster_nodes=cluster_nodes)
    if kind == "sqlite":
        return SQLiteCatalogueStore(path)
    raise ValueError(f"catalogue store must be one of {STORES}, got {kind!r}")

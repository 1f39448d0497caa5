"""The shared catalogue store, both backends, on real SQLite files and a real redis-server."""
from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import redis

from recsys_core.errors import Unavailable
from recsys_core.store.catalogue_redis import READ_CHUNK, WRITE_CHUNK, RedisCatalogueStore
from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore
from recsys_core.store.catalogue_backends import open_catalogue_store
from recsys_core.store.catalogue_store import CatalogueEntry
from recsys_core.store.redis_store import DurabilityError

TEST_KEYS = ("recsys:catalogue:*", "testcat:*")


@pytest.fixture(scope="module")
def catalogue_redis(tmp_path_factory):
    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed: `make setup` installs it")
    with LocalRedis(tmp_path_factory.mktemp("catalogue-redis"), catalogue_keys=TEST_KEYS) as server:
        yield server


@pytest.fixture(params=("sqlite", "redis", "redis-cluster"))
def open_store(request, tmp_path):
    """Opens handles on one fresh store: a SQLite file, or a key prefix in Redis
    or in a 3-master Redis Cluster (through the embedding service's ACL user)."""
    opened = []
    if request.param == "redis":
        url, prefix = request.getfixturevalue("catalogue_redis").catalogue_url, f"testcat:{uuid.uuid4().hex[:12]}:"

        def opener():
            opened.append(open_catalogue_store("redis", redis_url=url, prefix=prefix))
            return opened[-1]
    elif request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").catalogue_url
        prefix = f"recsys:catalogue:{uuid.uuid4().hex[:12]}:"

        def opener():
            opened.append(open_catalogue_store("redis", redis_url=url, prefix=prefix, redis_mode="cluster"))
            return opened[-1]
    else:
        def opener():
            opened.append(open_catalogue_store("sqlite", path=str(tmp_path / "catalogue.sqlite3")))
            return opened[-1]
    yield opener
    for store in opened:
        store.close()


def entry(item_id: str, text: str = "", category: str = "Toys", seed: int = 0) -> CatalogueEntry:
    vector = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return CatalogueEntry(item_id, category, f"Title {item_id}", text or f"Text of {item_id}", "Toys, Trains",
                          "fingerprint-a", vector)


def test_put_and_changes_round_trip_every_field(open_store):
    store = open_store()
    assert store.version() == 0
    assert store.changes(0) == ([], 0)
    first = store.put([entry("a"), entry("b", seed=1)])
    assert (first.inserted, first.updated) == (2, 0) and first.version >= 1
    entries, version = store.changes(0)
    assert version == store.version() == first.version
    by_id = {e.item_id: e for e in entries}
    assert set(by_id) == {"a", "b"}
    got = by_id["b"]
    assert (got.category, got.title, got.text, got.category_path, got.encoder) == (
        "Toys", "Title b", "Text of b", "Toys, Trains", "fingerprint-a")
    np.testing.assert_array_equal(got.vector, entry("b", seed=1).vector)
    assert got.vector.dtype == np.float32


def test_changes_are_the_delta_in_latest_state(open_store):
    store = open_store()
    store.put([entry("a"), entry("b")])
    seen = store.version()
    second = store.put([entry("b", text="new text", category="Games"), entry("c")])
    assert (second.inserted, second.updated) == (1, 1)
    entries, version = store.changes(seen)
    assert {e.item_id: e.text for e in entries} == {"b": "new text", "c": "Text of c"}
    assert version == second.version > seen
    assert store.changes(version) == ([], version), "nothing after the latest version"


def test_only_new_keeps_what_the_store_has(open_store):
    store = open_store()
    store.put([entry("a", text="upserted")])
    seeded = store.put([entry("a", text="bundled"), entry("z", text="bundled")], only_new=True)
    assert (seeded.inserted, seeded.updated) == (1, 0)
    assert {e.item_id: e.text for e in store.changes(0)[0]} == {"a": "upserted", "z": "bundled"}
    unchanged = store.version()
    assert store.put([entry("a")], only_new=True).version == unchanged, "a write that stores nothing is no change"


def test_a_second_handle_sees_the_writes_of_the_first(open_store):
    writer, reader = open_store(), open_store()
    writer.put([entry("a")])
    assert [e.item_id for e in reader.changes(0)[0]] == ["a"]
    reader.put([entry("a", text="from the reader")])
    assert [e.text for e in writer.changes(0)[0]] == ["from the reader"]


def test_meta_notes_are_durable_and_shared(open_store):
    first, second = open_store(), open_store()
    assert first.meta("seeded:abc") is None
    first.set_meta("seeded:abc", "7")
    assert second.meta("seeded:abc") == "7"
    first.close()
    assert open_store().meta("seeded:abc") == "7"
    assert second.version() == 0, "a note is not an item write"


def test_large_batches_are_read_back_whole(open_store):
    """Above the Redis page and chunk sizes: no item of a write whose number
    straddles a page is skipped."""
    store = open_store()
    count = READ_CHUNK + WRITE_CHUNK + 7
    store.put([entry(f"i{n}") for n in range(count)])
    entries, version = store.changes(0)
    assert sorted(e.item_id for e in entries) == sorted(f"i{n}" for n in range(count))
    assert version == store.version()


def test_concurrent_writers_through_two_handles_never_fail_nor_lose(open_store):
    stores = [open_store(), open_store()]
    errors, acknowledged, lock = [], set(), threading.Lock()

    def write(writer: int) -> None:
        for n in range(25):
            batch = [entry(f"w{writer}-{n}"), entry(f"shared-{n % 3}", text=f"by {writer}")]
            try:
                stores[writer % 2].put(batch)
            except Exception as error:  # any failure fails the test
                errors.append(repr(error))
            else:
                with lock:
                    acknowledged.update(e.item_id for e in batch)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for store in stores:
        entries, version = store.changes(0)
        assert {e.item_id for e in entries} == acknowledged
        assert version == store.version() >= 1


def test_redis_refuses_a_server_that_could_lose_upserts(tmp_path):
    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with LocalRedis(tmp_path, extra_args=("--appendfsync", "everysec")) as server:
        with pytest.raises(DurabilityError, match="EMBEDDING_CATALOGUE_REDIS_DURABILITY"):
            RedisCatalogueStore(server.catalogue_url)
        RedisCatalogueStore(server.catalogue_url, durability="everysec").close()


def test_the_embedding_acl_user_reaches_the_catalogue_keys_only(catalogue_redis):
    client = redis.Redis.from_url(catalogue_redis.catalogue_url)
    try:
        client.set("recsys:catalogue:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("recsys:profile:seq")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.delete("recsys:catalogue:probe")
        client.close()


def test_an_unreachable_redis_is_unavailable(tmp_path):
    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = LocalRedis(tmp_path).start()
    store = RedisCatalogueStore(server.catalogue_url, socket_timeout=2)
    server.kill()
    with pytest.raises(Unavailable, match="catalogue store"):
        store.put([entry("a")])
    store.close()


def test_sqlite_store_is_durable_in_wal_with_full_sync(tmp_path):
    store = SQLiteCatalogueStore(tmp_path / "c.sqlite3")
    connection = store._reader()
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


WRITER_PROCESS = """
import sys
import numpy as np
from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore
from recsys_core.store.catalogue_store import CatalogueEntry

store = SQLiteCatalogueStore(sys.argv[1])
for n in range(40):
    vector = np.full(8, n, dtype=np.float32)
    store.put([CatalogueEntry(f"{sys.argv[2]}-{n}", "Toys", "t", "x", "", "fp", vector),
               CatalogueEntry("shared", "Toys", "t", sys.argv[2], "", "fp", vector)])
print("done")
"""


def test_sqlite_writers_in_separate_processes_share_one_file(tmp_path):
    """As `recsys serve --replicas N` runs them: SQLite's file locks, not only
    its in-process ones, serialise the writers; none fails, nothing is lost."""
    import os
    import subprocess
    import sys

    path = tmp_path / "catalogue.sqlite3"
    SQLiteCatalogueStore(path).close()
    from recsys_core.data.paths import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(path), f"p{n}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(3)]
    outcomes = [writer.communicate(timeout=120) for writer in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], [err[-500:] for _, err in outcomes]
    store = SQLiteCatalogueStore(path)
    entries, version = store.changes(0)
    assert {e.item_id for e in entries} == {"shared"} | {f"p{p}-{n}" for p in range(3) for n in range(40)}
    assert version == store.version() == 120, "one number per write, none taken twice"
    store.close()


OPENER_PROCESS = """
import sys
from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore
for n in range(int(sys.argv[2])):
    SQLiteCatalogueStore(f"{sys.argv[1]}/catalogue-{n}.sqlite3").close()
print("done")
"""


def test_replicas_starting_together_open_a_new_file_without_failing(tmp_path):
    """`recsys serve --replicas N` starts the embedding replicas at once on a
    catalogue file none has made yet: the switch to WAL needs the file alone,
    and SQLite refuses it ("database is locked") instead of waiting; each
    process here opens 300 fresh files in step with seven others."""
    import os
    import subprocess
    import sys

    from recsys_core.data.paths import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    openers = [subprocess.Popen([sys.executable, "-c", OPENER_PROCESS, str(tmp_path), "300"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outcomes = [opener.communicate(timeout=120) for opener in openers]
    assert [o.returncode for o in openers] == [0] * 8, [err[-300:] for _, err in outcomes if err]


def test_the_cluster_settings_are_read_and_checked():
    from recsys_core.rpc.envconfig import ConfigError
    from services.embedding.config import EmbeddingConfig

    config = EmbeddingConfig.from_env({"EMBEDDING_CATALOGUE_REDIS_MODE": "cluster",
                                       "EMBEDDING_CATALOGUE_REDIS_CLUSTER_NODES": "10.0.0.1:6379, redis-1:6380"})
    assert (config.catalogue_redis_mode, config.catalogue_redis_cluster_nodes) == (
        "cluster", ("10.0.0.1:6379", "redis-1:6380"))
    with pytest.raises(ConfigError, match="EMBEDDING_CATALOGUE_REDIS_CLUSTER_NODES: 'redis-1' is not host:port"):
        EmbeddingConfig.from_env({"EMBEDDING_CATALOGUE_REDIS_CLUSTER_NODES": "redis-1"})
    with pytest.raises(ConfigError):
        EmbeddingConfig.from_env({"EMBEDDING_CATALOGUE_REDIS_MODE": "sentinel"})
    with pytest.raises(ValueError, match="braces"):
        RedisCatalogueStore("redis://127.0.0.1:1/0", prefix="recsys:{x}:")

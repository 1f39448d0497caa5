"""Two real embedding replicas on one catalogue store (SQLite file, then Redis):
an upsert through one is served by the other within a second and by both
after a restart; concurrent writers through both never fail and lose nothing."""
from __future__ import annotations

import time
import uuid

import pytest

from loadtest.upsert_race import (
    missing, race, replica_config, settled, start_replica, states, tiny_data_dir,
)
from recsys.common.v1 import common_pb2
from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from tests.conftest import secured, service_channel

PROPAGATION_SECONDS = 1.0
# The run is 30 s (loadtest/upsert_race.py); the suite's is shorter.
RACE_SECONDS = 8.0


@pytest.fixture(scope="module")
def catalogue_redis(tmp_path_factory):
    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed: `make setup` installs it")
    with LocalRedis(tmp_path_factory.mktemp("catalogue-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(params=("sqlite", "redis", "redis-cluster"))
def replicas(request, tmp_path, data_dir, exported_encoder):
    """Starts replicas on one fresh store; all are stopped at the end. On a
    Redis Cluster (3 masters) the catalogue's keys share one slot."""
    if request.param.startswith("redis"):
        server = request.getfixturevalue("catalogue_redis" if request.param == "redis" else "redis_cluster")
        # A prefix of its own per test, under the embedding ACL user's keys.
        store = f"{server.catalogue_url} recsys:catalogue:{uuid.uuid4().hex[:8]}:"
    else:
        store = str(tmp_path / "catalogue.sqlite3")
    config = replica_config(request.param, store, data_dir, tmp_path / "cache", **secured("embedding"))
    running = []

    class Replicas:
        backend = request.param

        def start(self):
            server, address = start_replica(config)
            running.append(server)
            return server, service_channel(address, "embedding")

    yield Replicas()
    for server in running:
        server.stop(None)


def seeded_ids(data_dir) -> list[str]:
    from recsys_core.data import shopping

    return list(shopping.load_items(data_dir).item_id)


def stub(channel):
    return embedding_pb2_grpc.EmbeddingServiceStub(channel)


def gadget(item_id: str, category: str, text: str) -> common_pb2.Item:
    return common_pb2.Item(item_id=item_id, category=category, title=text[:40], text=text)


def wait_for(check, seconds: float):
    """Polls `check` until it returns something truthy; returns it and the time it took."""
    began = time.monotonic()
    while True:
        found = check()
        elapsed = time.monotonic() - began
        if found or elapsed > seconds:
            return found, elapsed
        time.sleep(0.02)


def held(channel, item_id: str):
    reply = stub(channel).GetItems(embedding_pb2.GetItemsRequest(item_ids=[item_id], skip_missing=True), timeout=10)
    return reply.items[0].item if reply.items else None


def test_an_upsert_through_one_replica_is_served_by_the_other_within_a_second_and_after_restarts(replicas):
    (first, a), (second, b) = replicas.start(), replicas.start()
    seeded = stub(b).ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=10)
    assert sum(c.items for c in seeded.categories) == 40, "seeded from the data directory once"

    item = gadget("gadget-1", "Gadgets", "A pocket telescope with a brass finish")
    reply = stub(a).UpsertItems(embedding_pb2.UpsertItemsRequest(items=[item]), timeout=30)
    assert (reply.inserted, reply.updated) == (1, 0)
    found, elapsed = wait_for(lambda: held(b, "gadget-1"), PROPAGATION_SECONDS)
    assert found is not None, f"replica b did not see the upsert within {PROPAGATION_SECONDS}s"
    assert (found.category, found.text) == ("Gadgets", item.text)

    # SearchItems on b finds it in its new category, with a's embedding.
    vector = stub(a).GetItems(embedding_pb2.GetItemsRequest(item_ids=["gadget-1"], include_embeddings=True),
                              timeout=10).items[0].embedding
    hits = stub(b).SearchItems(embedding_pb2.SearchItemsRequest(vectors=[vector], k=1, categories=["Gadgets"]),
                               timeout=10).results[0].hits
    assert [h.item_id for h in hits] == ["gadget-1"] and hits[0].score == pytest.approx(1.0, abs=1e-4)

    # An update through b moves it on a: the old category's index loses it.
    moved = gadget("gadget-1", "Optics", "A pocket telescope, now with a tripod")
    reply = stub(b).UpsertItems(embedding_pb2.UpsertItemsRequest(items=[moved]), timeout=30)
    assert (reply.inserted, reply.updated) == (0, 1)

    def moved_on_a():
        item = held(a, "gadget-1")
        return item if item is not None and item.category == "Optics" else None

    found, _ = wait_for(moved_on_a, PROPAGATION_SECONDS)
    assert found is not None and found.text == moved.text
    categories = {c.name: c.items for c in stub(a).ListCategories(embedding_pb2.ListCategoriesRequest(),
                                                                  timeout=10).categories}
    assert categories.get("Optics") == 1 and categories.get("Gadgets", 0) == 0

    # Both restart: they read the store, upserts included, and seed nothing twice.
    first.stop(None)
    second.stop(None)
    (_, a2), (_, b2) = replicas.start(), replicas.start()
    for channel in (a2, b2):
        again = held(channel, "gadget-1")
        assert again is not None and (again.category, again.text) == ("Optics", moved.text)
        total = sum(c.items for c in stub(channel).ListCategories(embedding_pb2.ListCategoriesRequest(),
                                                                   timeout=10).categories)
        assert total == 41


def test_concurrent_upserts_through_two_replicas_never_fail_and_lose_nothing(replicas):
    (_, a), (_, b) = replicas.start(), replicas.start()
    result = race([a, b], writers=8, seconds=RACE_SECONDS)
    assert result.errors == [], result.errors[:3]
    assert result.calls > 8 and len(result.acknowledged) > 8
    assert settled([a, b], result, within=PROPAGATION_SECONDS + 1.0) == []
    # Both replicas hold the store's last state of the items every writer wrote.
    assert states(a, result.shared) == states(b, result.shared)
    # And so does a replica started afterwards, from the store alone.
    _, c = replicas.start()
    assert missing(c, result.acknowledged) == []
    assert states(c, result.shared) == states(a, result.shared)


def test_replicas_serve_through_a_redis_outage_and_follow_again_after_it(tmp_path, data_dir, exported_encoder):
    """Redis down: reads keep answering from each replica's index, an upsert is
    UNAVAILABLE (nothing acknowledged, nothing lost); back up, the followers
    resume and propagation is within the bound again."""
    import grpc

    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = LocalRedis(tmp_path / "redis").start()
    config = replica_config("redis", f"{server.catalogue_url} recsys:catalogue:", data_dir, tmp_path / "cache",
                            **secured("embedding"))
    started = [start_replica(config) for _ in range(2)]
    try:
        a, b = (service_channel(address, "embedding") for _, address in started)
        first_id = seeded_ids(data_dir)[0]
        server.kill()
        assert held(b, first_id) is not None, "reads answer from the index while the store is down"
        with pytest.raises(grpc.RpcError) as refused:
            stub(a).UpsertItems(embedding_pb2.UpsertItemsRequest(items=[gadget("down-1", "Gadgets", "A lamp")]),
                                timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        server.start()
        stub(a).UpsertItems(embedding_pb2.UpsertItemsRequest(items=[gadget("up-1", "Gadgets", "A desk lamp")]),
                            timeout=30)
        found, _ = wait_for(lambda: held(b, "up-1"), PROPAGATION_SECONDS + 1.0)
        assert found is not None, "the follower resumed once Redis was back"
        assert held(b, "down-1") is None, "the refused upsert was not stored"
    finally:
        for replica, _ in started:
            replica.stop(None)
        server.stop()


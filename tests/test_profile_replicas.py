"""Stateless profile replicas on the Redis store: popularity and co-purchase
counts kept in Redis (one server, and a 3-master Redis Cluster), the same for
every store handle and every profile server on it, counted once per event
whatever crashes, retries and concurrent replicas do."""
from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest

from recsys_core.signals.copurchase import CoPurchases
from recsys_core.store.events import PURCHASE, VIEW, StoredEvent
from services.profile.popularity import Popularity
from tests.conftest import StoreOpener, unique_redis_prefix

REDIS_SETUPS = ("redis", "redis-cluster")


@pytest.fixture(params=REDIS_SETUPS)
def open_shared_store(request):
    """Opens handles (each a replica's) on one fresh Redis store: on one
    server, then on the cluster."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        opener = StoreOpener("redis", redis_url=server.url, prefix=unique_redis_prefix())
    else:
        cluster = request.getfixturevalue("redis_cluster")
        opener = StoreOpener("redis", redis_url=cluster.url, prefix=unique_redis_prefix(), redis_mode="cluster")
    yield opener
    for store in opener.opened:
        store.close()


def random_events(seed: int, shoppers: int = 12, items: int = 25, n: int = 300, key_every: int = 3):
    rng = random.Random(seed)
    events = []
    for number in range(n):
        item = rng.randrange(items)
        events.append(StoredEvent(f"shopper-{rng.randrange(shoppers)}", f"item-{item}", f"cat-{item % 4}",
                                  rng.choice((VIEW, PURCHASE)), 1000 + number,
                                  idempotency_key=f"key-{number}" if number % key_every == 0 else None))
    return events


def in_memory_counts(events):
    """What the SQLite path counts in memory from the same events."""
    popularity, co_purchases = Popularity(), CoPurchases(fold_in_background=False)
    for e in events:
        popularity.add(e.item_id, e.category)
        co_purchases.add(e.user_id, e.item_id, e.category)
    return popularity, co_purchases


def assert_same_counts(store, events):
    popularity, co_purchases = store.shared_signals()
    expected_popularity, expected_pairs = in_memory_counts(events)
    items = sorted({e.item_id for e in events} | {"never-seen"})
    assert popularity.counts_and_max(items) == (expected_popularity.counts(items), expected_popularity.max_count())
    assert popularity.categories() == expected_popularity.categories()
    assert popularity.top(7) == expected_popularity.top(7)
    assert popularity.top(5, ["cat-1", "cat-3"], exclude=items[:3]) == \
        expected_popularity.top(5, ["cat-1", "cat-3"], exclude=items[:3])
    assert store.count() == len(events)
    for user in sorted({e.user_id for e in events})[:5]:
        history = store.user_summary(user)[2]
        for categories in ((), ("cat-0", "cat-2")):
            assert co_purchases.most_shared(history, 10, categories, exclude=history[:1], leave_out_user=user) == \
                expected_pairs.most_shared(history, 10, categories, exclude=history[:1], leave_out_user=user)
        assert co_purchases.related(history) == expected_pairs.related(history)
    assert co_purchases.categories_of(["item-5", "never-seen"]) == {"item-5": "cat-1", "never-seen": ""}


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_in_redis_answer_as_the_in_memory_counts(open_shared_store, seed):
    store = open_shared_store()
    events = random_events(seed)
    for start in range(0, len(events), 17):
        store.append(events[start:start + 17])
    assert_same_counts(store, events)


def test_a_write_through_one_handle_is_read_through_another(open_shared_store):
    """Two replicas' stores: what one appends, the other's counts have when
    append() returns; the same keyed event through both is counted once."""
    a, b = open_shared_store(), open_shared_store()
    a_popularity, _ = a.shared_signals()
    b_popularity, b_pairs = b.shared_signals()
    assert b_popularity.counts_and_max(["x"]) == ([0], 0)
    version = b.user_version("u")
    a.append([StoredEvent("u", "x", "c", PURCHASE, 1, idempotency_key="order-1"),
              StoredEvent("u", "y", "d", PURCHASE, 2)])
    a.append([StoredEvent("v", "x", "c", PURCHASE, 3), StoredEvent("v", "z", "c", PURCHASE, 4)])
    assert b.user_version("u") != version
    assert b_popularity.counts_and_max(["x", "y", "z"]) == ([2, 1, 1], 2)
    assert b_pairs.most_shared(["x"], 5) == [("y", 1), ("z", 1)]
    assert b.append([StoredEvent("u", "x", "c", PURCHASE, 1, idempotency_key="order-1")]) == [False]
    assert a_popularity.counts(["x"]) == [2] and a.count() == b.count() == 4


def test_a_crash_between_storing_and_counting_loses_no_count_and_counts_none_twice(open_shared_store, monkeypatch):
    """The writer dies after its events are stored (the counts not yet
    applied), or after applying them (not yet marked done): the next write of
    the shopper, on another replica, or the sweep, finishes the work once."""
    events = random_events(7, shoppers=3, n=60)
    crashed, survivor = open_shared_store(), open_shared_store()

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    # Dies before any count is applied.
    monkeypatch.setattr(crashed, "_apply", crash)
    with pytest.raises(Crash):
        crashed.append(events[:20])
    assert survivor.count() == 0, "stored, but not yet counted"
    survivor.append(events[20:30])  # the next writes of these shoppers apply the earlier ones first
    monkeypatch.undo()

    # Dies after the counts are applied, before they leave the pending list.
    real_run = crashed._run_scripts

    def run_then_crash_before_done(calls, **kwargs):
        if calls and calls[0][0] is crashed._done:
            raise Crash
        return real_run(calls, **kwargs)

    monkeypatch.setattr(crashed, "_run_scripts", run_then_crash_before_done)
    with pytest.raises(Crash):
        crashed.append(events[30:45])
    monkeypatch.undo()
    # No writer comes back for these shoppers: the sweep applies what is left.
    survivor.settle_pending(grace_seconds=0)
    survivor.settle_pending(grace_seconds=0)
    survivor.append(events[45:])
    assert_same_counts(survivor, events)


def test_forgetting_a_shopper_takes_back_their_counts(open_shared_store):
    store = open_shared_store()
    events = random_events(3, shoppers=6, n=120)
    store.append(events)
    gone = events[0].user_id
    version = store.user_version(gone)
    expected = sum(1 for e in events if e.user_id == gone)
    forgotten_at = 2000  # after every event of random_events
    assert store.forget_user(gone, now=forgotten_at) == expected
    assert store.forget_user(gone, now=forgotten_at) == 0, "forgetting twice changes nothing"
    assert store.user_events(gone) == [] and store.user_summary(gone) == (0, {}, [])
    assert store.user_version(gone) != version
    assert_same_counts(store, [e for e in events if e.user_id != gone])
    # The tombstone drops their old event sent again; their idempotency keys
    # went too: the same key on an event of a returning shopper is stored.
    keyed = next(e for e in events if e.user_id == gone and e.idempotency_key)
    assert store.append([keyed]) == [False]
    assert store.append([replace(keyed, ts=forgotten_at)]) == [True]


def test_concurrent_writers_on_several_handles_count_exactly(open_shared_store):
    """Four replicas' stores append overlapping batches (the same keyed
    events re-sent through several of them) at once."""
    writers = 4
    stores = [open_shared_store() for _ in range(writers)]
    events = random_events(11, shoppers=5, n=240, key_every=1)
    batches = [events[start:start + 6] for start in range(0, len(events), 6)]
    barrier = threading.Barrier(writers)
    errors = []

    def write(w):
        try:
            barrier.wait(10)
            for number, batch in enumerate(batches):
                if number % writers == w or number % writers == (w + 1) % writers:  # every batch twice
                    stores[w].append(batch)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert_same_counts(stores[0], events)


# -- two real profile servers on one store --------------------------------------------

import grpc  # noqa: E402

from recsys.common.v1 import common_pb2  # noqa: E402
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc  # noqa: E402
from tests.conftest import secured, service_channel, start  # noqa: E402


@pytest.fixture(scope="module", params=REDIS_SETUPS)
def replicas(request, stack):
    """Two profile servers (replicas A and B) on one fresh Redis store: on
    one server, then on the 3-master cluster. No data set is loaded: the
    tests' own events are all there is, so every count is known exactly."""
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile

    if request.param == "redis":
        url, mode = request.getfixturevalue("redis_server").url, "single"
    else:
        url, mode = request.getfixturevalue("redis_cluster").url, "cluster"
    config = ProfileConfig(address="127.0.0.1:0", store="redis", redis_url=url, redis_mode=mode,
                           redis_prefix=unique_redis_prefix(), data_dir="", retail_dir="",
                           embedding_address=stack.embedding, **secured("profile"))
    servers = [start(create_profile(config)) for _ in range(2)]
    channels = [service_channel(address, "profile") for _, address in servers]
    yield [profile_pb2_grpc.ProfileServiceStub(channel) for channel in channels]
    for channel in channels:
        channel.close()
    for server, _ in servers:
        server.stop(None)


def event_of(user_id, item_id, key="", type_=common_pb2.EVENT_TYPE_PURCHASE):
    return common_pb2.Event(user_id=user_id, item_id=item_id, type=type_, idempotency_key=key)


def ingest(stub, events):
    reply = stub.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=30)
    return reply.accepted, reply.duplicates


def popularity_of(stub, item_ids):
    reply = stub.GetItemPopularity(profile_pb2.GetItemPopularityRequest(item_ids=item_ids), timeout=10)
    return list(reply.events), reply.max_events


def co_purchased(stub, user_id, k=20):
    reply = stub.GetCoPurchasedItems(profile_pb2.GetCoPurchasedItemsRequest(user_id=user_id, k=k), timeout=10)
    return [(i.item_id, i.category, i.shoppers) for i in reply.items]


def test_what_one_replica_ingests_the_other_serves(replicas, dataset):
    a, b = replicas
    items = dataset.items.item_id.iloc[100:104].tolist()
    category = dict(zip(dataset.items.item_id, dataset.items.category))
    assert ingest(a, [event_of("alice", items[0])]) == (1, 0)
    profile = b.GetProfile(profile_pb2.GetProfileRequest(user_id="alice"), timeout=10)
    assert profile.known and profile.event_count == 1  # B caches alice's profile now
    assert ingest(a, [event_of("alice", items[1]), event_of("bob", items[0]), event_of("bob", items[2])]) == (3, 0)
    profile = b.GetProfile(profile_pb2.GetProfileRequest(user_id="alice"), timeout=10)
    assert profile.event_count == 2 and profile.recent_history[0].item_id == items[1], \
        "B's cached profile follows what A ingested"
    assert popularity_of(b, items) == ([2, 1, 1, 0], 2)
    popular = b.GetPopularItems(profile_pb2.GetPopularItemsRequest(k=3), timeout=10).items
    assert [(p.item_id, p.events) for p in popular] == [(items[0], 2)] + sorted([(items[1], 1), (items[2], 1)])
    # Bob bought items[0] beside items[2]: alice, who has items[0], is offered items[2].
    assert co_purchased(b, "alice") == [(items[2], category[items[2]], 1)]
    assert co_purchased(a, "alice") == co_purchased(b, "alice")
    code = None
    try:
        b.GetPopularItems(profile_pb2.GetPopularItemsRequest(k=3, categories=["No_Such_Category"]), timeout=10)
    except grpc.RpcError as error:
        code = error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_one_event_sent_to_both_replicas_is_counted_once(replicas, dataset):
    a, b = replicas
    item_id = dataset.items.item_id.iloc[110]
    before, _ = popularity_of(a, [item_id])
    for n in range(5):
        event = event_of("carol", item_id, key=f"carol-order-{n}")
        calls = [stub.IngestEvents.future(profile_pb2.IngestEventsRequest(events=[event]), timeout=30)
                 for stub in (a, b, a, b)]
        replies = sorted((call.result().accepted, call.result().duplicates) for call in calls)
        assert replies == [(0, 1), (0, 1), (0, 1), (1, 0)], f"carol-order-{n}: {replies}"
    assert popularity_of(b, [item_id])[0] == [before[0] + 5]
    assert b.GetProfile(profile_pb2.GetProfileRequest(user_id="carol"), timeout=10).event_count == 5


def test_concurrent_ingestion_through_both_replicas_counts_exactly(replicas, dataset):
    """Several clients send keyed batches, each batch through both replicas
    at about the same time (a retry to the other replica): afterwards both
    replicas give the counts of the events once each."""
    a, b = replicas
    rng = random.Random(5)
    pool = dataset.items.iloc[200:230]
    category = dict(zip(pool.item_id, pool.category))
    shoppers = [f"concurrent-{n}" for n in range(6)]
    events = [event_of(rng.choice(shoppers), rng.choice(list(category)), key=f"c-{n}") for n in range(180)]
    batches = [events[start:start + 5] for start in range(0, len(events), 5)]
    errors = []

    def client(number):
        try:
            for batch in batches[number::4]:
                for stub in ((a, b) if rng.random() < 0.5 else (b, a)):
                    ingest(stub, batch)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    popularity, pairs = in_memory_counts([StoredEvent(e.user_id, e.item_id, category[e.item_id], e.type, 0)
                                          for e in events])
    items = sorted(category)
    for stub in (a, b):
        assert popularity_of(stub, items)[0] == popularity.counts(items)
        for shopper in shoppers:
            seen = sorted({e.item_id for e in events if e.user_id == shopper})
            expected = pairs.most_shared(seen, 20, exclude=seen, leave_out_user=shopper)
            assert co_purchased(stub, shopper) == [(i, category[i], n) for i, n in expected]
            count = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=10).event_count
            assert count == sum(1 for e in events if e.user_id == shopper)


def test_stores_in_an_older_layout_are_refused_not_read_as_empty(redis_server):
    """Layout 1 (a global `seq` key) and layout 2 (shoppers' keys named by
    their id, before they were named by its SHA-256): opening either would
    answer every shopper as unknown, so the store refuses to start."""
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    for old in ({"seq": "12"}, {"meta": {"layout": "2"}}):
        opener = StoreOpener("redis", redis_url=redis_server.url, prefix=unique_redis_prefix())
        for name, value in old.items():
            if isinstance(value, dict):
                client.hset(opener.prefix + name, mapping=value)
            else:
                client.set(opener.prefix + name, value)
        with pytest.raises(RuntimeError, match="layout"):
            opener()
    fresh = StoreOpener("redis", redis_url=redis_server.url, prefix=unique_redis_prefix())
    fresh().close()
    assert client.hget(fresh.prefix + "meta", "layout") == "3"
    fresh().close()  # its own layout opens again

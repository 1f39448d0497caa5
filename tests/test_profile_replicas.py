"""Stateless profile replicas on the Redis store: popularity and co-purchase
counts kept in Redis (one server, and a 3-master Redis Cluster), the same for
every store handle and every profile server on it, counted once per event
whatever crashes, retries and concurrent replicas do."""
from __future__ import annotations

import random
import threading

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

    def run_then_crash_before_done(calls):
        if calls and calls[0][0] is crashed._done:
            raise Crash
        return real_run(calls)

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
    assert store.forget_user(gone) == expected
    assert store.forget_user(gone) == 0, "forgetting twice changes nothing"
    assert store.user_events(gone) == [] and store.user_summary(gone) == (0, {}, [])
    assert store.user_version(gone) != version
    assert_same_counts(store, [e for e in events if e.user_id != gone])
    # Their idempotency keys went too: the same event can be sent again.
    keyed = next(e for e in events if e.user_id == gone and e.idempotency_key)
    assert store.append([keyed]) == [True]


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

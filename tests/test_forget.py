"""Forgetting a shopper (issue #17, part 4): DeleteUser on the gateway and the
profile service, every store and every read path.

The stores (SQLite, one Redis server, a Redis Cluster): forget_user removes the events and every count
made of them, leaves nothing of the shopper readable in the storage, keeps a
tombstone that bulk loads and late events respect, and is idempotent. The
services: after a DeleteUser no read path returns anything of the shopper,
popularity and co-purchase counts are those of a store that never had their
events, and a restart (also one that loads the data set again) does not bring
them back. Who may ask, and the audit line.

Destructive: the servers here are this module's own (a profile service on its
own store, once per store setup, and a gateway in front of it), beside the
session stack's embedding and ranking services.
"""
from __future__ import annotations

import gzip
import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass, field

import grpc
import pandas as pd
import pytest

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.common.v1 import common_pb2
from recsys_core.data import paths, shopping
from recsys_core.signals.copurchase import CoPurchases
from recsys_core.store.events import PURCHASE, StoredEvent, tombstone_of
from services.profile.popularity import Popularity
from tests.conftest import (
    STORE_SETUPS, admin_token, gateway_channel, secured, service_channel, start, tls_material, unique_redis_prefix,
)

REVIEW = "zebra-striped marmalade umbrella, would forget again"


def event(user_id, item_id, ts, category="Beauty", review=None, key=None, type_=PURCHASE):
    return StoredEvent(user_id, item_id, category, type_, ts, review=review, idempotency_key=key)


# -- the stores -----------------------------------------------------------------------


def shoppers_events():
    return [
        event("victim", "i1", 100),
        event("victim", "i2", 101, review=REVIEW, key="victim-2"),
        event("victim", "i3", 102, category="Toys"),
        event("victim", "i1", 103),
        event("other", "i1", 104),
        event("other", "i4", 105, category="Toys"),
        event("third", "i2", 106),
    ]


def test_forget_user_removes_the_events_and_every_count_of_them(open_event_store):
    store = open_event_store()
    assert all(store.append(shoppers_events()))
    assert store.forget_user("victim", now=1000) == 4

    for handle in (store, open_event_store()):  # the storage itself, not only this handle
        assert handle.user_events("victim") == []
        assert handle.user_reviews("victim", 10) == []
        assert handle.user_summary("victim") == (0, {}, [])
        assert sorted(handle.item_counts()) == [("i1", "Beauty", 1), ("i2", "Beauty", 1), ("i4", "Toys", 1)]
        assert sorted(handle.user_items()) == [("other", "i1", "Beauty"), ("other", "i4", "Toys"),
                                               ("third", "i2", "Beauty")]
        assert handle.count() == 3
        assert handle.forgotten_at("victim") == 1000
        assert handle.forgotten_at("other") is None
        # Other shoppers keep everything.
        assert [e.item_id for e in handle.user_events("other")] == ["i1", "i4"]

    # Idempotent: nothing left to remove, the tombstone keeps the later time.
    assert store.forget_user("victim", now=900) == 0
    assert store.forgotten_at("victim") == 1000
    assert store.forget_user("never-seen", now=1000) == 0
    assert store.count() == 3


def test_nothing_of_a_forgotten_shopper_is_left_in_the_storage(open_event_store):
    """Not only unreadable through the interface: neither their id nor their
    review text is anywhere in the SQLite file (and its WAL) or in any Redis
    key or value under the store's prefix."""
    store = open_event_store()
    store.append(shoppers_events())
    store.forget_user("victim")
    if open_event_store.backend == "sqlite":
        raw = b"".join(path.read_bytes() for path in store.path.parent.glob(store.path.name + "*"))
        assert REVIEW.encode() not in raw
        assert b"victim" not in raw
        assert tombstone_of("victim").encode() in raw
        return
    import redis
    from redis.cluster import RedisCluster

    client = (RedisCluster if open_event_store.redis_mode == "cluster" else redis.Redis).from_url(
        open_event_store.redis_url, decode_responses=True)
    everything = []
    for key in client.scan_iter(match=open_event_store.prefix + "*"):
        kind = client.type(key)
        value = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                 "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
        everything.append(f"{key} {value}")
    dump = "\n".join(everything)
    assert "victim" not in dump and REVIEW not in dump
    assert tombstone_of("victim") in dump
    assert "other" in dump  # the dump does show shoppers' keys: the check can fail


def test_a_bulk_load_skips_forgotten_shoppers_and_late_events_are_dropped(open_event_store):
    """The tombstone: a data set loaded after the forgetting (a new marker)
    does not bring the shopper's events back, and events dated before the
    forgetting that arrive late are dropped; events after it are a returning
    shopper's, stored as a new shopper's."""
    store = open_event_store()
    store.append(shoppers_events())
    store.forget_user("victim", now=1000)

    data_set = [event("victim", "i9", 50), event("victim", "i9", None), event("newcomer", "i9", 51)]
    assert store.bulk_load(data_set, total=3, marker="again", show_progress=False)
    assert store.user_events("victim") == []
    assert [e.item_id for e in store.user_events("newcomer")] == ["i9"]

    late, undated, back = event("victim", "i1", 999), event("victim", "i1", None), event("victim", "i5", 1000)
    assert store.append([late, undated, back, event("other", "i5", 10)]) == [False, False, True, True]
    assert [(e.item_id, e.ts) for e in open_event_store().user_events("victim")] == [("i5", 1000)]
    assert ("i9", "Beauty", 1) in store.item_counts()

    # Forgotten again later: the new events go too, the tombstone moves on.
    assert store.forget_user("victim", now=2000) == 1
    assert store.append([event("victim", "i5", 1500)]) == [False]
    assert store.forgotten_at("victim") == 2000


# -- the counts in memory -------------------------------------------------------------


BASKETS = [("a", "x", "C1"), ("a", "y", "C1"), ("a", "z", "C2"), ("b", "x", "C1"), ("b", "y", "C1"),
           ("c", "y", "C1"), ("c", "z", "C2"), ("c", "w", "C2"), ("d", "w", "C2")]


@pytest.mark.parametrize("fold_at", [1, 1_000_000], ids=["folded", "in-delta"])
def test_co_purchases_without_a_shopper_are_those_never_counted_with_them(fold_at):
    forgetting = CoPurchases(fold_at=fold_at, fold_in_background=False)
    forgetting.add_many(BASKETS[:4])
    for row in BASKETS[4:]:
        forgetting.add(*row)
    before = forgetting.related(["x", "y", "z", "w"])
    assert forgetting.remove_user("a") == 3
    assert forgetting.remove_user("a") == 0
    reference = CoPurchases()
    reference.add_many([row for row in BASKETS if row[0] != "a"])
    for folded in (False, True):  # read beside the layer of -1s, then with it merged
        if folded:
            forgetting.fold()
            assert forgetting.footprint()["delta_entries"] == 0
        for history in (["x"], ["y"], ["z"], ["w"], ["x", "y", "z", "w"]):
            assert forgetting.related(history) == reference.related(history), history
            assert forgetting.most_shared(history, 10, leave_out_user="c") == \
                reference.most_shared(history, 10, leave_out_user="c")
    assert forgetting.related(["x", "y", "z", "w"]) != before
    # A shopper who comes back is counted afresh.
    forgetting.add("a", "x", "C1")
    reference.add("a", "x", "C1")
    assert forgetting.related(["x", "y"]) == reference.related(["x", "y"])


def test_popularity_without_a_shopper_is_that_never_counted_with_them():
    popularity = Popularity()
    popularity.add_many([("x", "C1", 3), ("y", "C1", 2), ("z", "C2", 1)])
    popularity.top(5)  # rankings built: remove must move items within them
    popularity.remove("x", 2)
    popularity.remove("z", 1)
    popularity.remove("unknown", 1)
    assert popularity.top(5) == [("y", "C1", 2), ("x", "C1", 1)]
    assert popularity.categories() == {"C1"}  # no item left in C2: as if it never had one
    assert popularity.counts(["x", "z"]) == [1, 0]
    assert popularity.max_count() == 2


# -- the services ---------------------------------------------------------------------


def pick_shoppers(events: pd.DataFrame) -> tuple[str, str, str, str]:
    """(victim, bystander, co-shopper, returner): the victim has several
    items, each bought by others too (so popularity and co-purchases move);
    the co-shopper shares one of them; bystander and returner are others."""
    buyers = events.groupby("item_id")["user_id"].nunique()
    items = events.drop_duplicates(["user_id", "item_id"]).assign(shared=lambda f: f["item_id"].map(buyers) > 1)
    per_user = items.groupby("user_id")["shared"].agg(["sum", "size"])
    candidates = per_user[(per_user["sum"] == per_user["size"]) & (per_user["size"] >= 3)]
    victim = sorted(candidates.sort_values("size", ascending=False).index[:20])[0]
    victim_items = set(items.loc[items["user_id"] == victim, "item_id"])
    sharing = sorted(set(items.loc[items["item_id"].isin(victim_items), "user_id"]) - {victim})
    co_shopper = sharing[0]
    others = sorted(set(per_user.index) - {victim, co_shopper} - set(sharing))
    return victim, others[0], co_shopper, others[1]


@dataclass
class World:
    backend: str
    config: object
    profile: str
    gateway: str
    servers: dict
    victim: str
    bystander: str
    co_shopper: str
    returner: str
    events: pd.DataFrame
    before: dict = field(default_factory=dict)
    audit: list = field(default_factory=list)
    deleted: object = None

    def profile_stub(self, token="admin"):
        channel = service_channel(self.profile, "profile", token=token)
        return channel, profile_pb2_grpc.ProfileServiceStub(channel)


class AuditLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def profile_config(backend, request, tmp_path, data_dir):
    from services.profile.config import ProfileConfig

    stack = request.getfixturevalue("stack")
    base = dict(address="127.0.0.1:0", embedding_address=stack.embedding, data_dir=str(data_dir), retail_dir="",
                **secured("profile"))
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        return ProfileConfig(store="redis", redis_url=server.url, redis_prefix=unique_redis_prefix(), **base)
    if backend == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return ProfileConfig(store="redis", redis_url=cluster.url, redis_mode="cluster",
                             redis_prefix=unique_redis_prefix(), **base)
    return ProfileConfig(store_path=str(tmp_path / "events.sqlite3"), **base)


def start_profile(config):
    from services.profile.server import create_server

    return start(create_server(config))


def shopper_token(user_id):
    return tls_material().token(user_id, ["shopper"], tenant="amazon")


def all_popularity(stub, item_ids):
    counts, largest = {}, 0
    for start_at in range(0, len(item_ids), 10_000):  # the most one request may ask about
        chunk = item_ids[start_at:start_at + 10_000]
        reply = stub.GetItemPopularity(profile_pb2.GetItemPopularityRequest(item_ids=chunk), timeout=30)
        counts.update(zip(chunk, reply.events))
        largest = reply.max_events
    return counts, largest


def co_purchase_reply(stub, user_id, anchors):
    reply = stub.GetCoPurchasedItems(profile_pb2.GetCoPurchasedItemsRequest(
        user_id=user_id, k=1000, anchor_item_ids=anchors, include_seen=True), timeout=30)
    return [(i.item_id, i.category, i.shoppers) for i in reply.items]


@pytest.fixture(scope="module", params=STORE_SETUPS)
def world(request, tmp_path_factory):
    """A profile service on its own store of the bundled data, a gateway in
    front of it; what every read path says about the victim before, then the
    victim forgotten through the gateway with their own token."""
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway

    backend = request.param
    stack = request.getfixturevalue("stack")
    tmp_path = tmp_path_factory.mktemp(f"forget-{backend}")
    config = profile_config(backend, request, tmp_path, paths.BUNDLED_DATA_DIR)
    events = shopping.load_interactions(paths.BUNDLED_DATA_DIR)
    servers = {}
    servers["profile"], profile = start_profile(config)
    servers["gateway"], gateway = start(create_gateway(GatewayConfig(
        address="127.0.0.1:0", profile_address=profile, embedding_address=stack.embedding,
        ranking_address=stack.ranking, **secured("gateway"))))
    world = World(backend, config, profile, gateway, servers, *pick_shoppers(events), events=events)

    channel, stub = world.profile_stub()
    with channel:
        item_ids = sorted(events["item_id"].unique())
        victim_items = sorted(events.loc[events["user_id"] == world.victim, "item_id"].unique())
        world.before = {
            "profile": stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.victim), timeout=30),
            "popularity": all_popularity(stub, item_ids),
            "co_purchases": co_purchase_reply(stub, world.co_shopper, victim_items),
        }
    with gateway_channel(gateway, token=shopper_token(world.victim)) as channel:
        gateway_stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        world.before["recommend"] = gateway_stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=world.victim, k=10), timeout=30)
        audit = AuditLines()
        logging.getLogger("recsys.audit").addHandler(audit)
        logging.getLogger("recsys.audit").setLevel(logging.INFO)
        try:
            world.deleted = gateway_stub.DeleteUser(profile_pb2.DeleteUserRequest(user_id=world.victim), timeout=60)
        finally:
            logging.getLogger("recsys.audit").removeHandler(audit)
        world.audit = audit.lines
    yield world
    for server in world.servers.values():
        server.stop(None)


def victim_events(world):
    return world.events[world.events["user_id"] == world.victim]


def test_delete_user_reports_what_it_removed(world):
    assert world.before["profile"].known and world.before["profile"].event_count == len(victim_events(world))
    assert world.deleted.user_id == world.victim
    assert world.deleted.events_removed == len(victim_events(world)) > 0
    assert world.deleted.items_affected == victim_events(world)["item_id"].nunique()


def test_the_audit_lines_name_who_asked_which_shopper_and_how_much(world):
    gateway_line, = [line for line in world.audit if line.startswith("audit gateway DeleteUser")]
    profile_line, = [line for line in world.audit if line.startswith("audit profile DeleteUser")]
    removed = f"user_id={world.victim} events_removed={world.deleted.events_removed} "
    assert removed in gateway_line and removed in profile_line
    assert f"requested_by=jwt sub={world.victim!r} tenant=amazon roles=shopper" in gateway_line
    assert "requested_by=service=gateway" in profile_line
    for line in world.audit:
        assert "127.0.0.1" not in line and "ipv4" not in line  # no address
        assert not any(item in line for item in victim_events(world)["item_id"])  # nothing else of theirs


def test_profile_reads_know_nothing_of_the_shopper(world):
    channel, stub = world.profile_stub()
    with channel:
        profile = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.victim), timeout=30)
        never_seen = stub.GetProfile(profile_pb2.GetProfileRequest(user_id="never-seen-shopper"), timeout=30)
        profile.user_id = never_seen.user_id
        assert profile == never_seen and not profile.known and not profile.recent_history
        signals = stub.GetShopperSignals(profile_pb2.GetShopperSignalsRequest(
            user_id=world.victim, co_purchase_k=100, popular_k=10), timeout=30)
        assert not signals.profile.known and not signals.profile.seen_item_ids
        assert list(signals.co_purchased) == []
        assert len(signals.popular) == 10  # the cold-start answer
        assert co_purchase_reply(stub, world.victim, []) == []


def test_popularity_is_as_if_the_events_never_happened(world):
    """Every item's count, the largest and the ranking equal those of a store
    that never had the victim's events."""
    before, max_before = world.before["popularity"]
    victim_counts = victim_events(world)["item_id"].value_counts().to_dict()
    channel, stub = world.profile_stub()
    with channel:
        after, max_after = all_popularity(stub, sorted(before))
        top = stub.GetPopularItems(profile_pb2.GetPopularItemsRequest(k=1000), timeout=30).items
    expected = {item: n - victim_counts.get(item, 0) for item, n in before.items()}
    assert after == expected
    assert after != before
    assert max_after == max(expected.values())
    reference = Popularity()
    others = world.events[world.events["user_id"] != world.victim]
    reference.add_many(others.groupby(["item_id", "category"]).size().reset_index().itertuples(index=False))
    # Item and count: an item with events in two categories (the data has
    # some) is listed under either, as the store happens to order them.
    assert [(i.item_id, i.events) for i in top] == [(i, n) for i, _, n in reference.top(1000)]


def test_co_purchases_are_as_if_the_events_never_happened(world):
    victim_items = sorted(victim_events(world)["item_id"].unique())
    channel, stub = world.profile_stub()
    with channel:
        after = co_purchase_reply(stub, world.co_shopper, victim_items)
    reference = CoPurchases()
    others = world.events[world.events["user_id"] != world.victim]
    reference.add_many(others[["user_id", "item_id", "category"]].drop_duplicates().itertuples(index=False))
    expected = [(i, reference.category(i), n)
                for i, n in reference.most_shared(victim_items, 1000, leave_out_user=world.co_shopper)]
    assert after == expected
    assert after != world.before["co_purchases"]


def test_the_gateway_answers_as_for_a_new_shopper(world):
    assert world.before["recommend"].path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
    with gateway_channel(world.gateway, token=shopper_token(world.victim)) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        profile = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.victim), timeout=30)
        assert not profile.known and profile.event_count == 0 and not profile.seen_item_ids
        reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id=world.victim, k=10), timeout=30)
        assert reply.path == gateway_pb2.RECOMMENDATION_PATH_COLD_START
        assert all(not item.reason.startswith("because you") for item in reply.items)


def test_deleting_again_removes_nothing_and_says_so(world):
    with gateway_channel(world.gateway) as channel:  # an admin's token
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).DeleteUser(
            profile_pb2.DeleteUserRequest(user_id=world.victim), timeout=30)
    assert (reply.user_id, reply.events_removed, reply.items_affected) == (world.victim, 0, 0)


def test_only_the_shopper_or_an_admin_may_delete(world):
    """Refusals leave the bystander's data in place."""
    request = profile_pb2.DeleteUserRequest(user_id=world.bystander)
    refused = {
        None: grpc.StatusCode.UNAUTHENTICATED,
        shopper_token(world.victim): grpc.StatusCode.PERMISSION_DENIED,  # another shopper
        tls_material().token("amazon-backend", ["service"], tenant="amazon"): grpc.StatusCode.PERMISSION_DENIED,
    }
    for token, code in refused.items():
        with gateway_channel(world.gateway, token=token) as channel:
            with pytest.raises(grpc.RpcError) as error:
                gateway_pb2_grpc.GatewayServiceStub(channel).DeleteUser(request, timeout=30)
            assert error.value.code() == code
    # The profile service itself: a service certificate other than the gateway's, no token.
    channel = service_channel(world.profile, "profile", identity="ingest", token=None)
    with channel, pytest.raises(grpc.RpcError) as error:
        profile_pb2_grpc.ProfileServiceStub(channel).DeleteUser(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel, stub = world.profile_stub()
    with channel:
        profile = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.bystander), timeout=30)
    assert profile.known and profile.event_count > 0


@pytest.mark.parametrize("user_id,message", [
    ("", "must not be empty"), ("a" * 129, "the limit is 128"), ("bad\x00id", "user_id"),
    ("bidi\u202eid", "user_id"),
])
def test_bad_ids_are_refused(world, user_id, message):
    with gateway_channel(world.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.DeleteUser(profile_pb2.DeleteUserRequest(user_id=user_id), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    channel, stub = world.profile_stub()
    with channel, pytest.raises(grpc.RpcError) as error:
        stub.DeleteUser(profile_pb2.DeleteUserRequest(user_id=user_id), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_returning_shopper_starts_over(world):
    """Forgotten, then back: new events are stored, old ones sent late are not."""
    returner = world.events[world.events["user_id"] == world.returner]
    channel, stub = world.profile_stub()
    with channel:
        removed = stub.DeleteUser(profile_pb2.DeleteUserRequest(user_id=world.returner), timeout=30)
        assert removed.events_removed == len(returner)
        old = returner.iloc[0]
        new = common_pb2.Event(user_id=world.returner, item_id=old.item_id, type=common_pb2.EVENT_TYPE_PURCHASE,
                               timestamp=int(time.time()) + 1)
        late = common_pb2.Event(user_id=world.returner, item_id=old.item_id, type=common_pb2.EVENT_TYPE_PURCHASE,
                                timestamp=int(old.timestamp) if old.timestamp == old.timestamp else 1)
        reply = stub.IngestEvents(profile_pb2.IngestEventsRequest(events=[new, late]), timeout=30)
        assert (reply.accepted, reply.duplicates) == (1, 1)
        profile = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.returner), timeout=30)
    assert profile.known and profile.event_count == 1
    assert [e.timestamp for e in profile.recent_history] == [new.timestamp]


def test_recsys_delete_user_forgets_with_the_callers_token(world, monkeypatch, capsys):
    from recsys_cli import main as cli

    shopper = sorted(set(world.events["user_id"]) - {world.victim, world.bystander, world.co_shopper,
                                                    world.returner})[-1]
    monkeypatch.setenv("RECSYS_GATEWAY", world.gateway)
    monkeypatch.setenv("RECSYS_GATEWAY_CA", str(tls_material().ca))
    monkeypatch.setenv("RECSYS_TOKEN", shopper_token(world.victim))
    assert cli.main(["delete-user", shopper]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_TOKEN", shopper_token(shopper))
    assert cli.main(["delete-user", shopper]) == 0
    events = len(world.events[world.events["user_id"] == shopper])
    assert f"forgot {shopper}: {events} events on" in capsys.readouterr().out
    assert cli.main(["delete-user", shopper, "--json"]) == 0
    assert '"events_removed": 0' in capsys.readouterr().out
    monkeypatch.setenv("RECSYS_TOKEN", admin_token())  # a shopper's token is refused first: the id is not theirs
    assert cli.main(["delete-user", "bad\x00id"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def changed_copy(data_dir, out):
    """The data set with its rows in reverse: the same events under another
    marker, so a profile service starting on it loads them again into the
    same store."""
    out.mkdir()
    for path in data_dir.iterdir():
        if path.is_file():
            shutil.copy(path, out / path.name)
    frame = pd.read_csv(data_dir / shopping.INTERACTIONS_FILE, dtype=str, keep_default_na=False)
    with gzip.open(out / shopping.INTERACTIONS_FILE, "wt") as handle:
        frame.iloc[::-1].to_csv(handle, index=False)
    return out


def test_a_restart_does_not_bring_the_shopper_back(world, tmp_path):
    """Restarted on the same store, then on a changed copy of the data set
    (which it loads again: everyone else's events are there twice), the
    victim stays unknown and the returner keeps only their new event."""
    from dataclasses import replace

    bystander_events = len(world.events[world.events["user_id"] == world.bystander])
    for data_dir, copies in ((paths.BUNDLED_DATA_DIR, 1), (changed_copy(paths.BUNDLED_DATA_DIR, tmp_path / "d"), 2)):
        world.servers.pop("profile").stop(None).wait(30)
        world.servers["profile"], world.profile = start_profile(replace(world.config, data_dir=str(data_dir)))
        channel, stub = world.profile_stub()
        with channel:
            profile = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.victim), timeout=30)
            assert not profile.known and profile.event_count == 0
            assert co_purchase_reply(stub, world.victim, []) == []
            bystander = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.bystander), timeout=30)
            assert bystander.event_count == copies * bystander_events  # the data set was (re)loaded
            returner = stub.GetProfile(profile_pb2.GetProfileRequest(user_id=world.returner), timeout=30)
            assert returner.event_count == 1
    if world.backend == "sqlite":
        with sqlite3.connect(world.config.store_path) as connection:
            assert connection.execute("SELECT COUNT(*) FROM events WHERE user_id = ?",
                                      (world.victim,)).fetchone() == (0,)
            # The victim, the returner and the shopper `recsys delete-user` forgot.
            assert connection.execute("SELECT COUNT(*) FROM forgotten").fetchone() == (3,)

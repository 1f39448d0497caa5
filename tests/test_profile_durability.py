"""An event that IngestEvents acknowledged survives crashes, on both stores.

The profile service runs as a real process on its own store, several clients
ingest keyed batches at once, and the service (or Redis under it) is killed
with SIGKILL in mid-stream. After a restart on the same store every
acknowledged batch is there, and every batch is there whole or not at all.
Each batch gives each of its shoppers items no other batch uses, so the items
a profile has seen tell exactly which batches were stored.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from recsys.common.v1 import common_pb2
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core.data import paths
from recsys_cli.stack import free_port, wait_until_serving
from tests.conftest import secured_env, service_channel

pytestmark = pytest.mark.integration

WRITERS = 4
EVENTS_PER_SHOPPER = 3  # each batch: three events for each of its two shoppers
BATCH_SIZE = 2 * EVENTS_PER_SHOPPER
MAX_BATCHES = 120  # per writer and phase; the crash comes long before
CRASH_AFTER = 100  # acknowledged batches (of all writers) before the kill


@dataclass
class Batch:
    shoppers: tuple[str, str]
    items: list[str]
    request: profile_pb2.IngestEventsRequest
    acknowledged: bool = False

    def items_of(self, shopper: str) -> set[str]:
        half = self.shoppers.index(shopper)
        return set(self.items[half * EVENTS_PER_SHOPPER:(half + 1) * EVENTS_PER_SHOPPER])


@dataclass
class Writers:
    """WRITERS threads ingesting keyed batches until told to stop or refused."""

    address: str
    items: list[str]
    phase: int
    batches: list[Batch] = field(default_factory=list)
    errors: list[grpc.StatusCode] = field(default_factory=list)
    wrong_replies: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(w,), daemon=True) for w in range(WRITERS)]
        for thread in self.threads:
            thread.start()

    def batch(self, writer: int, number: int) -> Batch:
        shoppers = (f"shopper-{writer}-a", f"shopper-{writer}-b")
        first = ((self.phase * WRITERS + writer) * MAX_BATCHES + number) * BATCH_SIZE
        items = self.items[first:first + BATCH_SIZE]
        events = [
            common_pb2.Event(user_id=shoppers[n // EVENTS_PER_SHOPPER], item_id=item_id,
                             type=common_pb2.EVENT_TYPE_PURCHASE, idempotency_key=f"{self.phase}/{writer}/{number}/{n}")
            for n, item_id in enumerate(items)
        ]
        return Batch(shoppers, items, profile_pb2.IngestEventsRequest(events=events))

    def _write(self, writer: int) -> None:
        # As the event pipeline would: the `ingest` certificate, no token.
        with service_channel(self.address, "profile", identity="ingest", token=None) as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            for number in range(MAX_BATCHES):
                if self.stop.is_set():
                    return
                batch = self.batch(writer, number)
                with self._lock:
                    self.batches.append(batch)  # attempted: stored or not, never half
                try:
                    reply = stub.IngestEvents(batch.request, timeout=10)
                except grpc.RpcError as error:
                    with self._lock:
                        self.errors.append(error.code())
                    return
                if (reply.accepted, reply.duplicates) != (BATCH_SIZE, 0):
                    self.wrong_replies.append(f"{batch.request.events[0].idempotency_key}: {reply}")
                batch.acknowledged = True

    def acknowledged(self) -> int:
        with self._lock:
            return sum(b.acknowledged for b in self.batches)

    def wait_for(self, acknowledged: int, timeout: float = 30) -> None:
        give_up = time.monotonic() + timeout
        while self.acknowledged() < acknowledged:
            assert time.monotonic() < give_up, f"only {self.acknowledged()} batches acknowledged"
            assert any(t.is_alive() for t in self.threads), f"writers stopped early: {self.errors}"
            time.sleep(0.005)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.wrong_replies, self.wrong_replies
        assert self.errors, "every writer finished before the crash: the test proved nothing"


class ProfileProcess:
    """`python -m services.profile.server` on a free port, configured by environment."""

    started: list["ProfileProcess"] = []

    def __init__(self, env: dict[str, str], log_path):
        self.address = f"127.0.0.1:{free_port()}"
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PROFILE_ADDRESS=self.address, PROFILE_DATA_DIR="",
                           # An empty store: loading the bundled retail set into Redis
                           # (6.9 million co-purchase counts) would outlast the start wait.
                           PROFILE_RETAIL_DIR="",
                           PROFILE_WORKERS="8", **secured_env("profile"), **env)
        self.log = open(log_path, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "services.profile.server"], env=environment,
                                        cwd=paths.REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        ProfileProcess.started.append(self)
        try:
            wait_until_serving(self.address, 60, self.process,
                               channel=lambda: service_channel(self.address, "profile", token=None))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL: no shutdown hooks, no draining
            self.process.wait(10)
        self.log.close()


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while ProfileProcess.started:
        ProfileProcess.started.pop().kill()


def check_store(address: str, batches: list[Batch]) -> None:
    """Every acknowledged batch is stored, every batch whole or not at all,
    nothing twice; then re-sending each batch is all duplicates when it was
    stored and all accepted when it was not."""
    shoppers = sorted({s for b in batches for s in b.shoppers})
    with service_channel(address, "profile") as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        profiles = {s: stub.GetProfile(profile_pb2.GetProfileRequest(user_id=s, history_limit=1000), timeout=10)
                    for s in shoppers}
        seen = {s: set(p.seen_item_ids) for s, p in profiles.items()}
        stored = []
        for batch in batches:
            present = [batch.items_of(s) <= seen[s] for s in batch.shoppers]
            partly = [bool(batch.items_of(s) & seen[s]) for s in batch.shoppers]
            assert present in ([True, True], [False, False]) and partly == present, \
                f"batch {batch.request.events[0].idempotency_key} is half stored"
            assert present[0] or not batch.acknowledged, \
                f"acknowledged batch {batch.request.events[0].idempotency_key} was lost"
            stored.append(present[0])
        for shopper in shoppers:
            expected = sum(EVENTS_PER_SHOPPER for b, s in zip(batches, stored) if s and shopper in b.shoppers)
            assert profiles[shopper].event_count == expected == len(seen[shopper]), shopper
        for batch, was_stored in zip(batches, stored):
            reply = stub.IngestEvents(batch.request, timeout=10)
            expected = (0, BATCH_SIZE) if was_stored else (BATCH_SIZE, 0)
            assert (reply.accepted, reply.duplicates) == expected


@pytest.fixture(scope="module")
def catalogue_items(dataset):
    items = dataset.items.item_id.tolist()
    assert len(items) >= 2 * WRITERS * MAX_BATCHES * BATCH_SIZE
    return items


def store_environment(backend: str, tmp_path) -> tuple[dict[str, str], object]:
    if backend == "sqlite":
        return {"PROFILE_STORE": "sqlite", "PROFILE_STORE_PATH": str(tmp_path / "events.sqlite3")}, None
    from recsys_core.store.local_redis import LocalRedis

    redis = LocalRedis(tmp_path / "redis", profile_keys=("crash-*",)).start()
    prefix = f"crash-{uuid.uuid4().hex[:8]}:"
    env = {"PROFILE_STORE": "redis", "PROFILE_REDIS_URL": redis.url, "PROFILE_REDIS_PREFIX": prefix}
    return env, redis


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_acknowledged_events_survive_a_kill_of_the_service(backend, stack, catalogue_items, tmp_path, request):
    if backend == "redis":
        request.getfixturevalue("redis_server")  # skips (fails in CI) without redis-server
    env, redis = store_environment(backend, tmp_path)
    env["PROFILE_EMBEDDING_ADDRESS"] = stack.embedding
    try:
        service = ProfileProcess(env, tmp_path / "profile.log")
        writers = Writers(service.address, catalogue_items, phase=0)
        writers.wait_for(CRASH_AFTER)
        service.kill()
        writers.join()

        restarted = ProfileProcess(env, tmp_path / "profile.log")
        check_store(restarted.address, writers.batches)
        restarted.kill()
    finally:
        if redis is not None:
            redis.stop()


def test_acknowledged_events_survive_a_kill_of_redis(stack, catalogue_items, tmp_path, redis_server):
    """Redis dies in mid-stream and restarts from its append-only file; the
    service answers UNAVAILABLE meanwhile and reconnects by itself. (This test
    starts a Redis of its own to kill; `redis_server` only skips it without one.)"""
    env, redis = store_environment("redis", tmp_path)
    env["PROFILE_EMBEDDING_ADDRESS"] = stack.embedding
    try:
        service = ProfileProcess(env, tmp_path / "profile.log")
        writers = Writers(service.address, catalogue_items, phase=1)
        writers.wait_for(CRASH_AFTER)
        redis.kill()
        writers.join()
        assert set(writers.errors) == {grpc.StatusCode.UNAVAILABLE}, writers.errors

        redis.start()
        check_store(service.address, writers.batches)  # the same service, reconnected
        service.kill()
        restarted = ProfileProcess(env, tmp_path / "profile.log")  # and a fresh one, without caches
        check_store(restarted.address, writers.batches)
        restarted.kill()
    finally:
        redis.stop()


# -- the Redis store's own guarantees ------------------------------------------------


def test_the_redis_store_refuses_a_server_that_could_lose_events(redis_server, tmp_path):
    from recsys_core.store.local_redis import LocalRedis
    from recsys_core.store.redis_store import DurabilityError, RedisEventStore

    cases = {
        ("--appendonly", "no"): "appendonly is not yes",
        ("--appendfsync", "everysec"): "appendfsync is everysec",
        ("--maxmemory-policy", "allkeys-lru"): "maxmemory-policy is allkeys-lru",
        ("--no-appendfsync-on-rewrite", "yes"): "no-appendfsync-on-rewrite",
    }
    for n, (args, problem) in enumerate(cases.items()):
        with LocalRedis(tmp_path / str(n), extra_args=args) as server:
            with pytest.raises(DurabilityError, match=problem):
                RedisEventStore(server.url)
            if args == ("--appendfsync", "everysec"):
                RedisEventStore(server.url, durability="everysec").close()
            RedisEventStore(server.url, durability="unchecked").close()
    RedisEventStore(redis_server.url).close()  # the durable settings pass


def test_a_batch_redis_has_no_memory_for_is_refused_whole(redis_server, tmp_path):
    import redis as redis_client

    from recsys_core.errors import ResourceExhausted
    from recsys_core.store.local_redis import LocalRedis
    from recsys_core.store.redis_store import RedisEventStore
    from recsys_core.store.events import VIEW, StoredEvent

    with LocalRedis(tmp_path / "redis") as server:
        store = RedisEventStore(server.url)
        batch = [StoredEvent("u", f"i{n}", "c", VIEW, n, idempotency_key=f"k{n}") for n in range(5)]
        admin = redis_client.Redis.from_url(server.admin_url)
        admin.config_set("maxmemory", 1)
        with pytest.raises(ResourceExhausted):
            store.append(batch)
        admin.config_set("maxmemory", 0)
        assert store.count() == 0 and store.user_events("u") == [] and store.item_counts() == []
        assert store.append(batch) == [True] * 5
        admin.close()
        store.close()


def test_redis_runs_with_acl_users_and_no_anonymous_access(redis_server):
    """The profile user reaches its own keys only and no dangerous command;
    without credentials nothing at all; a wrong password is refused."""
    import redis as redis_client

    from recsys_core.store.local_redis import HOST

    profile = redis_client.Redis.from_url(redis_server.url)
    profile.set("test:acl:x", "1")
    with pytest.raises(redis_client.exceptions.NoPermissionError):
        profile.set("other:key", "1")
    for command in (("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*"), ("ACL", "LIST")):
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            profile.execute_command(*command)
    with pytest.raises(redis_client.exceptions.AuthenticationError):
        redis_client.Redis(host=HOST, port=redis_server.port).ping()
    with pytest.raises(redis_client.exceptions.AuthenticationError):
        redis_client.Redis(host=HOST, port=redis_server.port, username="profile", password="guess").ping()

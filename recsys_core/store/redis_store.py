"""Durable event storage in Redis: the EventStore interface over one Redis server.

Every write is one Lua script, which Redis runs atomically and appends to its
append-only file as one MULTI/EXEC block: a batch is stored whole or not at
all, also when Redis dies while writing it (on restart Redis drops an
unfinished MULTI/EXEC block at the end of the AOF). With `appendfsync always`
Redis fsyncs the AOF before it replies, so append() returns only once the
batch is on disk. The store checks the server's persistence settings when it
opens (`durability`), and refuses a server that could lose acknowledged events.

Keys, all under `prefix` (default "recsys:profile:"):

    seq             string  global sequence, one number per stored event
    count           string  how many events are stored
    items           hash    JSON [item_id, category] -> events
    idem            hash    idempotency key -> the sequence number of its event
    meta            hash    key -> value (bulk-load markers and progress)
    reviews         hash    sequence number -> review text (only events with one)
    forgotten       hash    tombstone (events.tombstone_of: SHA-256 of a user id) -> unix
                            seconds it was forgotten at (forget_user)
    u:<user>:e      list    the shopper's events, oldest first: "<seq> <JSON>" (RECORD_FIELDS)
    u:<user>:c      hash    category -> the shopper's events in it
    u:<user>:s      zset    item_id -> the sequence number of its latest event

The sequence is assigned inside the script, so it follows the order in which
batches were stored, like SQLite's AUTOINCREMENT id. Needs Redis 7.0 or later
(script flags); a single primary, not Redis Cluster (one script touches many
shoppers' keys).
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from tqdm import tqdm

from recsys_core.errors import ResourceExhausted, Unavailable
from recsys_core.store.events import EventStore, StoredEvent, tombstone_of

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "recsys:profile:"
# How the store checks the server's persistence when it opens:
#   always    - appendonly yes, appendfsync always: an acknowledged batch is on
#               disk, and survives a crash of Redis or of the machine (default);
#   everysec  - also accepts appendfsync everysec: survives a crash of Redis,
#               but a machine crash or power loss can lose about the last second;
#   unchecked - no check (e.g. a managed Redis that refuses CONFIG GET).
DURABILITY_LEVELS = ("always", "everysec", "unchecked")
# Events per script call while bulk loading: each call blocks Redis for a few
# milliseconds and costs one fsync.
BULK_CHUNK = 1000

# KEYS: seq, count, items, idem, meta, reviews, forgotten, then per event: its
#       shopper's events list, categories hash and seen zset.
# ARGV: n, bulk marker ('' for append), events already loaded, total,
#       then per event: idempotency key ('' for none), items field, category,
#       item_id, record JSON, review ('' for none), the shopper's tombstone,
#       timestamp ('' for none).
# Returns per event 1 (stored) or 0 (duplicate key, or a forgotten shopper's
# event from before the forgetting: events.superseded); when bulk loading,
# {-1} if the marker is loaded already, {-2, progress} if another loader moved on.
# Nothing in the loop can fail once it started (the keys are ours and of the
# right types, and without the allow-oom flag Redis refuses to start the script
# when out of memory), so the script never stops half way.
_WRITE_SCRIPT = """#!lua
local n = tonumber(ARGV[1])
local marker = ARGV[2]
local offset = tonumber(ARGV[3])
if marker ~= '' then
  if redis.call('HEXISTS', KEYS[5], 'loaded:' .. marker) == 1 then
    return {-1}
  end
  local progress = tonumber(redis.call('HGET', KEYS[5], 'loading:' .. marker) or '0')
  if progress ~= offset then
    return {-2, progress}
  end
end
local stored = {}
local added = 0
local any_forgotten = redis.call('EXISTS', KEYS[7]) == 1
for i = 0, n - 1 do
  local a = 5 + i * 8
  local k = 8 + i * 3
  local key = ARGV[a]
  local superseded = false
  if any_forgotten then
    local at = redis.call('HGET', KEYS[7], ARGV[a + 6])
    if at then
      superseded = ARGV[a + 7] == '' or tonumber(ARGV[a + 7]) < tonumber(at)
    end
  end
  if superseded or (key ~= '' and redis.call('HEXISTS', KEYS[4], key) == 1) then
    stored[i + 1] = 0
  else
    local seq = redis.call('INCR', KEYS[1])
    if key ~= '' then
      redis.call('HSET', KEYS[4], key, seq)
    end
    redis.call('RPUSH', KEYS[k], seq .. ' ' .. ARGV[a + 4])
    redis.call('HINCRBY', KEYS[k + 1], ARGV[a + 2], 1)
    redis.call('ZADD', KEYS[k + 2], seq, ARGV[a + 3])
    redis.call('HINCRBY', KEYS[3], ARGV[a + 1], 1)
    if ARGV[a + 5] ~= '' then
      redis.call('HSET', KEYS[6], seq, ARGV[a + 5])
    end
    added = added + 1
    stored[i + 1] = 1
  end
end
if added > 0 then
  redis.call('INCRBY', KEYS[2], added)
end
if marker ~= '' then
  local total = tonumber(ARGV[4])
  if offset + n >= total then
    redis.call('HSET', KEYS[5], 'loaded:' .. marker, ARGV[4])
    redis.call('HDEL', KEYS[5], 'loading:' .. marker)
  else
    redis.call('HSET', KEYS[5], 'loading:' .. marker, offset + n)
  end
end
return stored
"""


# KEYS: count, items, reviews, forgotten, the shopper's events list,
#       categories hash and seen zset, idem.
# ARGV: how many records the caller read, the last of them ('' for none),
#       forgotten_at, tombstone, m, then per record its items field, in order,
#       then m pairs of an idempotency key and the sequence number it names.
# The caller reads the records and makes the fields (they are JSON that Lua's
# cjson would write differently) and takes the records' idempotency keys
# (keys may well name the shopper); the
# script removes them only if the list is still what was read (its length and
# last record, whose sequence number is unique), else returns -1 and the
# caller reads again. A key is dropped only while it still names its record.
# Returns the number of events removed.
_FORGET_SCRIPT = """#!lua
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[5])
if redis.call('LLEN', KEYS[5]) ~= n or (n > 0 and redis.call('LINDEX', KEYS[5], -1) ~= ARGV[2]) then
  return -1
end
local records = redis.call('LRANGE', KEYS[5], 0, -1)
for i = 1, n do
  local field = ARGV[5 + i]
  if redis.call('HINCRBY', KEYS[2], field, -1) <= 0 then
    redis.call('HDEL', KEYS[2], field)
  end
  redis.call('HDEL', KEYS[3], string.match(records[i], '^(%d+) '))
end
for j = 0, m - 1 do
  local key = ARGV[6 + n + 2 * j]
  if redis.call('HGET', KEYS[8], key) == ARGV[7 + n + 2 * j] then
    redis.call('HDEL', KEYS[8], key)
  end
end
if n > 0 then
  redis.call('DECRBY', KEYS[1], n)
end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
local before = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
if tonumber(ARGV[3]) > before then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
end
return n
"""
# Reads of the list and a script run: only when ingestion for this very
# shopper keeps changing the list in between.
FORGET_ATTEMPTS = 10


class DurabilityError(RuntimeError):
    """The Redis server is configured so that it could lose acknowledged events."""


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _safe_url(url: str) -> str:
    # Never log a password.
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def check_server(reader: redis.Redis, url: str, durability: str, setting: str, what: str) -> None:
    """Refuse a Redis that could lose acknowledged writes at `durability`
    (DURABILITY_LEVELS); `setting` names the variable that relaxes the check,
    `what` the data at risk. Shared by every store kept in Redis."""
    info = reader.info("server")
    major = int(str(info["redis_version"]).split(".")[0])
    if major < 7:
        raise DurabilityError(f"Redis {info['redis_version']} at {_safe_url(url)}: 7.0 or later is needed")
    if durability == "unchecked":
        log.warning("Redis persistence is not checked (%s=unchecked): acknowledged %s may be lost", setting, what)
        return
    try:
        config = {}
        for name in ("appendonly", "appendfsync", "no-appendfsync-on-rewrite", "maxmemory-policy"):
            config.update(reader.config_get(name))
    except redis.exceptions.ResponseError as exc:
        raise DurabilityError(
            f"cannot read the persistence settings of {_safe_url(url)} ({exc}); "
            f"set {setting}=unchecked if you know they are durable"
        ) from exc
    allowed_fsync = ("always",) if durability == "always" else ("always", "everysec")
    problems = []
    if config.get("appendonly") != "yes":
        problems.append("appendonly is not yes")
    if config.get("appendfsync") not in allowed_fsync:
        problems.append(f"appendfsync is {config.get('appendfsync')}, not {' or '.join(allowed_fsync)}")
    if config.get("no-appendfsync-on-rewrite") != "no":
        problems.append("no-appendfsync-on-rewrite is not no (fsync pauses during AOF rewrites)")
    # Keys without a TTL are never evicted by volatile-* policies; ours have none.
    policy = config.get("maxmemory-policy", "")
    if not (policy == "noeviction" or policy.startswith("volatile-")):
        problems.append(f"maxmemory-policy is {policy}: Redis may evict stored {what}")
    if problems:
        raise DurabilityError(
            f"Redis at {_safe_url(url)} could lose acknowledged {what} ({setting}={durability}): {'; '.join(problems)}"
        )
# Fields of an event record: item, category, type, ts, rating, amount, order,
# idempotency key. Records written before events carried money have five,
# before forget_user seven (no key: forgetting walks the `idem` hash for them).
RECORD_FIELDS = 8


def _event(user_id: str, payload: str) -> StoredEvent:
    item_id, category, type_, ts, rating, *money = json.loads(payload)
    amount, order_id = (money + [None, None])[:2]
    return StoredEvent(user_id, item_id, category, type_, ts, rating, amount=amount, order_id=order_id)


class RedisEventStore(EventStore):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, durability: str = "always",
                 socket_timeout: float = 30.0, username: str | None = None, password: str | None = None):
        if durability not in DURABILITY_LEVELS:
            raise ValueError(f"durability must be one of {DURABILITY_LEVELS}, got {durability!r}")
        self.url = url
        self.prefix = prefix
        self.durability = durability
        common = dict(decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=5.0,
                      health_check_interval=10)
        # Credentials of the service's ACL user, when not in the URL (from a Secret's file).
        if username:
            common["username"] = username
        if password:
            common["password"] = password
        # Writes are never retried by the client: a write whose reply was lost
        # may have been stored, and storing it again would count events twice.
        # The caller hears UNAVAILABLE and retries with its idempotency keys.
        self._writer = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), **common)
        # Reads are safe to retry, e.g. on a pooled connection that a Redis
        # restart broke.
        self._reader = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), **common)
        self._write = self._writer.register_script(_WRITE_SCRIPT)
        self._forget = self._writer.register_script(_FORGET_SCRIPT)
        self._fixed_keys = [prefix + name for name in ("seq", "count", "items", "idem", "meta", "reviews", "forgotten")]
        self._guard(self._check_server)

    def __repr__(self) -> str:
        return f"RedisEventStore({_safe_url(self.url)!r}, prefix={self.prefix!r})"

    # -- connection and configuration -------------------------------------

    def _guard(self, call, *args):
        try:
            return call(*args)
        except redis.exceptions.TimeoutError as exc:
            raise Unavailable(f"event store (Redis) timed out; a write's outcome is unknown, "
                              f"retry it with its idempotency keys: {exc}") from exc
        except redis.exceptions.ConnectionError as exc:
            raise Unavailable(f"event store (Redis) unreachable: {exc}") from exc
        except redis.exceptions.OutOfMemoryError as exc:
            # Refused before the script ran (it lacks the allow-oom flag): nothing stored.
            raise ResourceExhausted(f"event store (Redis) is out of memory, nothing stored: {exc}") from exc

    def _check_server(self) -> None:
        check_server(self._reader, self.url, self.durability, "PROFILE_REDIS_DURABILITY", "events")

    # -- writing -----------------------------------------------------------

    def _user_keys(self, user_id: str) -> list[str]:
        base = f"{self.prefix}u:{user_id}:"
        return [base + "e", base + "c", base + "s"]

    def _run(self, events: Sequence[StoredEvent], marker: str = "", offset: int = 0, total: int = 0) -> list[int]:
        keys = list(self._fixed_keys)
        args: list = [len(events), marker, offset, total]
        for e in events:
            keys.extend(self._user_keys(e.user_id))
            args.extend((
                e.idempotency_key or "",
                _compact([e.item_id, e.category]),
                e.category,
                e.item_id,
                _compact([e.item_id, e.category, e.type, e.ts, e.rating, e.amount, e.order_id, e.idempotency_key]),
                e.review or "",
                tombstone_of(e.user_id),
                "" if e.ts is None else int(e.ts),
            ))
        return self._guard(self._write, keys, args)

    def append(self, events: Sequence[StoredEvent]) -> list[bool]:
        if not events:
            return []
        return [bool(flag) for flag in self._run(events)]

    def bulk_load(self, events: Iterable[StoredEvent], total: int, marker: str, show_progress: bool = True) -> bool:
        """Loads in chunks, each stored atomically with the count loaded so
        far: a load that a crash interrupted resumes where it stopped, and two
        processes loading the same set at once share the work. The marker is
        set with the last chunk."""
        if self.meta(f"loaded:{marker}") is not None:
            return False
        done = int(self.meta(f"loading:{marker}") or 0)
        if done:
            log.info("resuming the load of %s after %d of %d events", marker, done, total)
        remaining = iter(events)
        position = 0
        with tqdm(total=total, desc="loading events", unit="event", disable=not show_progress) as progress:
            while True:
                if position < done:
                    # Events stored before (by us after a crash, or by another loader).
                    skipped = sum(1 for _ in itertools.islice(remaining, done - position))
                    progress.update(skipped)
                    position += skipped
                chunk = list(itertools.islice(remaining, min(BULK_CHUNK, max(total - position, 0))))
                reply = self._run(chunk, marker=marker, offset=position, total=total)
                if reply[:1] == [-1]:
                    return False  # another process finished the load
                if reply[:1] == [-2]:
                    # Another loader stored events since we looked: nothing of
                    # this chunk was stored; skip what the other one did.
                    done = int(reply[1])
                    if done < position:
                        raise RuntimeError(f"bulk load of {marker}: progress went back from {position} to {done}")
                    remaining = itertools.chain(chunk, remaining)
                    continue
                position += len(chunk)
                progress.update(len(chunk))
                if position >= total:
                    return True
                if not chunk:
                    raise ValueError(f"bulk load of {marker}: {total} events announced, only {position} given")

    def forget_user(self, user_id: str, now: int | None = None) -> int:
        now = int(time.time()) if now is None else int(now)
        events_key, categories_key, seen_key = self._user_keys(user_id)
        keys = [self.prefix + name for name in ("count", "items", "reviews", "forgotten")]
        keys += [events_key, categories_key, seen_key, self.prefix + "idem"]
        for _ in range(FORGET_ATTEMPTS):
            records = self._guard(self._reader.lrange, events_key, 0, -1)
            fields, idempotency, unknown = [], [], set()
            for record in records:
                number, _, payload = record.partition(" ")
                values = json.loads(payload)
                fields.append(_compact(values[:2]))
                if len(values) < RECORD_FIELDS:
                    unknown.add(number)
                elif values[RECORD_FIELDS - 1] is not None:
                    idempotency.append((values[RECORD_FIELDS - 1], number))
            idempotency += self._idempotency_keys(unknown)
            removed = self._guard(self._forget, keys, [
                len(records), records[-1] if records else "", now, tombstone_of(user_id), len(idempotency),
                *fields, *itertools.chain.from_iterable(idempotency),
            ])
            if removed >= 0:
                return int(removed)
        raise Unavailable(f"forgetting a shopper: their events kept changing over {FORGET_ATTEMPTS} tries; retry")

    def _idempotency_keys(self, numbers: set[str]) -> list[tuple[str, str]]:
        """(key, sequence number) of the idempotency keys naming `numbers`,
        records written before they carried their key: a walk over every key
        (HSCAN, in steps that never block Redis for long), so it costs in
        proportion to the keys stored; only for stores written by earlier versions."""
        if not numbers or not self._guard(self._reader.exists, self.prefix + "idem"):
            return []

        def walk():
            return [(key, seq) for key, seq in self._reader.hscan_iter(self.prefix + "idem", count=1000)
                    if seq in numbers]

        return self._guard(walk)

    # -- reading -----------------------------------------------------------

    def forgotten_at(self, user_id: str) -> int | None:
        at = self._guard(self._reader.hget, self.prefix + "forgotten", tombstone_of(user_id))
        return None if at is None else int(at)

    def meta(self, key: str) -> str | None:
        return self._guard(self._reader.hget, self.prefix + "meta", key)

    def user_events(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        if limit is not None and limit <= 0:
            return []
        start = 0 if limit is None else -limit
        records = self._guard(self._reader.lrange, self._user_keys(user_id)[0], start, -1)
        return [_event(user_id, record.partition(" ")[2]) for record in records]

    def user_reviews(self, user_id: str, limit: int) -> list[StoredEvent]:
        # Reviews are rare beside purchases: read the shopper's records, then
        # only the texts that exist.
        records = self._guard(self._reader.lrange, self._user_keys(user_id)[0], 0, -1)
        numbers = [record.partition(" ")[0] for record in records]
        texts = self._guard(self._reader.hmget, self.prefix + "reviews", numbers) if numbers else []
        with_text = [
            replace(_event(user_id, record.partition(" ")[2]), review=text)
            for record, text in zip(records, texts)
            if text
        ]
        return with_text[-limit:] if limit > 0 else []

    def user_summary(self, user_id: str) -> tuple[int, dict[str, int], list[str]]:
        _, categories_key, seen_key = self._user_keys(user_id)

        def read():
            with self._reader.pipeline(transaction=True) as pipe:  # one consistent snapshot
                pipe.hgetall(categories_key)
                pipe.zrevrange(seen_key, 0, -1)
                return pipe.execute()

        categories, seen = self._guard(read)
        per_category = {category: int(n) for category, n in categories.items()}
        return sum(per_category.values()), per_category, seen

    def item_counts(self) -> list[tuple[str, str, int]]:
        counts = self._guard(self._reader.hgetall, self.prefix + "items")
        return [(*json.loads(field), int(n)) for field, n in counts.items()]

    def user_items(self) -> Iterator[tuple[str, str, str]]:
        category_of = {item_id: category for item_id, category, _ in self.item_counts()}
        first, last = len(self.prefix) + 2, -2  # "<prefix>u:<user_id>:s"
        keys = self._reader.scan_iter(match=self.prefix + "u:*:s", count=1000)
        while batch := list(itertools.islice(keys, 500)):
            with self._reader.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.zrange(key, 0, -1)
                baskets = self._guard(pipe.execute)
            for key, items in zip(batch, baskets):
                for item_id in items:
                    yield key[first:last], item_id, category_of.get(item_id, "")

    def count(self) -> int:
        return int(self._guard(self._reader.get, self.prefix + "count") or 0)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

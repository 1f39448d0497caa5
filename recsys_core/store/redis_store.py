"""Durable event storage in Redis, shared by any number of profile replicas,
on one Redis server or a Redis Cluster.

Everything a replica answers from lives in Redis: the shoppers' events, and
the counts built from them (item popularity, overall and per category, and
the co-purchase counts), so replicas need no state of their own and answer
alike. Every script touches the keys of one hash slot only, so the same code
runs on one server (PROFILE_REDIS_MODE=single) and on a Redis Cluster
(cluster).

Keys, all under `prefix` (default "recsys:profile:"); `{...}` is the hash tag
that decides the slot; `<t>` is a shopper's tombstone (events.tombstone_of:
the SHA-256 of their id), so that what stays of a forgotten shopper (`:m`,
the `done` marks, `{pend}`) does not name them in the clear:

    {u:<t>}:e        list    the shopper's events, oldest first: "<seq> <JSON>"
    {u:<t>}:c        hash    category -> the shopper's events in it
    {u:<t>}:s        zset    item_id -> the seq of its latest event (seen items)
    {u:<t>}:r        hash    seq -> review text (events with one)
    {u:<t>}:i        hash    idempotency key -> seq of its event
    {u:<t>}:m        hash    user (their id, while they have events), seq
                             (events numbered per shopper), op (count updates
                             numbered per shopper), bulk:<marker> (the last
                             position of a bulk load stored), forgotten (the
                             tombstone: unix seconds of the last forget_user)
    {u:<t>}:p        list    pending count updates: JSON [op, [[item, category,
                             events]...], [items new to the shopper], [items
                             they had before], +1 (or -1: forget_user)]
    {pop}:all        zset    item_id -> -events (negated: ties come in item id order)
    {pop}:c:<cat>    zset    the same, per category
    {pop}:cat        hash    item_id -> category
    {pop}:cats       set     categories with events
    {pop}:n          string  events stored
    {pop}:done       hash    <t> -> the last op of the shopper's counted here
    {i:<item>}:cp    hash    other item -> shoppers who have both
    {i:<item>}:done  hash    <t> -> the last op of the shopper's counted here
    {pend}           zset    <t> -> when they last wrote (ms): shoppers that
                             may have pending count updates
    meta             hash    bulk-load markers (loaded:<m>) and progress (loading:<m>)
    {u:<t>}:x        list    the shopper's A/B exposures (record_exposures), JSON
                             [exposure_id, user, experiment, arm, model_version, ts, [items]]
    {u:<t>}:xi       set     their exposure ids (a re-sent exposure is stored once)

Writing a batch (append), in three steps per shopper:

1. One script in the shopper's slot stores their events of the batch,
   skipping those whose idempotency key the shopper stored before. If any
   event was new it numbers a count update (`op`, per shopper, increasing)
   holding the popularity increments and the new co-purchase pairs (each item
   new to the shopper paired with every item they had), and appends it to the
   shopper's pending list. The script returns the whole pending list.
2. The pending updates are applied to the counters, one script per counter
   slot ({pop}, and {i:<item>} for every item of a pair). Each counter slot
   remembers per shopper the last op it counted (`done`) and skips ops at or
   below it: applying an update twice counts it once.
3. A script in the shopper's slot drops the applied ops from the pending list.

So the events of an acknowledged batch are durable after step 1, and their
counts are in Redis before append() returns. A crash between the steps loses
nothing and counts nothing twice: the update stays pending, and whoever
applies it next (the shopper's next write, on any replica, or the sweep,
settle_pending(), that every store runs in the background over the shoppers
in `{pend}` that have not written for PENDING_GRACE_SECONDS) applies it; the
`done` marks skip the counters that were reached before the crash. Two
replicas may apply the same pending ops at once; `done` is safe then too,
because each applies a shopper's ops in op order, and an op leaves the
pending list only once every counter has it (so whoever applies op n+1 to a
counter either applies op n before it or finds it there). `{pend}` entries
are removed only when their shopper's pending list is empty and they were
not touched since they were read.

On one server, step 1 for all the shoppers of a batch runs in one
MULTI/EXEC: the batch is stored whole or not at all, also when Redis dies
while writing it (an unfinished MULTI/EXEC block at the end of the AOF is
dropped on restart). On a cluster no transaction spans slots: a batch over
several shoppers is stored whole per shopper, and a crash between two
shoppers' scripts leaves some stored and the caller with an error; its
re-send with the same idempotency keys stores the rest and nothing twice
(send keys, or one shopper per batch, where that matters).

Idempotency keys are per shopper (a retry always carries the same shopper):
the same key from two shoppers stores both events. Two replicas that get the
same event at once store it once: step 1 is atomic in the shopper's slot.

Reads are made against Redis each time (popularity: one sorted-set range;
co-purchases: the counts of the shopper's latest items), so every replica
sees a count as soon as the writing append() has returned: no local cache,
no staleness.

forget_user() removes a shopper's events (with reviews and idempotency keys)
and, as one more pending update with negated counts computed from the events
it deletes, their share of the popularity and co-purchase counts; the
per-shopper op counter (`:m`) and the `done` marks stay so that a late replay
of an old update is still skipped. It also records the tombstone (`forgotten`
in `:m`), which step 1 checks in the same script as it stores: an event of
the shopper dated before it (or undated) is never stored again, by append()
or bulk_load(); one at or after it is a returning shopper's.

Durability: every script's effects reach the append-only file as one
MULTI/EXEC block, fsynced before the reply with `appendfsync always` (checked
on every primary when the store opens, `durability`). Redis replicates
asynchronously: a failover can lose acknowledged batches unless WAIT is added.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from tqdm import tqdm

from recsys_core.errors import ResourceExhausted, Unavailable
from recsys_core.store.events import EventStore, StoredEvent, StoredExposure, tombstone_of
# Checked by the services' configurations without importing redis-py.
from recsys_core.store.redis_options import DURABILITY_LEVELS, MODES  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "recsys:profile:"
# Events per chunk while bulk loading.
BULK_CHUNK = 1000
# A shopper's pending updates are left to the writer that made them for this
# long; after it the background sweep applies them (the writer died).
PENDING_GRACE_SECONDS = 30.0
SWEEP_EVERY_SECONDS = 10.0
# On a cluster, the scripts of one batch (one per shopper, per counter slot)
# go out from this many threads at once.
CLUSTER_WRITE_THREADS = 8
# The layout version this module writes; older stores are refused (below).
# 2 named the shoppers' keys by their id, 3 by its SHA-256.
LAYOUT = "3"

# Step 1: store one shopper's events.
# KEYS: e, c, s, r, i, m, p of the shopper.
# ARGV: n, bulk marker ('' for append), the user id, then per event: bulk
#       position ('' for append), idempotency key ('' for none), category,
#       item_id, record JSON, review ('' for none), timestamp ('' for none).
# Returns {stored flags, pending records}. An event is not stored (flag 0)
# when its key was stored before, or when the shopper was forgotten (the
# `forgotten` field of :m) and it is dated before that or undated
# (events.superseded): the tombstone is checked in the same script, in the
# shopper's own slot, so no write slips in beside a forget_user.
# Nothing in the loop can fail once it started (the keys are ours and of the
# right types, and without the allow-oom flag Redis refuses to start the script
# when out of memory), so the script never stops half way.
_STORE_SCRIPT = """#!lua
local n = tonumber(ARGV[1])
local marker = ARGV[2]
local loaded = -1
if marker ~= '' then
  loaded = tonumber(redis.call('HGET', KEYS[6], 'bulk:' .. marker) or '-1')
end
local last = loaded
local forgotten = tonumber(redis.call('HGET', KEYS[6], 'forgotten') or '-1')
local stored = {}
local counts = {}
local order = {}
local prior = nil
local new_items = {}
local added = 0
for i = 0, n - 1 do
  local a = 4 + i * 7
  local key = ARGV[a + 1]
  local category = ARGV[a + 2]
  local item = ARGV[a + 3]
  local duplicate = false
  if marker ~= '' then
    local position = tonumber(ARGV[a])
    if position <= loaded then
      duplicate = true
    elseif position > last then
      last = position
    end
  elseif key ~= '' and redis.call('HEXISTS', KEYS[5], key) == 1 then
    duplicate = true
  end
  if not duplicate and forgotten >= 0 and (ARGV[a + 6] == '' or tonumber(ARGV[a + 6]) < forgotten) then
    duplicate = true  -- a forgotten shopper's event from before the forgetting
  end
  if duplicate then
    stored[i + 1] = 0
  else
    local seq = redis.call('HINCRBY', KEYS[6], 'seq', 1)
    if key ~= '' then
      redis.call('HSET', KEYS[5], key, seq)
    end
    redis.call('RPUSH', KEYS[1], seq .. ' ' .. ARGV[a + 4])
    redis.call('HINCRBY', KEYS[2], category, 1)
    if not redis.call('ZSCORE', KEYS[3], item) then
      if not prior then
        prior = redis.call('ZRANGE', KEYS[3], 0, -1)
      end
      new_items[#new_items + 1] = item
    end
    redis.call('ZADD', KEYS[3], seq, item)
    if ARGV[a + 5] ~= '' then
      redis.call('HSET', KEYS[4], seq, ARGV[a + 5])
    end
    local field = item .. '\\n' .. category
    if not counts[field] then
      counts[field] = 0
      order[#order + 1] = {item, category, field}
    end
    counts[field] = counts[field] + 1
    added = added + 1
    stored[i + 1] = 1
  end
end
if added > 0 then
  redis.call('HSET', KEYS[6], 'user', ARGV[3])
  local op = redis.call('HINCRBY', KEYS[6], 'op', 1)
  local popularity = {}
  for _, entry in ipairs(order) do
    popularity[#popularity + 1] = {entry[1], entry[2], counts[entry[3]]}
  end
  redis.call('RPUSH', KEYS[7], cjson.encode({op, popularity, new_items, prior or {}, 1}))
end
if marker ~= '' and last > loaded then
  redis.call('HSET', KEYS[6], 'bulk:' .. marker, last)
end
return {stored, redis.call('LRANGE', KEYS[7], 0, -1)}
"""

# Store one shopper's A/B exposures. KEYS: x, xi, m of the shopper.
# ARGV: per exposure: id, ts, record JSON. Returns the stored flags: 0 for an
# id stored before, or one dated before the shopper was forgotten.
_EXPOSE_SCRIPT = """#!lua
local forgotten = tonumber(redis.call('HGET', KEYS[3], 'forgotten') or '-1')
local stored = {}
for i = 1, #ARGV, 3 do
  if forgotten >= 0 and tonumber(ARGV[i + 1]) < forgotten then
    stored[#stored + 1] = 0
  elseif redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i + 2])
    stored[#stored + 1] = 1
  else
    stored[#stored + 1] = 0
  end
end
return stored
"""

# Forget one shopper: delete their events, queue negated counts, and keep the
# tombstone (the `forgotten` field of :m: the later of the one there and ARGV[1]).
# KEYS: e, c, s, r, i, m, p of the shopper. ARGV: the time forgotten.
# Returns {events removed, pending records}.
_FORGET_SCRIPT = """#!lua
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[6], 'forgotten') or '-1') then
  redis.call('HSET', KEYS[6], 'forgotten', ARGV[1])
end
redis.call('HDEL', KEYS[6], 'user')
local records = redis.call('LRANGE', KEYS[1], 0, -1)
if #records > 0 then
  local counts = {}
  local order = {}
  for _, record in ipairs(records) do
    local event = cjson.decode(string.sub(record, string.find(record, ' ', 1, true) + 1))
    local field = event[1] .. '\\n' .. event[2]
    if not counts[field] then
      counts[field] = 0
      order[#order + 1] = {event[1], event[2], field}
    end
    counts[field] = counts[field] - 1
  end
  local popularity = {}
  for _, entry in ipairs(order) do
    popularity[#popularity + 1] = {entry[1], entry[2], counts[entry[3]]}
  end
  -- Every pair among the seen items: all of them "new", none before, taken back.
  local seen = redis.call('ZRANGE', KEYS[3], 0, -1)
  local op = redis.call('HINCRBY', KEYS[6], 'op', 1)
  redis.call('RPUSH', KEYS[7], cjson.encode({op, popularity, seen, {}, -1}))
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('HDEL', KEYS[6], 'seq')
end
return {#records, redis.call('LRANGE', KEYS[7], 0, -1)}
"""

# Step 2, popularity. KEYS: all, cat, done, n, cats, then category zsets.
# ARGV: ops, then per op: user, op, m, then m times (item, category, key index, events).
_POPULARITY_SCRIPT = """#!lua
local a = 2
for _ = 1, tonumber(ARGV[1]) do
  local user, op, m = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local fresh = op > tonumber(redis.call('HGET', KEYS[3], user) or '0')
  for _ = 1, m do
    if fresh then
      local item, category, zset, events = ARGV[a], ARGV[a + 1], KEYS[tonumber(ARGV[a + 2])], tonumber(ARGV[a + 3])
      for _, key in ipairs({KEYS[1], zset}) do
        if tonumber(redis.call('ZINCRBY', key, -events, item)) >= 0 then
          redis.call('ZREM', key, item)
        end
      end
      if events > 0 then
        redis.call('HSET', KEYS[2], item, category)
        redis.call('SADD', KEYS[5], category)
      elseif redis.call('ZCARD', zset) == 0 then
        redis.call('SREM', KEYS[5], category)  -- its last events were forgotten
      end
      redis.call('INCRBY', KEYS[4], events)
    end
    a = a + 4
  end
  if fresh then
    redis.call('HSET', KEYS[3], user, op)
  end
end
return 1
"""

# Step 2, co-purchases of one item. KEYS: cp, done.
# ARGV: the item, ops, then per op: user, op, change (+1, or -1 when
# forgetting), the other items joined by newlines (the item itself among
# them is skipped). Ids hold no control characters (they are refused at
# ingestion), and one string per op keeps a basket of thousands cheap to send.
_PAIRS_SCRIPT = """#!lua
local item = ARGV[1]
local a = 3
for _ = 1, tonumber(ARGV[2]) do
  local user, op, change = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  if op > tonumber(redis.call('HGET', KEYS[2], user) or '0') then
    for other in string.gmatch(ARGV[a + 3], '[^\\n]+') do
      if other ~= item and redis.call('HINCRBY', KEYS[1], other, change) <= 0 then
        redis.call('HDEL', KEYS[1], other)
      end
    end
    redis.call('HSET', KEYS[2], user, op)
  end
  a = a + 4
end
return 1
"""

# Step 3. KEYS: p. ARGV: the last op applied. Returns how many stay pending.
_DONE_SCRIPT = """#!lua
local last = tonumber(ARGV[1])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head or cjson.decode(head)[1] > last then
    break
  end
  redis.call('LPOP', KEYS[1])
end
return redis.call('LLEN', KEYS[1])
"""

# The sweep's removal from {pend}: only those nobody wrote for since they were
# read. KEYS: {pend}. ARGV: user, score read, user, score read...
_UNPEND_SCRIPT = """#!lua
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

# Bulk-load progress only moves forward. KEYS: meta. ARGV: marker, position, total.
_PROGRESS_SCRIPT = """#!lua
if redis.call('HEXISTS', KEYS[1], 'loaded:' .. ARGV[1]) == 1 then
  return -1
end
local position, total = tonumber(ARGV[2]), tonumber(ARGV[3])
if position >= total then
  redis.call('HSET', KEYS[1], 'loaded:' .. ARGV[1], ARGV[3])
  redis.call('HDEL', KEYS[1], 'loading:' .. ARGV[1])
elseif position > tonumber(redis.call('HGET', KEYS[1], 'loading:' .. ARGV[1]) or '0') then
  redis.call('HSET', KEYS[1], 'loading:' .. ARGV[1], position)
end
return position
"""


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


def _event(user_id: str, payload: str) -> StoredEvent:
    # Records written before events carried money have five fields.
    item_id, category, type_, ts, rating, *money = json.loads(payload)
    amount, order_id = (money + [None, None])[:2]
    return StoredEvent(user_id, item_id, category, type_, ts, rating, amount=amount, order_id=order_id)


def _lua_list(value) -> list:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def _per_node(reply) -> list[dict]:
    """A RedisCluster reply to all primaries is {node: reply}; one server's is the reply."""
    if reply and all(isinstance(v, dict) for v in reply.values()) and all(":" in str(k) for k in reply):
        return list(reply.values())
    return [reply]


def check_settings(durability: str, mode: str, prefix: str) -> None:
    """What both Redis stores refuse before connecting."""
    if durability not in DURABILITY_LEVELS:
        raise ValueError(f"durability must be one of {DURABILITY_LEVELS}, got {durability!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"the key prefix {prefix!r} must not contain braces: they choose Redis Cluster slots")


def open_client(url: str, mode: str, cluster_nodes: Sequence[str], username: str | None, password: str | None,
                **options):
    """A client of `url`: with `mode` "cluster" a Redis Cluster found from
    `url`'s node and `cluster_nodes` ("host:port"), with `url`'s
    credentials; `username` and `password` are the service's ACL user when
    not in the URL (from a Secret's file)."""
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if mode == "cluster":
        seeds = [ClusterNode(*node.rsplit(":", 1)) for node in cluster_nodes]
        return RedisCluster.from_url(url, startup_nodes=seeds or None, **options)
    return redis.Redis.from_url(url, health_check_interval=10, **options)


def check_server(reader, url: str, durability: str, setting: str, what: str, **node_args) -> None:
    """Refuse a Redis that could lose acknowledged writes at `durability`
    (DURABILITY_LEVELS), checked on every node `node_args` names (a cluster's
    primaries; one server without). `setting` names the variable that relaxes
    the check, `what` the data at risk. Shared by every store kept in Redis."""
    for info in _per_node(reader.info("server", **node_args)):
        major = int(str(info["redis_version"]).split(".")[0])
        if major < 7:
            raise DurabilityError(f"Redis {info['redis_version']} at {_safe_url(url)}: 7.0 or later is needed")
    if durability == "unchecked":
        log.warning("Redis persistence is not checked (%s=unchecked): acknowledged %s may be lost", setting, what)
        return
    try:
        configs: list[dict] = []
        for name in ("appendonly", "appendfsync", "no-appendfsync-on-rewrite", "maxmemory-policy"):
            per_node = _per_node(reader.config_get(name, **node_args))
            configs = configs or [{} for _ in per_node]
            for config, reply in zip(configs, per_node):
                config.update(reply)
    except redis.exceptions.ResponseError as exc:
        raise DurabilityError(
            f"cannot read the persistence settings of {_safe_url(url)} ({exc}); "
            f"set {setting}=unchecked if you know they are durable"
        ) from exc
    allowed_fsync = ("always",) if durability == "always" else ("always", "everysec")
    problems = []
    for config in configs:
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
            f"Redis at {_safe_url(url)} could lose acknowledged {what} ({setting}={durability}): "
            f"{'; '.join(dict.fromkeys(problems))}"
        )


class RedisEventStore(EventStore):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, durability: str = "always",
                 socket_timeout: float = 30.0, username: str | None = None, password: str | None = None,
                 mode: str = "single", cluster_nodes: Sequence[str] = (), sweep: bool = False):
        """`mode` "cluster": a Redis Cluster, found from `url`'s node and
        `cluster_nodes` ("host:port"), with `url`'s credentials. `sweep`:
        apply other writers' abandoned count updates in a background thread
        (the profile service does; tests call settle_pending())."""
        check_settings(durability, mode, prefix)
        self.url = url
        self.prefix = prefix
        self.durability = durability
        self.mode = mode
        common = dict(decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=5.0)
        # Writes are never retried by the client: a write whose reply was lost
        # may have been stored, and storing it again would count events twice.
        # The caller hears UNAVAILABLE and retries with its idempotency keys.
        # (The counter scripts would be safe to retry, the event script is not.)
        # Reads are safe to retry, e.g. on a pooled connection that a Redis
        # restart broke.
        self._writer = open_client(url, mode, cluster_nodes, username, password,
                                   retry=Retry(ExponentialBackoff(), 0), **common)
        self._reader = open_client(url, mode, cluster_nodes, username, password,
                                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), **common)
        self._store = self._writer.register_script(_STORE_SCRIPT)
        self._forget = self._writer.register_script(_FORGET_SCRIPT)
        self._expose = self._writer.register_script(_EXPOSE_SCRIPT)
        self._popularity = self._writer.register_script(_POPULARITY_SCRIPT)
        self._pairs = self._writer.register_script(_PAIRS_SCRIPT)
        self._done = self._writer.register_script(_DONE_SCRIPT)
        self._unpend = self._writer.register_script(_UNPEND_SCRIPT)
        self._progress = self._writer.register_script(_PROGRESS_SCRIPT)
        self._pop = {name: f"{prefix}{{pop}}:{name}" for name in ("all", "cat", "done", "n", "cats")}
        self._pending_index = prefix + "{pend}"
        self._meta = prefix + "meta"
        self._guard(self._check_server)
        self._guard(self._check_layout)
        self._cluster_pool = ThreadPoolExecutor(max_workers=CLUSTER_WRITE_THREADS, thread_name_prefix="redis-store")
        self._stop = threading.Event()
        self._sweeper = None
        if sweep:
            self._sweeper = threading.Thread(target=self._sweep, name="redis-store-sweep", daemon=True)
            self._sweeper.start()

    def __repr__(self) -> str:
        return f"RedisEventStore({_safe_url(self.url)!r}, prefix={self.prefix!r}, mode={self.mode!r})"

    # -- connection and configuration -------------------------------------

    def _guard(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except redis.exceptions.TimeoutError as exc:
            raise Unavailable(f"event store (Redis) timed out; a write's outcome is unknown, "
                              f"retry it with its idempotency keys: {exc}") from exc
        except redis.exceptions.ConnectionError as exc:
            raise Unavailable(f"event store (Redis) unreachable: {exc}") from exc
        except redis.exceptions.OutOfMemoryError as exc:
            # Refused before the script ran (it lacks the allow-oom flag): nothing stored.
            raise ResourceExhausted(f"event store (Redis) is out of memory, nothing stored: {exc}") from exc
        except (redis.exceptions.ClusterDownError, redis.exceptions.RedisClusterException) as exc:
            raise Unavailable(f"event store (Redis Cluster) unavailable: {exc}") from exc

    def _primaries(self) -> dict:
        return {"target_nodes": RedisCluster.PRIMARIES} if self.mode == "cluster" else {}

    def _check_server(self) -> None:
        check_server(self._reader, self.url, self.durability, "PROFILE_REDIS_DURABILITY", "events",
                     **self._primaries())

    def _check_layout(self) -> None:
        """Stores written before the cluster-safe layout kept a global `seq`
        key and per-shopper keys without hash tags: refused rather than
        silently answered as empty."""
        layout = self._reader.hget(self._meta, "layout")
        if layout is None and self._reader.exists(self.prefix + "seq"):
            raise RuntimeError(
                f"the Redis store under {self.prefix!r} was written in the layout before hash tags "
                "(a global seq key); load it into a new prefix (PROFILE_REDIS_PREFIX) from its events"
            )
        if layout is not None and layout != LAYOUT:
            raise RuntimeError(
                f"the Redis store under {self.prefix!r} is in layout {layout}, this version reads {LAYOUT} "
                "(shoppers' keys named by the SHA-256 of their id); load it into a new prefix "
                "(PROFILE_REDIS_PREFIX) from its events"
            )
        if layout is None:
            self._writer.hsetnx(self._meta, "layout", LAYOUT)

    # -- keys --------------------------------------------------------------

    def _user_keys(self, user_id: str) -> list[str]:
        return self._shopper_keys(tombstone_of(user_id))

    def _shopper_keys(self, tag: str) -> list[str]:
        # Named by the SHA-256 of the id (the tombstone), not the id: what
        # stays of a forgotten shopper (their op counter and tombstone in :m,
        # the `done` marks, {pend}) does not list them by name.
        base = f"{self.prefix}{{u:{tag}}}:"
        return [base + name for name in "ecsrimp"]

    def _item_keys(self, item_id: str) -> tuple[str, str]:
        base = f"{self.prefix}{{i:{item_id}}}:"
        return base + "cp", base + "done"

    def _category_key(self, category: str) -> str:
        return f"{self.prefix}{{pop}}:c:{category}"

    # -- writing -----------------------------------------------------------

    def _run_scripts(self, calls: list[tuple], atomic: bool = False) -> list:
        """(script, keys, args) calls, each in one slot: pipelined on one
        server (`atomic`: in one MULTI/EXEC, which Redis runs and writes to
        its AOF as one block); each its own call on a cluster (redis-py
        does not pipeline scripts across a cluster's nodes, and no
        transaction spans slots)."""
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [self._guard(script, keys, args)]
        if self.mode == "cluster":
            # Every call of one batch is on keys of its own, so their order
            # does not matter: sent at once, from a few threads.
            return list(self._cluster_pool.map(lambda call: self._guard(*call), calls))
        # The pipeline loads missing scripts before MULTI, so no EVALSHA in
        # the transaction fails on NOSCRIPT alone.
        with self._writer.pipeline(transaction=atomic) as pipe:
            for script, keys, args in calls:
                script(keys, args, client=pipe)
            return self._guard(pipe.execute)

    def _mark_pending(self, user_ids: Collection[str]) -> int:
        now = int(time.time() * 1000)
        self._guard(self._writer.zadd, self._pending_index, {tombstone_of(user): now for user in user_ids})
        return now

    def _store_users(self, batches: dict[str, list[tuple[int, StoredEvent]]], marker: str = "") -> dict:
        """Step 1 for each shopper: {user: (stored flags, pending records)}."""
        calls = []
        for user_id, events in batches.items():
            args: list = [len(events), marker, user_id]
            for position, e in events:
                args.extend((
                    position if marker else "",
                    e.idempotency_key or "",
                    e.category,
                    e.item_id,
                    _compact([e.item_id, e.category, e.type, e.ts, e.rating, e.amount, e.order_id]),
                    e.review or "",
                    "" if e.ts is None else int(e.ts),
                ))
            calls.append((self._store, self._user_keys(user_id), args))
        # On one server a batch over several shoppers is stored whole or not
        # at all; on a cluster, whole per shopper (module docstring).
        replies = self._run_scripts(calls, atomic=True)
        return {user_id: (_lua_list(flags), [json.loads(r) for r in _lua_list(pending)])
                for user_id, (flags, pending) in zip(batches, replies)}

    @staticmethod
    def _pending_of(replies: dict) -> dict[str, list]:
        """_store_users' replies as _apply takes them: by shopper tag."""
        return {tombstone_of(user_id): pending for user_id, (_, pending) in replies.items()}

    def _apply(self, pending: dict[str, list]) -> dict[str, int]:
        """Steps 2 and 3: the shoppers' pending updates (by tag, tombstone_of)
        into the counters, then out of their pending lists. Returns per tag
        how many updates stay pending (written meanwhile)."""
        pending = {user: records for user, records in pending.items() if records}
        if not pending:
            return {}
        categories: dict[str, int] = {}
        popularity_args: list = [0]
        item_ops: dict[str, list] = defaultdict(list)  # item -> (user, op, change, others) per op
        for user_id, records in pending.items():
            for op, counts, new_items, prior, change in sorted(records, key=lambda record: record[0]):
                counts, new_items, prior = _lua_list(counts), _lua_list(new_items), _lua_list(prior)
                popularity_args[0] += 1
                popularity_args.extend((user_id, op, len(counts)))
                for item_id, category, events in counts:
                    index = categories.setdefault(category, 6 + len(categories))
                    popularity_args.extend((item_id, category, index, events))
                # Each new item pairs with every item had before and every
                # other new one; each item had before with every new one.
                if new_items:
                    everything = "\n".join(prior + new_items)
                    for item_id in new_items:
                        item_ops[item_id].append((user_id, op, change, everything))
                    joined_new = "\n".join(new_items)
                    for item_id in prior:
                        item_ops[item_id].append((user_id, op, change, joined_new))
        calls = [(self._popularity,
                  [self._pop[name] for name in ("all", "cat", "done", "n", "cats")]
                  + [self._category_key(c) for c in categories], popularity_args)]
        for item_id, ops in item_ops.items():
            args: list = [item_id, len(ops)]
            for op_args in ops:
                args.extend(op_args)
            calls.append((self._pairs, list(self._item_keys(item_id)), args))
        self._run_scripts(calls)
        left = self._run_scripts([(self._done, [self._shopper_keys(user_id)[6]], [max(r[0] for r in records)])
                                  for user_id, records in pending.items()])
        return dict(zip(pending, left))

    def append(self, events: Sequence[StoredEvent]) -> list[bool]:
        if not events:
            return []
        batches: dict[str, list[tuple[int, StoredEvent]]] = defaultdict(list)
        for position, event in enumerate(events):
            batches[event.user_id].append((position, event))
        self._mark_pending(batches)
        replies = self._store_users(batches)
        stored = [False] * len(events)
        for user_id, (flags, _) in replies.items():
            for (position, _), flag in zip(batches[user_id], flags):
                stored[position] = bool(flag)
        self._apply(self._pending_of(replies))
        return stored

    def forget_user(self, user_id: str, now: int | None = None) -> int:
        """Removes the shopper's events, reviews and idempotency keys, and
        their share of popularity and co-purchase counts, and keeps the
        tombstone with `now` (default the wall clock; a later one stays).
        Returns how many events were removed (0 when there were none:
        forgetting twice is harmless). Atomic in the shopper's slot; the
        counts follow through the pending path, so a crash half way is
        finished by the next write or the sweep."""
        now = int(time.time()) if now is None else int(now)
        tag = tombstone_of(user_id)
        marked = self._mark_pending([user_id])
        removed, pending = self._guard(self._forget, self._shopper_keys(tag), [now])
        # Their exposures too; after the tombstone is written, so no exposure
        # from before it is stored again (the expose script checks it).
        self._guard(self._writer.delete, *self._exposure_keys(tag))
        left = self._apply({tag: [json.loads(r) for r in _lua_list(pending)]})
        if not left.get(tag):
            # Nothing pending: out of {pend} now rather than at the next
            # sweep (unless someone wrote for them since).
            self._guard(self._unpend, [self._pending_index], [tag, repr(marked)])
        return int(removed)

    def _exposure_keys(self, tag: str) -> list[str]:
        base = f"{self.prefix}{{u:{tag}}}:"
        return [base + "x", base + "xi"]

    def record_exposures(self, exposures) -> list[bool]:
        by_user: dict[str, list[int]] = defaultdict(list)
        for position, exposure in enumerate(exposures):
            by_user[exposure.user_id].append(position)
        calls = []
        for user_id, positions in by_user.items():
            tag = tombstone_of(user_id)
            args = []
            for position in positions:
                e = exposures[position]
                args += [e.exposure_id, e.ts, _compact([e.exposure_id, e.user_id, e.experiment, e.arm,
                                                        e.model_version, e.ts, list(e.item_ids)])]
            calls.append((self._expose, [*self._exposure_keys(tag), self._shopper_keys(tag)[5]], args))
        flags = [False] * len(exposures)
        for positions, reply in zip(by_user.values(), self._run_scripts(calls, atomic=True)):
            for position, flag in zip(positions, _lua_list(reply)):
                flags[position] = bool(flag)
        return flags

    def exposures(self, since: int | None = None) -> Iterator[StoredExposure]:
        keys = self._reader.scan_iter(match=self.prefix + "{u:*}:x", count=1000)
        while batch := list(itertools.islice(keys, 500)):
            with self._reader.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.lrange(key, 0, -1)
                replies = self._guard(pipe.execute)
            for records in replies:
                for record in records:
                    exposure_id, user_id, experiment, arm, model_version, ts, item_ids = json.loads(record)
                    if since is None or ts >= since:
                        yield StoredExposure(exposure_id, user_id, experiment, arm, model_version, ts,
                                             tuple(item_ids))

    def forgotten_at(self, user_id: str) -> int | None:
        at = self._guard(self._reader.hget, self._user_keys(user_id)[5], "forgotten")
        return None if at is None else int(at)

    def settle_pending(self, grace_seconds: float = PENDING_GRACE_SECONDS, limit: int = 1000) -> int:
        """Applies the pending count updates of shoppers who have not written
        for `grace_seconds` (their writer died between the steps) and forgets
        those with none left. Returns how many shoppers were looked at."""
        cutoff = int((time.time() - grace_seconds) * 1000)
        idle = self._guard(self._reader.zrangebyscore, self._pending_index, "-inf", cutoff, start=0, num=limit,
                           withscores=True)
        if not idle:
            return 0

        def read():
            with self._reader.pipeline(transaction=False) as pipe:
                for tag, _ in idle:
                    pipe.lrange(self._shopper_keys(tag)[6], 0, -1)
                return pipe.execute()

        self._apply({tag: [json.loads(r) for r in records]
                     for (tag, _), records in zip(idle, self._guard(read))})
        # Removed only if nobody wrote since they were read: a writer marks
        # itself before it stores.
        self._guard(self._unpend, [self._pending_index],
                    [value for tag, touched in idle for value in (tag, repr(int(touched)))])
        return len(idle)

    def _sweep(self) -> None:
        while not self._stop.wait(SWEEP_EVERY_SECONDS):
            try:
                while self.settle_pending(limit=1000) == 1000 and not self._stop.is_set():
                    pass
            except Unavailable as error:  # the next round tries again
                log.warning("pending count updates not applied this round: %s", error)
            except Exception:
                log.exception("applying pending count updates failed")

    def bulk_load(self, events: Iterable[StoredEvent], total: int, marker: str, show_progress: bool = True) -> bool:
        """Loads in chunks. Each shopper's part of a chunk is stored with the
        position of its last event (`bulk:<marker>` in the shopper's `:m`),
        which skips what was stored before; the load's progress moves on once
        the whole chunk is in. A load that a crash interrupted resumes after
        the last whole chunk, and two processes loading the same set at once
        store each event once. The marker is set with the last chunk."""
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
                batches: dict[str, list[tuple[int, StoredEvent]]] = defaultdict(list)
                for offset, event in enumerate(chunk):
                    batches[event.user_id].append((position + offset, event))
                if batches:
                    self._mark_pending(batches)
                    replies = self._store_users(batches, marker=marker)
                    self._apply(self._pending_of(replies))
                position += len(chunk)
                progress.update(len(chunk))
                reached = self._guard(self._progress, [self._meta], [marker, position, total])
                if reached == -1:
                    return False  # another process finished the load
                if position >= total:
                    return True
                if not chunk:
                    raise ValueError(f"bulk load of {marker}: {total} events announced, only {position} given")
                done = int(self.meta(f"loading:{marker}") or 0)

    # -- reading -----------------------------------------------------------

    def meta(self, key: str) -> str | None:
        return self._guard(self._reader.hget, self._meta, key)

    def user_events(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        if limit is not None and limit <= 0:
            return []
        start = 0 if limit is None else -limit
        records = self._guard(self._reader.lrange, self._user_keys(user_id)[0], start, -1)
        return [_event(user_id, record.partition(" ")[2]) for record in records]

    def user_reviews(self, user_id: str, limit: int) -> list[StoredEvent]:
        # Reviews are rare beside purchases: read the shopper's records, then
        # only the texts that exist.
        events_key, *_, reviews_key = self._user_keys(user_id)[:4]
        records = self._guard(self._reader.lrange, events_key, 0, -1)
        numbers = [record.partition(" ")[0] for record in records]
        texts = self._guard(self._reader.hmget, reviews_key, numbers) if numbers else []
        with_text = [
            replace(_event(user_id, record.partition(" ")[2]), review=text)
            for record, text in zip(records, texts)
            if text
        ]
        return with_text[-limit:] if limit > 0 else []

    def user_summary(self, user_id: str) -> tuple[int, dict[str, int], list[str]]:
        _, categories_key, seen_key, *_ = self._user_keys(user_id)

        def read():
            with self._reader.pipeline(transaction=True) as pipe:  # one consistent snapshot (one slot)
                pipe.hgetall(categories_key)
                pipe.zrevrange(seen_key, 0, -1)
                return pipe.execute()

        categories, seen = self._guard(read)
        per_category = {category: int(n) for category, n in categories.items()}
        return sum(per_category.values()), per_category, seen

    def user_version(self, user_id: str) -> int:
        """Moves whenever the shopper's events change, on any replica: what a
        cached profile is checked against."""
        return int(self._guard(self._reader.hget, self._user_keys(user_id)[5], "op") or 0)

    def item_counts(self) -> list[tuple[str, str, int]]:
        def read():
            with self._reader.pipeline(transaction=True) as pipe:
                pipe.zrange(self._pop["all"], 0, -1, withscores=True)
                pipe.hgetall(self._pop["cat"])
                return pipe.execute()

        counts, category_of = self._guard(read)
        return [(item_id, category_of.get(item_id, ""), int(-score)) for item_id, score in counts]

    def user_items(self) -> Iterator[tuple[str, str, str]]:
        category_of = self._guard(self._reader.hgetall, self._pop["cat"])
        keys = self._reader.scan_iter(match=self.prefix + "{u:*}:s", count=1000)
        while batch := list(itertools.islice(keys, 500)):
            with self._reader.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.zrange(key, 0, -1)
                    pipe.hget(key[:-1] + "m", "user")  # keys are named by a hash: the id is in :m
                replies = self._guard(pipe.execute)
            for items, user_id in zip(replies[::2], replies[1::2]):
                for item_id in items if user_id is not None else ():
                    yield user_id, item_id, category_of.get(item_id, "")

    def count(self) -> int:
        return int(self._guard(self._reader.get, self._pop["n"]) or 0)

    def shared_signals(self) -> tuple["RedisPopularity", "RedisCoPurchases"]:
        """Popularity and co-purchases read from Redis, kept by append()
        itself: the same for every replica."""
        return RedisPopularity(self), RedisCoPurchases(self)

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(5)
        self._cluster_pool.shutdown(wait=True)
        self._writer.close()
        self._reader.close()


class RedisPopularity:
    """services.profile.popularity.Popularity's reads over the store's {pop} keys."""

    PAGE = 200

    def __init__(self, store: RedisEventStore):
        self.store = store
        self._reader = store._reader
        self._keys = store._pop

    def counts(self, item_ids: Sequence[str]) -> list[int]:
        if not item_ids:
            return []
        scores = self.store._guard(self._reader.zmscore, self._keys["all"], list(item_ids))
        return [int(-s) if s is not None else 0 for s in scores]

    def max_count(self) -> int:
        top = self.store._guard(self._reader.zrange, self._keys["all"], 0, 0, withscores=True)
        return int(-top[0][1]) if top else 0

    def counts_and_max(self, item_ids: Sequence[str]) -> tuple[list[int], int]:
        """Both from one snapshot, in one round trip (every Recommend asks)."""
        def read():
            with self._reader.pipeline(transaction=True) as pipe:
                pipe.zrange(self._keys["all"], 0, 0, withscores=True)
                if item_ids:
                    pipe.zmscore(self._keys["all"], list(item_ids))
                return pipe.execute()

        top, *scores = self.store._guard(read)
        counts = [int(-s) if s is not None else 0 for s in scores[0]] if scores else []
        return counts, int(-top[0][1]) if top else 0

    def categories(self) -> set[str]:
        return set(self.store._guard(self._reader.smembers, self._keys["cats"]))

    def _take(self, key: str, k: int, excluded: set[str]) -> list[tuple[str, int]]:
        taken: list[tuple[str, int]] = []
        start = 0
        while len(taken) < k:
            page = self.store._guard(self._reader.zrange, key, start, start + max(self.PAGE, k) - 1,
                                     withscores=True)
            taken.extend((item_id, int(-score)) for item_id, score in page if item_id not in excluded)
            if len(page) < max(self.PAGE, k):
                break
            start += len(page)
        return taken[:k]

    def top(self, k: int, categories: Sequence[str] = (), exclude: Iterable[str] = ()) -> list[tuple[str, str, int]]:
        excluded = set(exclude)
        if categories:
            candidates = [(item_id, category, n) for category in dict.fromkeys(categories)
                          for item_id, n in self._take(self.store._category_key(category), k, excluded)]
        else:
            taken = self._take(self._keys["all"], k, excluded)
            names = self.store._guard(self._reader.hmget, self._keys["cat"], [i for i, _ in taken]) if taken else []
            candidates = [(item_id, name or "", n) for (item_id, n), name in zip(taken, names)]
        # Ties break by item id so every replica answers alike.
        candidates.sort(key=lambda c: (-c[2], c[0]))
        return candidates[:k]


class RedisCoPurchases:
    """recsys_core.signals.copurchase.CoPurchases' reads over the store's
    {i:<item>}:cp counts: the sum of the history items' rows."""

    def __init__(self, store: RedisEventStore):
        self.store = store
        self._reader = store._reader

    def related(self, history: Sequence[str], categories: Collection[str] = (), exclude: Collection[str] = (),
                leave_out_user: str | None = None) -> dict[str, int]:
        rows = list(dict.fromkeys(history))
        if not rows:
            return {}

        def read():
            with self._reader.pipeline(transaction=False) as pipe:
                for item_id in rows:
                    pipe.hgetall(self.store._item_keys(item_id)[0])
                if leave_out_user is not None:
                    pipe.zrange(self.store._user_keys(leave_out_user)[2], 0, -1)
                return pipe.execute()

        replies = self.store._guard(read)
        scores: dict[str, int] = defaultdict(int)
        for row in replies[:len(rows)]:
            for other, n in row.items():
                scores[other] += int(n)
        if leave_out_user is not None:
            # Their baskets added 1 to (h, b) for every history item h and
            # other item b they have: m - [b in history] to each of their
            # items b, where m is how many history items they have.
            own = replies[-1]
            in_history = set(rows)
            m = sum(1 for item_id in own if item_id in in_history)
            for item_id in own:
                if item_id in scores:
                    scores[item_id] -= m - (item_id in in_history)
        excluded = set(exclude)
        found = {item_id: n for item_id, n in scores.items() if n > 0 and item_id not in excluded}
        if categories and found:
            wanted = set(categories)
            names = self.categories_of(list(found))
            found = {item_id: n for item_id, n in found.items() if names.get(item_id) in wanted}
        return found

    def most_shared(self, history: Sequence[str], k: int, categories: Collection[str] = (),
                    exclude: Collection[str] = (), leave_out_user: str | None = None) -> list[tuple[str, int]]:
        related = self.related(history, categories, exclude, leave_out_user)
        return sorted(related.items(), key=lambda pair: (-pair[1], pair[0]))[:max(k, 0)]

    def categories_of(self, item_ids: Sequence[str]) -> dict[str, str]:
        if not item_ids:
            return {}
        names = self.store._guard(self._reader.hmget, self.store._pop["cat"], list(item_ids))
        return {item_id: name or "" for item_id, name in zip(item_ids, names)}

    def category(self, item_id: str) -> str:
        return self.categories_of([item_id]).get(item_id, "")

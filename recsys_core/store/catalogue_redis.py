"""The shared catalogue in Redis: every embedding replica, on any machine.

Keys, all under `prefix` (default "recsys:catalogue:", the embedding ACL
user's only keys; recsys_core/store/local_redis.py):

    seq          string  the store's version: the number of the latest write
    items        zset    item_id -> the number of the write that last changed it
    i:<item_id>  hash    id, category, title, text, category_path, encoder,
                         vector (float32 bytes), seq
    meta         hash    notes beside the items (the data sets that seeded it)

A write is one Lua script: it takes the next number and stores every item of
the batch with it, atomically (one MULTI/EXEC block in the append-only file;
with `appendfsync always` fsynced before the reply). The store checks the
server's persistence when it opens, as the profile's Redis store does
(`check_server`). Replicas poll `seq` and read the delta with ZRANGEBYSCORE:
a polled version counter rather than a stream, because the zset already is
the log compacted to one entry per item, so a replica that was down any time
catches up by the same query, and nothing needs trimming.

A write is safe to retry (storing an item's state again changes nothing but
its number), so the client retries writes on a lost connection too.

On a Redis Cluster (mode "cluster", EMBEDDING_CATALOGUE_REDIS_MODE=cluster)
every key carries the hash tag `{cat}` after the prefix
("recsys:catalogue:{cat}:seq", "recsys:catalogue:{cat}:i:<item_id>"), so
they all live in one slot: the write script, which touches the counter, the
zset and every item of a batch, needs them on one node, and a single
sequence is what lets a replica read "everything since version v" with one
query. The catalogue therefore sits on one shard (about 2 KB per item: a
million items is about 2 GB), which the cluster replicates and fails over
like any other slot; the other masters carry the profile store's shoppers.
Past one shard's memory the catalogue is split by category over several
prefixes, one per index shard (docs/operations.md, "Scaling past one
cluster"). A single server keeps the untagged names (stores written before
cluster support open unchanged).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from recsys_core.errors import ResourceExhausted, Unavailable
from recsys_core.store.catalogue_store import (
    CatalogueEntry, CatalogueStore, PutResult, latest, vector_bytes, vector_from,
)
from recsys_core.store.redis_store import _safe_url, check_server, check_settings, open_client

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "recsys:catalogue:"
# The one slot of a cluster that holds the whole catalogue (module docstring).
CLUSTER_TAG = "{cat}:"
# Items per script call: each blocks Redis for a few milliseconds (and one fsync).
WRITE_CHUNK = 500
# Items per pipelined read while catching up.
READ_CHUNK = 1000
FIELDS = (b"id", b"category", b"title", b"text", b"category_path", b"encoder", b"vector")

# KEYS: seq, items, then one hash per item. ARGV: only_new ('1' or '0'), then
# per item: id, category, title, text, category_path, encoder, vector.
# Returns {inserted, updated, version}.
_PUT_SCRIPT = """#!lua
local only_new = ARGV[1] == '1'
local n = #KEYS - 2
local seq = nil
local inserted, updated = 0, 0
for i = 1, n do
  local key = KEYS[i + 2]
  local a = 1 + (i - 1) * 7
  local exists = redis.call('EXISTS', key) == 1
  if not (exists and only_new) then
    if seq == nil then
      seq = redis.call('INCR', KEYS[1])
    end
    redis.call('HSET', key, 'id', ARGV[a + 1], 'category', ARGV[a + 2], 'title', ARGV[a + 3],
               'text', ARGV[a + 4], 'category_path', ARGV[a + 5], 'encoder', ARGV[a + 6],
               'vector', ARGV[a + 7], 'seq', seq)
    redis.call('ZADD', KEYS[2], seq, ARGV[a + 1])
    if exists then updated = updated + 1 else inserted = inserted + 1 end
  end
end
return {inserted, updated, tonumber(redis.call('GET', KEYS[1]) or '0')}
"""


class RedisCatalogueStore(CatalogueStore):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, durability: str = "always",
                 socket_timeout: float = 30.0, username: str | None = None, password: str | None = None,
                 mode: str = "single", cluster_nodes: Sequence[str] = ()):
        """`mode` "cluster": a Redis Cluster, found from `url`'s node and
        `cluster_nodes` ("host:port"), with `url`'s credentials."""
        check_settings(durability, mode, prefix)
        self.url = url
        self.prefix = prefix
        self.durability = durability
        self.mode = mode
        common = dict(socket_timeout=socket_timeout, socket_connect_timeout=5.0,
                      retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
        # Vectors are bytes: this client hands back what Redis holds.
        self._data = open_client(url, mode, cluster_nodes, username, password, decode_responses=False, **common)
        # Text replies (INFO, CONFIG GET, the version).
        self._text = open_client(url, mode, cluster_nodes, username, password, decode_responses=True, **common)
        if mode == "cluster":
            self._keys = prefix + CLUSTER_TAG
            primaries = {"target_nodes": RedisCluster.PRIMARIES}
        else:
            self._keys = prefix
            primaries = {}
        self._put = self._data.register_script(_PUT_SCRIPT)
        self._seq_key, self._items_key = self._keys + "seq", self._keys + "items"
        self._meta_key = self._keys + "meta"
        self._guard(lambda: check_server(self._text, url, durability, "EMBEDDING_CATALOGUE_REDIS_DURABILITY",
                                         "catalogue items", **primaries))

    def __repr__(self) -> str:
        return f"RedisCatalogueStore({_safe_url(self.url)!r}, prefix={self.prefix!r}, mode={self.mode!r})"

    def _guard(self, call, *args):
        try:
            return call(*args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(f"catalogue store (Redis) unreachable: {exc}") from exc
        except redis.exceptions.OutOfMemoryError as exc:
            raise ResourceExhausted(f"catalogue store (Redis) is out of memory, nothing stored: {exc}") from exc
        except (redis.exceptions.ClusterDownError, redis.exceptions.RedisClusterException) as exc:
            raise Unavailable(f"catalogue store (Redis Cluster) unavailable: {exc}") from exc

    def _item_key(self, item_id: str) -> str:
        return f"{self._keys}i:{item_id}"

    def put(self, entries: Sequence[CatalogueEntry], only_new: bool = False) -> PutResult:
        entries = latest(entries)
        inserted = updated = 0
        version = None
        # A batch above WRITE_CHUNK is stored in several atomic steps (only
        # seeding writes that many at once; an UpsertItems is at most 10,000).
        for start in range(0, len(entries), WRITE_CHUNK):
            chunk = entries[start:start + WRITE_CHUNK]
            keys = [self._seq_key, self._items_key, *(self._item_key(e.item_id) for e in chunk)]
            args: list = ["1" if only_new else "0"]
            for e in chunk:
                args.extend((e.item_id, e.category, e.title, e.text, e.category_path, e.encoder,
                             vector_bytes(e.vector)))
            added, changed, version = self._guard(self._put, keys, args)
            inserted, updated = inserted + added, updated + changed
        return PutResult(inserted, updated, self.version() if version is None else int(version))

    def version(self) -> int:
        return int(self._guard(self._text.get, self._seq_key) or 0)

    def changes(self, after: int) -> tuple[list[CatalogueEntry], int]:
        entries: list[CatalogueEntry] = []
        cursor = after
        while True:
            listed = self._guard(self._data.zrangebyscore, self._items_key, f"({cursor}", "+inf", 0, READ_CHUNK,
                                 True)
            if not listed:
                return latest(entries), cursor
            full = len(listed) == READ_CHUNK
            if full:
                # Items of one write share a number: stop before the last
                # number of a full page, which may go on beyond it. One write
                # holds at most WRITE_CHUNK < READ_CHUNK items, so a page
                # always keeps some.
                listed = [(member, score) for member, score in listed if score < listed[-1][1]]
            with self._data.pipeline(transaction=False) as pipe:
                for item_id, _ in listed:
                    pipe.hmget(self._item_key(item_id.decode()), FIELDS)
                rows = self._guard(pipe.execute)
            for values in rows:
                if values[0] is not None:
                    # The hash may already hold a later write than the zset
                    # listed: its state is newer still, and that write is
                    # listed (and applied again, harmlessly) on the next poll.
                    *text, vector = values
                    entries.append(CatalogueEntry(*(v.decode() for v in text), vector=vector_from(vector)))
            # The cursor follows the listing, never the hashes: a later
            # write's other items are not skipped.
            cursor = int(listed[-1][1])
            if not full:
                # An item written again while we paged is listed twice: its later read wins.
                return latest(entries), cursor

    def meta(self, key: str) -> str | None:
        return self._guard(self._text.hget, self._meta_key, key)

    def set_meta(self, key: str, value: str) -> None:
        self._guard(self._text.hset, self._meta_key, key, value)

    def close(self) -> None:
        self._data.close()
        self._text.close()

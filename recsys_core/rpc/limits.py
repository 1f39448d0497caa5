"""How much one request, one connection and one caller may ask of a server:
the one table of limits, and the interceptors that hold callers to it.

- Request size: each service takes at most `ServerLimits.max_request_bytes`
  per message (`<SERVICE>_MAX_REQUEST_BYTES`, grpc.max_receive_message_length:
  gRPC core refuses a larger body without Python ever seeing it, but only
  once it has received and buffered all of it: grpcio 1.81 does not check
  the length prefix first, grpc/grpc#43012), and a method in `LIMITS` with
  a smaller `max_request_bytes` refuses more than that before the body is
  parsed (grpc_util's decoding interceptor; the raw bytes have been copied
  into Python by then, on the server's event loop). Both answer
  RESOURCE_EXHAUSTED, the status grpc itself gives an over-long message.
- Repeated fields and text: `LIMITS` caps how many elements a repeated field
  may hold and how many characters a string may hold, checked on the parsed
  request before the servicer sees it: INVALID_ARGUMENT naming the field and
  the limit. Limits a service's configuration already sets (EmbedTexts'
  `EMBEDDING_MAX_TEXTS_PER_REQUEST`, IngestEvents' `PROFILE_MAX_EVENTS_PER_REQUEST`,
  Rank's `RANKING_MAX_CANDIDATES`, Recommend's `GATEWAY_MAX_CONTEXT_ITEMS`)
  stay with the domain code that reads them; the table has the rest.
- Streams per connection: `grpc.max_concurrent_streams`
  (`<SERVICE>_MAX_CONCURRENT_STREAMS`): a client's further streams wait in
  its own transport, costing the server nothing.
- Calls per caller: a token bucket per authenticated caller (a token's
  subject, else the certificate's service identity), `<SERVICE>_RATE_LIMIT_PER_SECOND`
  and `<SERVICE>_RATE_LIMIT_BURST` (0: no limit): RESOURCE_EXHAUSTED beyond it.
  Open methods (health) and unauthenticated plumbing servers are not limited.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from recsys_core.errors import InvalidArgument
from recsys_core.rpc.access import Caller, current_caller
from recsys_core.rpc.envconfig import EnvReader
from recsys_core.rpc.runtime import WrappingInterceptor, guarded

log = logging.getLogger(__name__)

KiB, MiB = 1024, 1024 * 1024
ID_CHARS = 128
ITEM_TEXT_CHARS = 4096


@dataclass(frozen=True)
class MethodLimits:
    """What one method's request may hold. Field paths are dotted: "items"
    counts a repeated field's elements; "items.text" is the text field of
    each element of `items` (or of a singular message field)."""

    # Before parsing; None: the service's max_request_bytes.
    max_request_bytes: int | None = None
    # Field path -> most elements.
    counts: Mapping[str, int] = field(default_factory=dict)
    # Field path of a string (or repeated string) -> most characters per value.
    chars: Mapping[str, int] = field(default_factory=dict)


# Id lists a shopper's whole history can fill (seen items excluded from a
# recommendation) get room for heavy shoppers; lists a client composes by
# hand (categories, query vectors) are small.
_EXCLUDED = 100_000
_CATEGORIES = 256
_ITEM = {"items.item_id": ID_CHARS, "items.category": ID_CHARS, "items.title": 1024, "items.text": ITEM_TEXT_CHARS,
         "items.category_path": 1024}
_EVENT = {"events.user_id": ID_CHARS, "events.item_id": ID_CHARS, "events.idempotency_key": ID_CHARS,
          "events.order_id": ID_CHARS, "events.review_text": 16_384}

LIMITS: dict[str, MethodLimits] = {
    # The public API: a Recommend is a few hundred bytes.
    "/recsys.gateway.v1.GatewayService/Recommend": MethodLimits(
        64 * KiB, counts={"categories": _CATEGORIES}, chars={"user_id": ID_CHARS}),
    "/recsys.gateway.v1.GatewayService/SimilarItems": MethodLimits(
        64 * KiB, counts={"categories": _CATEGORIES}, chars={"item_id": ID_CHARS}),
    "/recsys.gateway.v1.GatewayService/GetProfile": MethodLimits(4 * KiB, chars={"user_id": ID_CHARS}),
    "/recsys.gateway.v1.GatewayService/DeleteUser": MethodLimits(4 * KiB, chars={"user_id": ID_CHARS}),
    # Embedding.
    "/recsys.embedding.v1.EmbeddingService/SearchItems": MethodLimits(
        counts={"vectors": 64, "query_item_ids": 64, "categories": _CATEGORIES, "exclude_item_ids": _EXCLUDED}),
    "/recsys.embedding.v1.EmbeddingService/GetItems": MethodLimits(counts={"item_ids": 10_000}),
    "/recsys.embedding.v1.EmbeddingService/UpsertItems": MethodLimits(counts={"items": 1_000}, chars=_ITEM),
    "/recsys.embedding.v1.EmbeddingService/ListCategories": MethodLimits(4 * KiB),
    "/recsys.embedding.v1.EmbeddingService/RetrieveCandidates": MethodLimits(counts={
        "context_item_ids": 1_000, "interest_centroids": 64, "extra_item_ids": 10_000, "history_item_ids": 10_000,
        "disliked_item_ids": 10_000, "categories": _CATEGORIES, "exclude_item_ids": _EXCLUDED},
        chars={"model_version": ID_CHARS}),
    # Profile.
    "/recsys.profile.v1.ProfileService/IngestEvents": MethodLimits(chars=_EVENT),
    "/recsys.profile.v1.ProfileService/GetProfile": MethodLimits(4 * KiB, chars={"user_id": ID_CHARS}),
    "/recsys.profile.v1.ProfileService/DeleteUser": MethodLimits(4 * KiB, chars={"user_id": ID_CHARS}),
    "/recsys.profile.v1.ProfileService/GetPopularItems": MethodLimits(
        counts={"categories": _CATEGORIES, "exclude_item_ids": _EXCLUDED}),
    "/recsys.profile.v1.ProfileService/GetItemPopularity": MethodLimits(counts={"item_ids": 10_000}),
    "/recsys.profile.v1.ProfileService/GetCoPurchasedItems": MethodLimits(
        counts={"categories": _CATEGORIES, "exclude_item_ids": _EXCLUDED, "anchor_item_ids": 1_000},
        chars={"user_id": ID_CHARS}),
    # A/B exposures: a batch of up to 1,000 replies of up to 500 items each.
    "/recsys.profile.v1.ProfileService/RecordExposures": MethodLimits(
        counts={"exposures": 1_000, "exposures.item_ids": 500},
        chars={"exposures.exposure_id": ID_CHARS, "exposures.user_id": ID_CHARS, "exposures.experiment": 64,
               "exposures.arm": 64, "exposures.model_version": 64, "exposures.item_ids": ID_CHARS}),
    "/recsys.profile.v1.ProfileService/GetShopperSignals": MethodLimits(
        counts={"categories": _CATEGORIES, "exclude_item_ids": _EXCLUDED, "anchor_item_ids": 1_000},
        chars={"user_id": ID_CHARS}),
}


@dataclass(frozen=True)
class ServerLimits:
    """One server's own limits (`<SERVICE>_*` variables); `LIMITS` has the per-method ones."""

    max_request_bytes: int = 16 * MiB
    # Each stream costs the server a little memory and no thread; a client's
    # one connection (the gateway's to a service, under load) carries all its
    # concurrent calls, so this stays well above any load test's concurrency.
    max_concurrent_streams: int = 1024
    # Per caller; 0: no limit. The internal services' callers are the
    # gateway's replicas, each carrying all of its shoppers' calls.
    rate_per_second: float = 20_000.0
    rate_burst: int = 40_000

    @classmethod
    def from_env(cls, env: EnvReader, defaults: "ServerLimits") -> "ServerLimits":
        return cls(
            max_request_bytes=env.int("MAX_REQUEST_BYTES", defaults.max_request_bytes, minimum=1024,
                                      maximum=2**31 - 1),
            max_concurrent_streams=env.int("MAX_CONCURRENT_STREAMS", defaults.max_concurrent_streams, minimum=1),
            rate_per_second=env.float("RATE_LIMIT_PER_SECOND", defaults.rate_per_second, minimum=0),
            rate_burst=env.int("RATE_LIMIT_BURST", defaults.rate_burst, minimum=1),
        )

    @property
    def rate_limited(self) -> bool:
        return self.rate_per_second > 0


# The largest request any of the gateway's methods takes (Recommend's and
# SimilarItems'): the gateway's transport refuses anything larger, so no
# oversized body reaches its Python threads. With 4 MiB there, 100 callers
# sending bodies of 3.9 MiB (refused by the decoding interceptor, after gRPC
# had copied each into a Python bytes object on the event loop) kept the
# gateway's Python threads at 0.18 cores while Recommend fell from 49 to 2
# requests per second; with 64 KiB, 0.06 cores and 7 per second, on a loaded
# machine (docs/performance.md, "Idle streams and oversized requests together").
GATEWAY_MAX_REQUEST_BYTES = 64 * KiB

# Each service's defaults. The gateway faces the world: the size above and a
# per-caller rate well above a busy client's (the load tests send a few
# hundred per second on one token).
DEFAULTS: dict[str, ServerLimits] = {
    "gateway": ServerLimits(max_request_bytes=GATEWAY_MAX_REQUEST_BYTES, max_concurrent_streams=128,
                            rate_per_second=2_000.0, rate_burst=4_000),
    "embedding": ServerLimits(),
    "profile": ServerLimits(),
    "ranking": ServerLimits(max_request_bytes=4 * MiB),
}


def service_limits(env: EnvReader, service: str) -> ServerLimits:
    return ServerLimits.from_env(env, DEFAULTS[service])


def request_bytes_limit(full_method: str, server: ServerLimits) -> int:
    own = LIMITS.get(full_method)
    if own is None or own.max_request_bytes is None:
        return server.max_request_bytes
    return min(own.max_request_bytes, server.max_request_bytes)


def server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_concurrent_streams", limits.max_concurrent_streams)]


# -- repeated fields and text ---------------------------------------------------------

def _check_path(message, path: str, limit: int, what: str, shown: str = "") -> None:
    head, _, rest = path.partition(".")
    repeated = message.DESCRIPTOR.fields_by_name[head].is_repeated
    value = getattr(message, head)
    name = f"{shown}{head}"
    if rest:
        if repeated:
            for position, inner in enumerate(value):
                _check_path(inner, rest, limit, what, f"{name}[{position}].")
        else:
            _check_path(value, rest, limit, what, f"{name}.")
        return
    if what == "count":
        if len(value) > limit:
            raise InvalidArgument(name, f"at most {limit:,} per request, got {len(value):,}")
        return
    for position, text in enumerate(value if repeated else (value,)):
        if len(text) > limit:
            raise InvalidArgument(f"{name}[{position}]" if repeated else name,
                                  f"is {len(text):,} characters, the limit is {limit:,}")


def check_request(limits: MethodLimits, request) -> None:
    """Raises InvalidArgument for the first field over its limit."""
    for path, limit in limits.counts.items():
        _check_path(request, path, limit, "count")
    for path, limit in limits.chars.items():
        _check_path(request, path, limit, "chars")


class FieldLimitsInterceptor(WrappingInterceptor):
    """Holds each parsed request to its method's `LIMITS` entry."""

    def __init__(self, table: Mapping[str, MethodLimits] = LIMITS):
        super().__init__()
        self.table = table

    def wrap(self, handler, full_method: str):
        limits = self.table.get(full_method)
        if limits is None or handler.unary_unary is None or not (limits.counts or limits.chars):
            return handler

        async def check(request, context):
            try:
                check_request(limits, request)
            except InvalidArgument as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        return guarded(handler, check)


# -- calls per caller -----------------------------------------------------------------

class TokenBuckets:
    """A bucket per key: `burst` calls at once, refilled at `rate` per second."""

    # Beyond this many callers, full buckets (callers idle long enough to
    # have refilled) are forgotten: a full bucket and a new one are the same.
    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.MAX_KEYS:
                self._forget_full(now)
            return allowed

    def _forget_full(self, now: float) -> None:
        full = [key for key, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def caller_key(caller: Caller) -> str | None:
    """Who a bucket belongs to: the token's subject (and tenant), else the certificate's service."""
    if caller.principal is not None:
        return f"{caller.principal.via}:{caller.principal.tenant}:{caller.principal.subject}"
    if caller.service is not None:
        return f"service:{caller.service}"
    return None


class RateLimitInterceptor(WrappingInterceptor):
    """RESOURCE_EXHAUSTED for a caller over its rate. Runs inside the access
    interceptor, which has identified the caller (`access.current_caller`)."""

    def __init__(self, limits: ServerLimits, clock=time.monotonic):
        super().__init__()
        self.limits = limits
        self.buckets = TokenBuckets(limits.rate_per_second, limits.rate_burst, clock)
        self._last_logged: dict[str, float] = {}

    def _allowed(self, full_method: str, context) -> bool:
        caller = current_caller()
        key = caller_key(caller) if caller is not None else None
        if key is None or self.buckets.take(key):
            return True
        # One line per caller per minute, not one per refused call.
        now = time.monotonic()
        if now - self._last_logged.get(key, -60.0) >= 60.0:
            if len(self._last_logged) > TokenBuckets.MAX_KEYS:
                self._last_logged.clear()
            self._last_logged[key] = now
            log.warning("rate limited %s: caller %s over %g calls/s (burst %d)", full_method, caller.describe(),
                        self.limits.rate_per_second, self.limits.rate_burst)
        return False

    def _message(self) -> str:
        return (f"rate limit: at most {self.limits.rate_per_second:g} calls per second per caller "
                f"(burst {self.limits.rate_burst}); retry later")

    def wrap(self, handler, full_method: str):
        async def check(request, context):
            if not self._allowed(full_method, context):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._message())

        # Request streams (reflection) are counted once, when they open.
        return guarded(handler, check)

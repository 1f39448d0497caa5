"""How a client spreads its calls over a service's replicas, and which calls
it may send again.

Every channel of the platform (grpc_util.channel) carries one gRPC service
config: `round_robin` over every address its resolver returns, so that with
a headless Kubernetes Service (`dns:///<name>-headless...`) each call, not
each connection, picks the next replica; and a retry policy for the methods
in `METHODS` marked `READ`. A retry goes out on the next pick of
round_robin, so it usually lands on another replica than the one that failed.

`METHODS` classifies every method of every service by full name; a method
with no line is not retried, and tests/test_balancing.py fails for any method
of the descriptors that has none, so a new RPC is classified when it is added.
"""
from __future__ import annotations

import json

READ = "read"
WRITE = "write"

# READ: answers from state without changing it, so a second attempt, on this
# replica or another, cannot do anything the first did not.
# WRITE: never resent by the channel. IngestEvents is idempotent only for
# events that carry an idempotency key (the key is optional), and whether a
# lost reply means "stored" is the caller's to decide: it resends with the
# same keys (docs/profiles.md, "Retries"). UpsertItems changes only the
# replica that answers it (docs/operations.md, "Known limits"); resending it
# elsewhere would change a second replica behind the caller's back.
# DeleteUser is idempotent (a second call removes nothing and answers 0), but
# it destroys data: resending is the caller's decision, after reading the reply.
METHODS: dict[str, str] = {
    "/recsys.gateway.v1.GatewayService/Recommend": READ,
    "/recsys.gateway.v1.GatewayService/SimilarItems": READ,
    "/recsys.gateway.v1.GatewayService/GetProfile": READ,
    "/recsys.gateway.v1.GatewayService/DeleteUser": WRITE,
    "/recsys.profile.v1.ProfileService/GetProfile": READ,
    "/recsys.profile.v1.ProfileService/GetPopularItems": READ,
    "/recsys.profile.v1.ProfileService/GetItemPopularity": READ,
    "/recsys.profile.v1.ProfileService/GetCoPurchasedItems": READ,
    "/recsys.profile.v1.ProfileService/GetShopperSignals": READ,
    "/recsys.profile.v1.ProfileService/IngestEvents": WRITE,
    "/recsys.profile.v1.ProfileService/DeleteUser": WRITE,
    # Idempotent by exposure_id, but a write: the gateway's exposure log
    # resends a failed batch itself (services/gateway/exposures.py).
    "/recsys.profile.v1.ProfileService/RecordExposures": WRITE,
    "/recsys.embedding.v1.EmbeddingService/EmbedTexts": READ,
    "/recsys.embedding.v1.EmbeddingService/SearchItems": READ,
    "/recsys.embedding.v1.EmbeddingService/RetrieveCandidates": READ,
    "/recsys.embedding.v1.EmbeddingService/GetItems": READ,
    "/recsys.embedding.v1.EmbeddingService/ListCategories": READ,
    "/recsys.embedding.v1.EmbeddingService/UpsertItems": WRITE,
    "/recsys.ranking.v1.RankingService/Rank": READ,
}

# Three attempts in all, the resends after about 0-50 ms and 0-100 ms
# (gRPC draws each backoff uniformly below the current bound): enough to step
# past a replica that is gone or draining, short against the gateway's 5 s
# request budget. Every attempt still ends at the call's own deadline.
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    # UNAVAILABLE: the replica is gone, draining, still loading, or the
    # connection broke before it answered. RESOURCE_EXHAUSTED: our servers
    # answer it at once, before doing any work, when their blocking pool is
    # full (recsys_core/rpc/runtime.py), so another replica may well have
    # room. CANCELLED from the server: a replica that stops (drain, rolling
    # restart) cancels the calls that reached it but no handler yet, which a
    # read may safely send again (a rolling restart of embedding under ghz
    # load failed one Recommend this way, docs/operations.md "Chaos under
    # load"); a call the client cancelled is never resent. Nothing else:
    # DEADLINE_EXCEEDED has no time left, and the other codes would be
    # answered the same by every replica.
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"],
}

# Resends stop while more than half of a channel's attempts fail: each
# failed attempt costs a token, each success gives one back, and resends go
# out only above half of `maxTokens`. One unwell replica of two fails a third
# of the attempts (its calls, then their resends elsewhere succeed), so its
# calls keep being resent; when every replica is overloaded, resending would
# only add load. A ratio below 1 would throttle that first case too (0.5:
# after half a dozen calls). The ratio must be written with a decimal point:
# gRPC reads an integer 1 as no refund at all (tests/test_balancing.py).
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 1.0}


def reads() -> list[str]:
    return sorted(name for name, kind in METHODS.items() if kind == READ)


def service_config() -> str:
    """The service config JSON every platform channel is given (grpc.service_config)."""
    names = []
    for full_name in reads():
        service, method = full_name.lstrip("/").split("/")
        names.append({"service": service, "method": method})
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        "retryThrottling": RETRY_THROTTLING,
    }, separators=(",", ":"))


# Keepalive, both sides. Clients ping every 30 s, also with no call open, so
# a replica that vanished without closing its connections (node lost, pod
# killed) is noticed within 40 s and round_robin stops picking it even
# between bursts of calls. A server counts pings that come faster than its
# minimum interval as abuse and, after two, closes the connection with
# GOAWAY "too_many_pings": so servers accept pings without calls and down to
# every 10 s, well below what clients send.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000

# Servers close every connection after about 5 minutes (gRPC adds ±10 %
# jitter) with a GOAWAY, letting calls in flight finish within the grace. A
# round_robin client re-resolves the name when a connection goes, so replicas
# an HPA added are found within minutes, not only when a client restarts.
MAX_CONNECTION_AGE_MS = 300_000
MAX_CONNECTION_AGE_GRACE_MS = 30_000

# Reconnecting to a replica whose connection failed: gRPC's defaults wait
# 1 s, then 1.6 times longer after each failed attempt, up to 120 s, so a
# service down for half a minute was found again only 10 s or more after it
# came back. Here: 250 ms, growing to at most 2 s (gRPC adds ±20 % jitter),
# so a replica that is back is used within 2.4 s, well inside the 5 s the
# platform promises for recovery (tests/test_chaos.py). A failed attempt to
# a local or in-cluster address costs one refused SYN, so trying every 2 s
# is cheap; an address that black-holes SYNs is bounded by the connect
# timeout (gRPC's default 20 s), not by these.
INITIAL_RECONNECT_BACKOFF_MS = 250
MAX_RECONNECT_BACKOFF_MS = 2_000

CLIENT_OPTIONS = [
    ("grpc.service_config", service_config()),
    # A DNS TXT record must not replace the policy above.
    ("grpc.service_config_disable_resolution", 1),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # 0: no limit on pings sent while no data flows (idle channels keep pinging).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
    ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
]

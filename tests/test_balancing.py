"""Client-side load balancing and retries (recsys_core/rpc/balancing.py).

The classification of every method is checked against the descriptors; then
two real servers (the platform's build_server, mutual TLS and access rules
on) sit behind one channel from the platform's channel factory, addressed
as one name with two addresses, as a headless Service's DNS name resolves.
"""
from __future__ import annotations

import json
import threading

import grpc
import pytest

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.gateway.v1 import gateway_pb2
from recsys.profile.v1 import profile_pb2
from recsys.ranking.v1 import ranking_pb2
from recsys_core.rpc import balancing
from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS, SERVER_OPTIONS, build_server, channel
from tests.conftest import secured, tls_material

DESCRIPTORS = [
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    profile_pb2.DESCRIPTOR.services_by_name["ProfileService"],
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"],
    ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
]


def every_method() -> list[str]:
    return [f"/{service.full_name}/{method.name}" for service in DESCRIPTORS for method in service.methods]


# -- the classification and the service config ---------------------------------------


def test_every_method_is_classified_read_or_write():
    """A new RPC fails here until it has a line in balancing.METHODS."""
    unclassified = [name for name in every_method() if name not in balancing.METHODS]
    assert not unclassified, f"add these to recsys_core/rpc/balancing.py METHODS (READ or WRITE): {unclassified}"
    assert set(balancing.METHODS.values()) == {balancing.READ, balancing.WRITE}


def test_service_config_retries_exactly_the_reads():
    config = json.loads(balancing.service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    retried = {f"/{n['service']}/{n['method']}" for n in method_config["name"]}
    existing = set(every_method())
    reads = {name for name in existing if balancing.METHODS[name] == balancing.READ}
    assert reads <= retried
    # Writes are never resent by the channel, whatever the descriptors hold.
    assert not {name for name, kind in balancing.METHODS.items() if kind == balancing.WRITE} & retried
    assert {"/recsys.profile.v1.ProfileService/IngestEvents", "/recsys.embedding.v1.EmbeddingService/UpsertItems"} \
        <= existing - retried
    # A method-less name would apply the policy to every method of the service.
    assert all(n.get("method") for n in method_config["name"])
    policy = method_config["retryPolicy"]
    assert 2 <= policy["maxAttempts"] <= 4
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"}
    throttling = config["retryThrottling"]
    # Written as 1 (no decimal point) gRPC refunds nothing and resends stop after a few failures.
    assert throttling["maxTokens"] > 0 and isinstance(throttling["tokenRatio"], float)


def test_servers_accept_the_pings_clients_send():
    """A server that sees pings more often than it permits closes the
    connection (GOAWAY too_many_pings); clients ping without calls too."""
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.enable_retries"] == 1
    assert client["grpc.keepalive_permit_without_calls"] == 1 and server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.max_connection_age_ms"] > 0
    assert "grpc.service_config" not in server


# -- two replicas behind one channel --------------------------------------------------


class Replica(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Counts the calls it gets; answers `failing` instead while it is set."""

    def __init__(self):
        self.calls = {"GetItems": 0, "UpsertItems": 0}
        self.failing: grpc.StatusCode | None = None
        self._lock = threading.Lock()

    async def _answer(self, method, context, reply):
        with self._lock:
            self.calls[method] += 1
        if self.failing is not None:
            await context.abort(self.failing, "this replica is unwell")
        return reply

    async def GetItems(self, request, context):
        return await self._answer("GetItems", context, embedding_pb2.GetItemsResponse())

    async def UpsertItems(self, request, context):
        return await self._answer("UpsertItems", context, embedding_pb2.UpsertItemsResponse())


@pytest.fixture
def replicas():
    started = []
    for _ in range(2):
        server, port = build_server(
            "127.0.0.1:0", 2, [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name],
            "embedding", **secured("embedding"),
        )
        replica = Replica()
        server.add(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, replica)
        server.readiness.ready.set()
        server.serving.set_serving(True)
        server.start()
        started.append((server, port, replica))
    yield started
    for server, _, _ in started:
        server.stop(None).wait(10)


def both(replicas) -> str:
    # What the DNS name of a headless Service gives: every ready pod's address.
    return "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port, _ in replicas)


def stub(replicas, identity: str) -> tuple[grpc.Channel, embedding_pb2_grpc.EmbeddingServiceStub]:
    # The channel checks each server's certificate for "embedding", whichever address it dials.
    opened = channel(both(replicas), tls_material().security(identity), "embedding")
    grpc.channel_ready_future(opened).result(timeout=10)
    return opened, embedding_pb2_grpc.EmbeddingServiceStub(opened)


def get_items(stub_) -> None:
    stub_.GetItems(embedding_pb2.GetItemsRequest(item_ids=["a"]), timeout=5)


@pytest.mark.integration
def test_round_robin_spreads_calls_over_both_replicas(replicas):
    opened, embedding = stub(replicas, "gateway")
    with opened:
        # round_robin connects to every address; calls go out once all are in.
        for _ in range(50):
            get_items(embedding)
    counts = [replica.calls["GetItems"] for _, _, replica in replicas]
    assert sum(counts) == 50
    assert min(counts) >= 15, counts  # per call, not per connection: near 25 each


@pytest.mark.integration
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_read_that_fails_on_one_replica_is_answered_by_the_other(replicas, code):
    (_, _, unwell), (_, _, well) = replicas
    opened, embedding = stub(replicas, "gateway")
    with opened:
        get_items(embedding)  # both subchannels connected
        unwell.failing = code
        before = dict(unwell.calls), dict(well.calls)
        for _ in range(20):
            get_items(embedding)  # never raises: each failure is resent
    tried_unwell = unwell.calls["GetItems"] - before[0]["GetItems"]
    assert tried_unwell > 0  # round_robin did send calls its way ...
    assert well.calls["GetItems"] - before[1]["GetItems"] == 20  # ... and each ended on the other


@pytest.mark.integration
def test_a_read_succeeds_while_a_replica_is_stopped(replicas):
    (gone, _, _), (_, _, well) = replicas
    opened, embedding = stub(replicas, "gateway")
    with opened:
        get_items(embedding)
        gone.stop(None).wait(10)
        for _ in range(20):
            get_items(embedding)
    assert well.calls["GetItems"] >= 20


@pytest.mark.integration
def test_a_write_is_not_resent(replicas):
    (_, _, unwell), (_, _, well) = replicas
    unwell.failing = grpc.StatusCode.UNAVAILABLE
    opened, embedding = stub(replicas, "catalogue")
    failed = 0
    with opened:
        for _ in range(20):
            try:
                embedding.UpsertItems(embedding_pb2.UpsertItemsRequest(), timeout=5)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                failed += 1
    # One attempt per call: the failures are exactly the calls the unwell replica got.
    assert failed == unwell.calls["UpsertItems"] > 0
    assert unwell.calls["UpsertItems"] + well.calls["UpsertItems"] == 20

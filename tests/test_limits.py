"""Limits (issue #17, part 3): per-method request sizes, caps on repeated
fields and text, new categories only for admins, streams per connection, and
a rate per caller; and that idle streams and oversized requests leave
Recommend answering."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.common.v1 import common_pb2
from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import InvalidArgument
from recsys_core.rpc import limits
from recsys_core.rpc.access import Caller, Principal
from recsys_core.rpc.messages import to_vector
from recsys_core.rpc.transport import client_channel
from tests.conftest import admin_token, secured, service_channel, start, tls_material

UPSERT = "/recsys.embedding.v1.EmbeddingService/UpsertItems"
SEARCH = "/recsys.embedding.v1.EmbeddingService/SearchItems"


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


# -- the table, as domain code ------------------------------------------------------

def test_the_table_caps_repeated_fields_and_text_naming_field_and_limit():
    upsert = limits.LIMITS[UPSERT]
    fine = embedding_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="a", category="Beauty", text="x" * 4096)])
    limits.check_request(upsert, fine)
    long_text = embedding_pb2.UpsertItemsRequest(items=[fine.items[0], common_pb2.Item(item_id="b", text="y" * 4097)])
    with pytest.raises(InvalidArgument, match=r"items\[1\]\.text: is 4,097 characters, the limit is 4,096"):
        limits.check_request(upsert, long_text)
    many = embedding_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id=str(i)) for i in range(1001)])
    with pytest.raises(InvalidArgument, match="items: at most 1,000 per request, got 1,001"):
        limits.check_request(upsert, many)
    vectors = embedding_pb2.SearchItemsRequest(vectors=[common_pb2.Vector()] * 65)
    with pytest.raises(InvalidArgument, match="vectors: at most 64 per request, got 65"):
        limits.check_request(limits.LIMITS[SEARCH], vectors)


def test_every_path_in_the_table_names_a_field_of_its_method():
    from google.protobuf import descriptor_pool

    import recsys.gateway.v1.gateway_pb2  # noqa: F401 - registers the gateway's messages

    pool = descriptor_pool.Default()
    for method, entry in limits.LIMITS.items():
        service, name = method[1:].split("/")
        request = pool.FindServiceByName(service).methods_by_name[name].input_type
        for path in [*entry.counts, *entry.chars]:
            descriptor = request
            for part in path.split("."):
                assert part in descriptor.fields_by_name, (method, path)
                descriptor = descriptor.fields_by_name[part].message_type or descriptor


def test_a_method_limit_never_exceeds_its_server_limit():
    server = limits.ServerLimits(max_request_bytes=2048)
    assert limits.request_bytes_limit("/recsys.profile.v1.ProfileService/GetProfile", server) == 2048
    assert limits.request_bytes_limit("/recsys.profile.v1.ProfileService/GetProfile",
                                      limits.DEFAULTS["profile"]) == 4 * 1024
    assert limits.request_bytes_limit(UPSERT, limits.DEFAULTS["embedding"]) == 16 * 1024 * 1024


def test_token_buckets_allow_the_burst_then_the_rate_per_key():
    now = [0.0]
    buckets = limits.TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # another caller has its own bucket
    now[0] += 0.5  # one token back
    assert buckets.take("a") and not buckets.take("a")
    now[0] += 100
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]  # never more than the burst


def test_idle_callers_buckets_are_forgotten_beyond_the_bound(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(limits.TokenBuckets, "MAX_KEYS", 10)
    buckets = limits.TokenBuckets(rate=1.0, burst=1, clock=lambda: now[0])
    for key in range(10):
        buckets.take(str(key))
    now[0] += 5  # all refilled
    buckets.take("new")
    assert len(buckets) <= 2


def test_callers_are_keyed_by_token_subject_else_certificate():
    shopper = Caller(principal=Principal("A1", tenant="amazon", roles=frozenset({"shopper"})), service="gateway")
    assert limits.caller_key(shopper) == "jwt:amazon:A1"
    assert limits.caller_key(Caller(service="gateway")) == "service:gateway"
    assert limits.caller_key(Caller()) is None


def test_limits_come_from_the_environment_with_per_service_defaults():
    from services.gateway.config import GatewayConfig
    from services.profile.config import ProfileConfig

    env = {"PROFILE_INSECURE": "1", "PROFILE_MAX_REQUEST_BYTES": "2097152", "PROFILE_RATE_LIMIT_PER_SECOND": "0",
           "PROFILE_MAX_CONCURRENT_STREAMS": "64"}
    profile = ProfileConfig.from_env(env).limits
    assert (profile.max_request_bytes, profile.max_concurrent_streams, profile.rate_limited) == (2097152, 64, False)
    gateway = GatewayConfig.from_env({"GATEWAY_INSECURE": "1"}).limits
    assert gateway == limits.DEFAULTS["gateway"] and gateway.max_request_bytes == 64 * 1024


def test_the_gateways_transport_refuses_what_every_gateway_method_would():
    """gRPC copies a body within the transport's limit into Python before any
    method limit can refuse it: at the public edge the transport's limit is
    the largest request any gateway method takes, so none larger gets that far."""
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    methods = [f"/{service.full_name}/{method.name}" for method in service.methods]
    own = {method: limits.LIMITS[method].max_request_bytes if method in limits.LIMITS else None for method in methods}
    assert None not in own.values(), f"every gateway method needs a size limit of its own in LIMITS: {own}"
    assert limits.DEFAULTS["gateway"].max_request_bytes == max(own.values())


# -- on real servers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited_ranking():
    """A ranking server allowing 5 calls per caller (burst; refilled at 1/s)
    and 4 streams per connection."""
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    config = RankingConfig(address="127.0.0.1:0", **secured("ranking"),
                           limits=limits.ServerLimits(max_request_bytes=1024 * 1024, max_concurrent_streams=4,
                                                      rate_per_second=1.0, rate_burst=5))
    server, address = start(create_server(config))
    yield address
    server.stop(None)


def rank_request() -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(candidates=[ranking_pb2.Candidate(item_id="a", features=common_pb2.CandidateFeatures())])


def test_a_caller_over_its_rate_gets_resource_exhausted_and_others_do_not(limited_ranking, caplog):
    with service_channel(limited_ranking, "ranking", identity="gateway", token=None) as gateway, \
            service_channel(limited_ranking, "ranking", identity="admin", token=admin_token()) as admin:
        rank = ranking_pb2_grpc.RankingServiceStub(gateway).Rank
        answered = 0
        with caplog.at_level("WARNING", logger="recsys_core.rpc.limits"):
            for _ in range(5):
                rank(rank_request(), timeout=5)
                answered += 1
            message = refused(lambda: rank(rank_request(), timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
            refused(lambda: rank(rank_request(), timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert answered == 5
        assert "at most 1 calls per second per caller (burst 5)" in message
        # One log line for the caller, not one per refusal.
        assert len([r for r in caplog.records if "rate limited" in r.getMessage()]) == 1
        # Another caller (the admin token) has its own bucket; health is never limited.
        assert ranking_pb2_grpc.RankingServiceStub(admin).Rank(rank_request(), timeout=5).candidates
        assert health_pb2_grpc.HealthStub(gateway).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def own_connection(address: str, service: str) -> grpc.Channel:
    """A channel with a connection of its own (channels with the same
    arguments otherwise share one)."""
    security = tls_material().security("admin")
    return client_channel(address, ca=security.ca_path, cert=security.cert_path, key=security.key_path,
                          server_name=service, options=[("grpc.use_local_subchannel_pool", 1)])


def test_streams_beyond_the_per_connection_limit_wait_on_their_own_connection(limited_ranking):
    with own_connection(limited_ranking, "ranking") as busy, own_connection(limited_ranking, "ranking") as other:
        watches = [health_pb2_grpc.HealthStub(busy).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                   for _ in range(4)]
        try:
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # A fifth stream on that connection waits for one of the four...
            refused(lambda: health_pb2_grpc.HealthStub(busy).Check(health_pb2.HealthCheckRequest(), timeout=1),
                    grpc.StatusCode.DEADLINE_EXCEEDED)
            # ...while another connection is served.
            assert health_pb2_grpc.HealthStub(other).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            watches[0].cancel()
            assert health_pb2_grpc.HealthStub(busy).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        finally:
            for watch in watches:
                watch.cancel()


@pytest.mark.integration
def test_internal_services_hold_requests_to_the_table(stack):
    with stack.channel("embedding") as embedding_channel, stack.channel("profile") as profile_channel:
        embedding = embedding_pb2_grpc.EmbeddingServiceStub(embedding_channel)
        profile = profile_pb2_grpc.ProfileServiceStub(profile_channel)
        message = refused(lambda: embedding.SearchItems(embedding_pb2.SearchItemsRequest(
            vectors=[to_vector(np.ones(384, dtype=np.float32))] * 65, k=5), timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
        assert message == "vectors: at most 64 per request, got 65"
        message = refused(lambda: embedding.UpsertItems(embedding_pb2.UpsertItemsRequest(items=[common_pb2.Item(
            item_id="TEST-LIMITS-LONG", category="Beauty", title="t", text="z" * 4097)]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert message == "items[0].text: is 4,097 characters, the limit is 4,096"
        refused(lambda: embedding.GetItems(embedding_pb2.GetItemsRequest(item_ids=["x"] * 10_001), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT)
        refused(lambda: profile.IngestEvents(profile_pb2.IngestEventsRequest(events=[common_pb2.Event(
            user_id="u" * 129, item_id="i", type=common_pb2.EVENT_TYPE_VIEW)]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT)
        # GetProfile reads at most 4 KiB, before parsing.
        message = refused(lambda: profile.GetProfile(profile_pb2.GetProfileRequest(user_id="u" * 5000), timeout=10),
                          grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert message.endswith("GetProfile takes at most 4,096"), message


@pytest.mark.integration
def test_only_admins_add_categories(stack, dataset):
    existing = dataset.items.category.iloc[0]
    with service_channel(stack.embedding, "embedding", identity="catalogue", token=None) as channel:
        upsert = embedding_pb2_grpc.EmbeddingServiceStub(channel).UpsertItems
        message = refused(lambda: upsert(embedding_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id="TEST-LIMITS-1", category=existing, title="a garden hose"),
            common_pb2.Item(item_id="TEST-LIMITS-2", category="Brand_New_Category", title="a new thing")]), timeout=30),
            grpc.StatusCode.PERMISSION_DENIED)
        assert message == ("items[1].category: 'Brand_New_Category' is not in the catalogue; "
                           "only admin callers may add a category")
        # The feed may still write into categories the catalogue has.
        reply = upsert(embedding_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id="TEST-LIMITS-1", category=existing, title="a garden hose")]), timeout=30)
        assert reply.inserted + reply.updated == 1
    with stack.channel("embedding") as admin:
        categories = embedding_pb2_grpc.EmbeddingServiceStub(admin).ListCategories(
            embedding_pb2.ListCategoriesRequest(), timeout=10)
        assert "Brand_New_Category" not in {c.name for c in categories.categories}


def gateway_connection(address: str) -> grpc.Channel:
    return client_channel(address, ca=str(tls_material().ca), token=admin_token(), server_name="gateway",
                          options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.mark.integration
def test_idle_streams_and_oversized_requests_leave_recommend_answering(stack, dataset):
    """200 idle Watch streams over two connections and 20 requests of 5 MiB
    in flight at once; Recommend from a third connection still answers."""
    shopper = dataset.interactions.user_id.iloc[0]
    channels = [gateway_connection(stack.gateway) for _ in range(3)]
    watches = []
    try:
        for channel in channels[:2]:
            health = health_pb2_grpc.HealthStub(channel)
            streams = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(100)]
            for stream in streams:
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            watches += streams
        oversized = gateway_pb2.RecommendRequest(user_id=shopper, k=5, context_item_ids=["B" * 1023] * 5 * 1024)
        stubs = [gateway_pb2_grpc.GatewayServiceStub(channel) for channel in channels[:2]]
        go = threading.Event()

        def send(position):
            go.wait(10)
            try:
                stubs[position % 2].Recommend(oversized, timeout=30)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        with futures.ThreadPoolExecutor(20) as pool:
            codes = [pool.submit(send, i) for i in range(20)]
            go.set()
            reply = gateway_pb2_grpc.GatewayServiceStub(channels[2]).Recommend(
                gateway_pb2.RecommendRequest(user_id=shopper, k=10), timeout=10)
            assert len(reply.items) == 10
            assert {c.result() for c in codes} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert health_pb2_grpc.HealthStub(channels[2]).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        for stream in watches:
            stream.cancel()
        for channel in channels:
            channel.close()

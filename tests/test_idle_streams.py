"""Long-lived streams cost no worker: with 1,000 idle health Watch streams
open on the gateway and on the profile service, Recommend, GetProfile and
health Check still answer (the thread-pool servers stopped answering once 16
Watch streams held the gateway's 16 workers). The bounded pool refuses work
beyond its queue with RESOURCE_EXHAUSTED, and a Watch stream hears a status
change even after another watcher of the same service left."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core.rpc.grpc_util import build_server

IDLE_STREAMS = 1000
WATCH = ("grpc.health.v1.Health", "Watch")
SERVING = health_pb2.HealthCheckResponse.SERVING


def in_flight(server, service: str, method: str) -> float:
    return server.metrics.registry.get_sample_value(
        "grpc_server_in_flight", {"grpc_service": service, "grpc_method": method}
    ) or 0.0


def gateway_connections(address: str, count: int) -> list[grpc.Channel]:
    """Channels to the gateway, each on a connection of its own: one
    connection carries at most GATEWAY_MAX_CONCURRENT_STREAMS (128) streams."""
    from recsys_core.rpc.transport import client_channel
    from tests.conftest import admin_token, tls_material

    return [client_channel(address, ca=str(tls_material().ca), token=admin_token(), server_name="gateway",
                           options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


def open_watches(channel: grpc.Channel, count: int) -> list:
    """`count` Watch streams, each read up to its first status so it is open
    on the server; their deadline ends them should the test fail midway."""
    health = health_pb2_grpc.HealthStub(channel)
    streams = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(count)]
    for stream in streams:
        assert next(stream).status == SERVING
    return streams


def wait_until(condition, seconds: float, what: str) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, what
        time.sleep(0.05)


@pytest.mark.integration
def test_idle_watch_streams_leave_recommend_and_health_checks_answering(stack, dataset):
    gateway_server, profile_server = stack.servers["gateway"], stack.servers["profile"]
    shoppers = list(dataset.interactions.user_id.unique()[:10])
    connections = gateway_connections(stack.gateway, 10)
    with stack.channel("gateway") as gateway_channel, stack.channel("profile") as profile_channel:
        watched = {"gateway": [stream for connection in connections
                               for stream in open_watches(connection, IDLE_STREAMS // len(connections))],
                   "profile": open_watches(profile_channel, IDLE_STREAMS)}
        try:
            # All of them are open on the servers at once, not queued.
            assert in_flight(gateway_server, *WATCH) >= IDLE_STREAMS
            assert in_flight(profile_server, *WATCH) >= IDLE_STREAMS
            gateway = gateway_pb2_grpc.GatewayServiceStub(gateway_channel)
            profile = profile_pb2_grpc.ProfileServiceStub(profile_channel)
            for shopper in shoppers:
                reply = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=10), timeout=10)
                assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED and len(reply.items) == 10
                assert profile.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=10).known
            for channel in (gateway_channel, profile_channel):
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == SERVING
            # Still open afterwards: nothing above ended them.
            assert in_flight(gateway_server, *WATCH) >= IDLE_STREAMS
        finally:
            for stream in watched["gateway"] + watched["profile"]:
                stream.cancel()
            for connection in connections:
                connection.close()
        wait_until(lambda: in_flight(gateway_server, *WATCH) == 0 and in_flight(profile_server, *WATCH) == 0,
                   30, "cancelled Watch streams still in flight")


def test_a_full_pool_refuses_with_resource_exhausted_and_counts_it():
    """One worker, so 16 calls may run or wait; the 17th is refused at once."""
    server, port = build_server("127.0.0.1:0", 1, [], "tiny", metrics_port=None)
    release = threading.Event()

    def hold(request, context):
        release.wait(30)
        return request

    identity = {"request_deserializer": None, "response_serializer": None}
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Pool", {"Hold": grpc.unary_unary_rpc_method_handler(hold, **identity)}),))
    server.readiness.start(lambda: None)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Pool/Hold")
            held = [call.future(b"x", timeout=30) for _ in range(server.blocking.limit)]
            wait_until(lambda: server.blocking.pending == server.blocking.limit, 10, "the pool never filled")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Health answers on the loop, whatever the pool is doing.
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == SERVING
            release.set()
            assert [f.result() for f in held] == [b"x"] * server.blocking.limit
            assert call(b"x", timeout=5) == b"x"
        handled = server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_type": "unary", "grpc_service": "test.Pool", "grpc_method": "Hold", "grpc_code": "ResourceExhausted"},
        )
        assert handled == 1
    finally:
        release.set()
        server.stop(None).wait(5)


def test_a_watcher_hears_changes_after_another_watcher_left():
    server, port = build_server("127.0.0.1:0", 1, ["test.Svc"], "watched")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="test.Svc")
            staying, leaving = health.Watch(request, timeout=30), health.Watch(request, timeout=30)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert next(staying).status == not_serving and next(leaving).status == not_serving
            leaving.cancel()
            wait_until(lambda: in_flight(server, *WATCH) == 1, 10, "the cancelled Watch never ended")
            server.serving.set_serving(True)
            assert next(staying).status == SERVING
            # The drain's NOT_SERVING reaches it too.
            stopped = server.stop(5)
            assert next(staying).status == not_serving
    finally:
        server.stop(None).wait(10)
    assert stopped.wait(10)

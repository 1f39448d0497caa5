"""Prometheus metrics: the one server interceptor (counts by method and status
code, latency histogram, in-flight gauge) on a real ranking server scraped
over HTTP, status codes set every way a handler can, and each service's own
figures on the in-process stack."""
from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.common.v1 import common_pb2
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.rpc.grpc_util import build_server, handle_errors
from recsys_core.errors import NotFound
from recsys_core.rpc.messages import to_vector
from recsys_core.rpc.metrics import listen_host, split_method

RANK = ("unary", "recsys.ranking.v1.RankingService", "Rank")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def method_labels(kind: str, service: str, method: str) -> dict:
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method}


def vector(seed: int) -> common_pb2.Vector:
    values = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return to_vector(values / np.linalg.norm(values))


@pytest.fixture()
def ranking():
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    from tests.conftest import secured, service_channel

    server, port = create_server(RankingConfig(address="127.0.0.1:0", metrics_port=0, **secured("ranking")))
    server.start()
    assert server.readiness.ready.wait(10)
    with service_channel(f"127.0.0.1:{port}", "ranking", identity="gateway", token=None) as channel:
        yield server, channel
    server.stop(None).wait(5)


def test_ranking_counts_calls_by_code_with_latency_and_candidates(ranking):
    server, channel = ranking
    assert server.metrics_port and server.metrics_port > 0
    before = scrape(server.metrics_port)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    user = ranking_pb2.UserFeatures(drift_score=0.5)
    candidates = [ranking_pb2.Candidate(item_id=f"i{n}", features=common_pb2.CandidateFeatures(long_term_similarity=n / 7))
                  for n in range(7)]
    for _ in range(3):
        assert len(stub.Rank(ranking_pb2.RankRequest(user=user, candidates=candidates, k=5), timeout=5).candidates) == 5
    for _ in range(2):  # handle_errors aborts with INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(ranking_pb2.RankRequest(user=user, candidates=candidates, k=-1), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = scrape(server.metrics_port)
    labels = method_labels(*RANK)
    delta = lambda name, **extra: value(after, name, **labels, **extra) - value(before, name, **labels, **extra)  # noqa: E731
    assert delta("grpc_server_started_total") == 5
    assert delta("grpc_server_handled_total", grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", grpc_code="InvalidArgument") == 2
    assert delta("grpc_server_handled_total", grpc_code="Unknown") == 0
    assert delta("grpc_server_handling_seconds_count") == 5
    assert delta("grpc_server_handling_seconds_bucket", le="+Inf") == 5
    assert delta("grpc_server_handling_seconds_sum") > 0
    assert value(after, "grpc_server_in_flight", grpc_service=RANK[1], grpc_method="Rank") == 0
    # The domain figure: successful calls only, each with its 7 candidates.
    assert value(after, "recsys_ranking_candidates_count") - value(before, "recsys_ranking_candidates_count") == 3
    assert value(after, "recsys_ranking_candidates_sum") - value(before, "recsys_ranking_candidates_sum") == 21
    assert value(after, "recsys_ranking_candidates_bucket", le="10.0") - value(
        before, "recsys_ranking_candidates_bucket", le="10.0") == 3
    assert value(after, "recsys_service_ready") == 1


def test_health_checks_are_counted_too(ranking):
    server, channel = ranking
    before = scrape(server.metrics_port)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(server.metrics_port)
    labels = method_labels("unary", "grpc.health.v1.Health", "Check")
    for code, count in (("OK", 1), ("NotFound", 1)):
        assert value(after, "grpc_server_handled_total", **labels, grpc_code=code) - value(
            before, "grpc_server_handled_total", **labels, grpc_code=code) == count


class _Probe:
    """Handlers that end every way a servicer can."""

    @handle_errors
    def Mapped(self, request, context):
        raise NotFound("no such thing")

    def Aborts(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def Raises(self, request, context):
        raise RuntimeError("a bug")

    def SetsCode(self, request, context):
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not now")
        return b""

    def Fine(self, request, context):
        return request

    def Stream(self, request, context):
        yield request
        yield request

    def StreamAborts(self, request, context):
        yield request
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")

    def Slow(self, request, context):
        time.sleep(0.5)  # beyond the caller's deadline; the reply is dropped
        return request

    def Endless(self, request, context):
        while context.is_active():
            yield request
            time.sleep(0.02)


def test_status_codes_are_read_however_the_handler_ends():
    server, port = build_server("127.0.0.1:0", 2, [], "probe", metrics_port=0)
    probe = _Probe()
    identity = {"request_deserializer": None, "response_serializer": None}
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(probe, name), **identity)
        for name in ("Mapped", "Aborts", "Raises", "SetsCode", "Fine")
    }
    handlers["Stream"] = grpc.unary_stream_rpc_method_handler(probe.Stream, **identity)
    handlers["StreamAborts"] = grpc.unary_stream_rpc_method_handler(probe.StreamAborts, **identity)
    handlers["Slow"] = grpc.unary_unary_rpc_method_handler(probe.Slow, **identity)
    handlers["Endless"] = grpc.unary_stream_rpc_method_handler(probe.Endless, **identity)
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", handlers),))
    server.readiness.start(lambda: None)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            expected = {
                "Mapped": grpc.StatusCode.NOT_FOUND,
                "Aborts": grpc.StatusCode.PERMISSION_DENIED,
                "Raises": grpc.StatusCode.UNKNOWN,
                "SetsCode": grpc.StatusCode.FAILED_PRECONDITION,
            }
            for name, code in expected.items():
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(f"/test.Probe/{name}")(b"x", timeout=5)
                assert caught.value.code() == code, name
            assert channel.unary_unary("/test.Probe/Fine")(b"x", timeout=5) == b"x"
            assert list(channel.unary_stream("/test.Probe/Stream")(b"x", timeout=5)) == [b"x", b"x"]
            with pytest.raises(grpc.RpcError) as caught:
                list(channel.unary_stream("/test.Probe/StreamAborts")(b"x", timeout=5))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/test.Probe/Missing")(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/test.Probe/Slow")(b"x", timeout=0.1)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = channel.unary_stream("/test.Probe/Endless")(b"x", timeout=5)
            assert next(stream) == b"x"
            stream.cancel()
            # Both handlers finish after their callers gave up.
            give_up = time.monotonic() + 5
            while time.monotonic() < give_up:
                samples = scrape(server.metrics_port)
                if value(samples, "grpc_server_in_flight", grpc_service="test.Probe", grpc_method="Endless") == 0 and \
                        value(samples, "grpc_server_in_flight", grpc_service="test.Probe", grpc_method="Slow") == 0:
                    break
                time.sleep(0.05)
        samples = scrape(server.metrics_port)
    finally:
        server.stop(None).wait(5)

    def handled(kind, method, code):
        return value(samples, "grpc_server_handled_total", **method_labels(kind, "test.Probe", method), grpc_code=code)

    assert handled("unary", "Mapped", "NotFound") == 1
    assert handled("unary", "Aborts", "PermissionDenied") == 1
    assert handled("unary", "Raises", "Unknown") == 1
    assert handled("unary", "SetsCode", "FailedPrecondition") == 1
    assert handled("unary", "Fine", "OK") == 1
    assert handled("server_stream", "Stream", "OK") == 1
    assert handled("server_stream", "StreamAborts", "ResourceExhausted") == 1
    # What the caller got, not what the handler did after it had gone.
    assert handled("unary", "Slow", "DeadlineExceeded") == 1 and handled("unary", "Slow", "OK") == 0
    assert handled("server_stream", "Endless", "Canceled") == 1
    for kind, method in [("unary", m) for m in expected] + [("unary", "Fine"), ("server_stream", "Stream")]:
        assert value(samples, "grpc_server_handling_seconds_count", **method_labels(kind, "test.Probe", method)) == 1
        assert value(samples, "grpc_server_in_flight", grpc_service="test.Probe", grpc_method=method) == 0
    # Unknown methods never reach a handler: nothing to label.
    assert not any(labels and ("grpc_method", "Missing") in labels for _, labels in samples)


class _AsyncProbe:
    """The same endings from async handlers, what the platform's servicers are."""

    @handle_errors
    async def Mapped(self, request, context):
        raise NotFound("no such thing")

    async def Aborts(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    async def Raises(self, request, context):
        raise RuntimeError("a bug")

    async def SetsCode(self, request, context):
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not now")
        return b""

    async def Fine(self, request, context):
        return request

    async def Stream(self, request, context):
        yield request
        yield request

    async def Written(self, request, context):  # writes instead of yielding, as health Watch does
        await context.write(request)

    async def Slow(self, request, context):
        await asyncio.sleep(0.5)  # beyond the caller's deadline: the server cancels it
        return request

    async def Endless(self, request, context):
        while True:
            yield request
            await asyncio.sleep(0.02)


def test_status_codes_of_async_handlers():
    server, port = build_server("127.0.0.1:0", 2, [], "async-probe", metrics_port=0)
    probe = _AsyncProbe()
    identity = {"request_deserializer": None, "response_serializer": None}
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(probe, name), **identity)
        for name in ("Mapped", "Aborts", "Raises", "SetsCode", "Fine", "Slow")
    }
    for name in ("Stream", "Written", "Endless"):
        handlers[name] = grpc.unary_stream_rpc_method_handler(getattr(probe, name), **identity)
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Async", handlers),))
    server.readiness.start(lambda: None)
    server.start()
    expected = {
        "Mapped": grpc.StatusCode.NOT_FOUND,
        "Aborts": grpc.StatusCode.PERMISSION_DENIED,
        "Raises": grpc.StatusCode.UNKNOWN,
        "SetsCode": grpc.StatusCode.FAILED_PRECONDITION,
    }
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, code in expected.items():
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(f"/test.Async/{name}")(b"x", timeout=5)
                assert caught.value.code() == code, name
            assert channel.unary_unary("/test.Async/Fine")(b"x", timeout=5) == b"x"
            assert list(channel.unary_stream("/test.Async/Stream")(b"x", timeout=5)) == [b"x", b"x"]
            assert list(channel.unary_stream("/test.Async/Written")(b"x", timeout=5)) == [b"x"]
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/test.Async/Slow")(b"x", timeout=0.1)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = channel.unary_stream("/test.Async/Endless")(b"x", timeout=5)
            assert next(stream) == b"x"
            stream.cancel()
            give_up = time.monotonic() + 5
            while value(scrape(server.metrics_port), "grpc_server_in_flight", grpc_service="test.Async",
                        grpc_method="Endless") != 0:
                assert time.monotonic() < give_up, "the cancelled stream is still in flight"
                time.sleep(0.05)
        samples = scrape(server.metrics_port)
    finally:
        server.stop(None).wait(5)

    def handled(kind, method, code):
        return value(samples, "grpc_server_handled_total", **method_labels(kind, "test.Async", method), grpc_code=code)

    assert handled("unary", "Mapped", "NotFound") == 1
    assert handled("unary", "Aborts", "PermissionDenied") == 1
    assert handled("unary", "Raises", "Unknown") == 1
    assert handled("unary", "SetsCode", "FailedPrecondition") == 1
    assert handled("unary", "Fine", "OK") == 1
    assert handled("server_stream", "Stream", "OK") == 1
    assert handled("server_stream", "Written", "OK") == 1
    assert handled("unary", "Slow", "DeadlineExceeded") == 1 and handled("unary", "Slow", "OK") == 0
    assert handled("server_stream", "Endless", "Canceled") == 1
    for method in ("Slow", "Endless", *expected):
        assert value(samples, "grpc_server_in_flight", grpc_service="test.Async", grpc_method=method) == 0


def test_the_endpoint_closes_with_the_server():
    server, _ = build_server("127.0.0.1:0", 1, [], "closing", metrics_port=0)
    server.start()
    port = server.metrics_port
    scrape(port)
    server.stop(None).wait(5)
    for _ in range(50):
        try:
            scrape(port)
        except OSError:
            return
        time.sleep(0.1)
    pytest.fail("the metrics endpoint still answers after the server stopped")


def test_no_endpoint_without_a_metrics_port():
    server, _ = build_server("127.0.0.1:0", 1, [], "silent")
    assert server.metrics_port is None
    server.stop(None)


def test_helpers():
    assert split_method("/recsys.gateway.v1.GatewayService/Recommend") == ("recsys.gateway.v1.GatewayService", "Recommend")
    assert listen_host("0.0.0.0:50051") == "0.0.0.0"
    assert listen_host("127.0.0.1:0") == "127.0.0.1"
    assert listen_host("[::]:50051") == "::"
    assert listen_host("localhost:1") == "127.0.0.1"


def test_metrics_port_config_from_env():
    from services.gateway.config import GatewayConfig
    from services.profile.config import ProfileConfig

    assert GatewayConfig.from_env({}).metrics_port == 0
    assert GatewayConfig.from_env({"GATEWAY_METRICS_PORT": "9090"}).metrics_port == 9090
    with pytest.raises(ValueError):
        ProfileConfig.from_env({"PROFILE_METRICS_PORT": "70000"})


# --- each service's own figures, on the in-process stack ------------------------------


@pytest.mark.integration
def test_gateway_counts_recommendations_by_path(stack, dataset):
    port = stack.servers["gateway"].metrics_port
    before = scrape(port)
    shopper = dataset.interactions.user_id.iloc[0]
    with stack.channel("gateway") as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        known = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30)
        unknown = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=f"nobody-{uuid.uuid4()}", k=5), timeout=30)
        with pytest.raises(grpc.RpcError):
            gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=0), timeout=30)
    assert known.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
    assert unknown.path == gateway_pb2.RECOMMENDATION_PATH_COLD_START
    after = scrape(port)
    for path, count in (("personalised", 1), ("cold_start", 1), ("fallback", 0)):
        assert value(after, "recsys_recommendations_total", path=path) - value(
            before, "recsys_recommendations_total", path=path) == count, path
    assert ("recsys_recommendations_total", (("path", "fallback"),)) in after  # shown from the start, at 0
    labels = method_labels("unary", "recsys.gateway.v1.GatewayService", "Recommend")
    assert value(after, "grpc_server_handled_total", **labels, grpc_code="InvalidArgument") - value(
        before, "grpc_server_handled_total", **labels, grpc_code="InvalidArgument") == 1
    # The gateway's calls show up downstream, e.g. every Recommend asked for the shopper's signals.
    profile_port = stack.servers["profile"].metrics_port
    signals = method_labels("unary", "recsys.profile.v1.ProfileService", "GetShopperSignals")
    assert value(scrape(profile_port), "grpc_server_handled_total", **signals, grpc_code="OK") >= 2


@pytest.mark.integration
def test_profile_counts_ingested_and_duplicate_events(stack, dataset):
    port = stack.servers["profile"].metrics_port
    before = scrape(port)
    item_id = dataset.items.item_id.iloc[0]
    key = f"metrics-{uuid.uuid4()}"
    events = [
        common_pb2.Event(user_id="metrics-shopper", item_id=item_id, type=common_pb2.EVENT_TYPE_VIEW, idempotency_key=f"{key}-{n}")
        for n in range(3)
    ]
    with stack.channel("profile") as channel:
        profile = profile_pb2_grpc.ProfileServiceStub(channel)
        profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=10)
        profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events[:2]), timeout=10)
    after = scrape(port)
    assert value(after, "recsys_profile_events_ingested_total") - value(before, "recsys_profile_events_ingested_total") == 3
    assert value(after, "recsys_profile_events_duplicates_total") - value(before, "recsys_profile_events_duplicates_total") == 2


@pytest.mark.integration
def test_embedding_reports_index_size_per_category_and_encoder_readiness(stack, dataset):
    samples = scrape(stack.servers["embedding"].metrics_port)
    sizes = {
        dict(labels)["category"]: count
        for (name, labels), count in samples.items() if name == "recsys_embedding_index_items"
    }
    from recsys_core.data import paths
    from recsys_core.data.retail import retail_items_and_events

    items = pd.concat([dataset.items, retail_items_and_events(paths.BUNDLED_RETAIL_DIR)[0]], ignore_index=True)
    counts = items.groupby("category").item_id.nunique()
    # Every category of the data; other tests sharing this stack may have
    # upserted items into categories of their own.
    assert set(counts.index) <= set(sizes)
    for category, count in counts.items():
        assert sizes[category] >= count, category  # tests may upsert more
    assert value(samples, "recsys_embedding_encoder_ready") == 1
    assert value(samples, "recsys_service_ready") == 1

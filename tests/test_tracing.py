"""OpenTelemetry tracing across the services: one Recommend is one trace with
spans from the gateway, profile, embedding and ranking linked parent to
child; the trace continues from a caller's traceparent, into Triton, and into
log lines; with tracing off nothing is installed; bad settings stop a service
at start.

The traced stack is a second, in-process stack like conftest's `stack`, its
four services exporting to one InMemorySpanExporter (each with its own
provider and service.name, as in production). One service also exports over
real OTLP/gRPC to a small collector in this process."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys.common.v1 import common_pb2
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.otlp_receiver import OtlpHttpReceiver, OtlpReceiver
from recsys_core.rpc.tracing import TracingConfig, trace_logging
from tests.conftest import gateway_channel, secured, service_channel, start, tls_material

RECOMMEND = "/recsys.gateway.v1.GatewayService/Recommend"
SERVICES = ("gateway", "profile", "embedding", "ranking")
SERVER, CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT


@pytest.fixture(scope="module")
def exporter():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(triton_server, value_model, tmp_path_factory, exporter):
    """The four services with tracing on, all exporting to `exporter`."""
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server as create_ranking

    tracing = TracingConfig(mode="console", exporter=exporter)
    servers, addresses = {}, {}
    servers["embedding"], addresses["embedding"] = start(create_embedding(EmbeddingConfig(
        address="127.0.0.1:0", encoder="triton", triton_url=triton_server.grpc_url, tracing=tracing,
        **secured("embedding"))))
    servers["ranking"], addresses["ranking"] = start(create_ranking(RankingConfig(
        address="127.0.0.1:0", tracing=tracing, **secured("ranking"))))
    servers["profile"], addresses["profile"] = start(create_profile(ProfileConfig(
        address="127.0.0.1:0", store_path=str(tmp_path_factory.mktemp("traced") / "events.sqlite3"),
        embedding_address=addresses["embedding"], tracing=tracing, **secured("profile"))))
    servers["gateway"], addresses["gateway"] = start(create_gateway(GatewayConfig(
        address="127.0.0.1:0", profile_address=addresses["profile"], embedding_address=addresses["embedding"],
        ranking_address=addresses["ranking"], tracing=tracing, **secured("gateway"))))
    yield servers, addresses
    for server in servers.values():
        server.stop(None)


def flushed(servers, exporter, complete=lambda spans: True, timeout: float = 10.0) -> list:
    """The spans `servers` (ManagedServers or Tracings, by name) exported so far,
    once `complete(spans)`: a server span ends just after its reply is sent,
    so the caller may hear before it is done."""
    give_up = time.monotonic() + timeout
    while True:
        for server in servers.values():
            assert getattr(server, "tracing", server).force_flush()
        spans = list(exporter.get_finished_spans())
        if complete(spans) or time.monotonic() > give_up:
            return spans
        time.sleep(0.05)


def whole(spans) -> bool:
    """The gateway's Recommend span is in, and every client span's server span."""
    parents = {span.parent.span_id for span in spans if span.kind == SERVER and span.parent is not None}
    return any(span.name == RECOMMEND for span in spans) and all(
        span.context.span_id in parents for span in spans if span.kind == CLIENT and span.name.startswith("/recsys."))


def service_of(span) -> str:
    return span.resource.attributes["service.name"].removeprefix("recsys-")


def one_candidate() -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(candidates=[ranking_pb2.Candidate(item_id="a", features=common_pb2.CandidateFeatures())])


def parent_id(span):
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture(scope="module")
def shopper(dataset):
    """A shopper with history in two or more categories: the personalised path, every hop."""
    categories = dataset.interactions.groupby("user_id")["category"].nunique()
    return sorted(categories[categories >= 2].index)[0]


@pytest.fixture
def client_span():
    """A caller's own span, as a traced client would have; its context goes out as `traceparent`."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    with provider.get_tracer("test-client").start_as_current_span("caller") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert "traceparent" in carrier
        yield span, tuple(carrier.items())


@pytest.fixture
def log_lines():
    """What the services log, formatted as setup_logging formats every service's lines."""
    buffer = io.StringIO()
    handler = trace_logging(logging.StreamHandler(buffer), "test")
    root = logging.getLogger()
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


def test_one_recommend_is_one_trace_through_every_service(traced, exporter, shopper):
    servers, addresses = traced
    with gateway_channel(addresses["gateway"]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30)  # warm: categories cached
        flushed(servers, exporter, whole)
        exporter.clear()
        reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30)
    assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
    spans = flushed(servers, exporter, whole)

    # One trace, nothing else: health checks and other calls leave none.
    assert len({span.context.trace_id for span in spans}) == 1, [(s.name, service_of(s)) for s in spans]
    assert {service_of(span) for span in spans} == set(SERVICES)
    roots = [span for span in spans if span.parent is None]
    assert [(root.name, root.kind, service_of(root)) for root in roots] == [(RECOMMEND, SERVER, "gateway")]
    root = roots[0]
    assert root.attributes["rpc.method"] == "Recommend" and root.attributes["rpc.grpc.status_code"] == 0

    # The gateway's calls downstream: client spans under its server span, each
    # the parent of the callee's server span of the same method.
    clients = [span for span in spans if span.kind == CLIENT and service_of(span) == "gateway"]
    assert {span.name for span in clients} >= {
        "/recsys.profile.v1.ProfileService/GetShopperSignals",
        "/recsys.embedding.v1.EmbeddingService/RetrieveCandidates",
        "/recsys.profile.v1.ProfileService/GetItemPopularity",
        "/recsys.ranking.v1.RankingService/Rank",
    }
    assert all(parent_id(span) == root.context.span_id for span in clients)
    servers_spans = [span for span in spans if span.kind == SERVER and span is not root]
    assert len(servers_spans) == len(clients)
    by_id = {span.context.span_id: span for span in spans}
    for server_span in servers_spans:
        caller = by_id[parent_id(server_span)]
        assert caller.kind == CLIENT and caller.name == server_span.name
        callee = server_span.name.split(".")[1]  # /recsys.<service>.v1...
        assert service_of(server_span) == callee
    assert {service_of(span) for span in servers_spans} == {"profile", "embedding", "ranking"}
    # Children end before their parents: the spans nest in time too.
    for span in spans:
        if span.parent is not None:
            parent = by_id[span.parent.span_id]
            assert parent.start_time <= span.start_time and span.end_time <= parent.end_time


def test_the_trace_continues_from_the_caller_and_its_ids_are_on_the_log_lines(traced, exporter, client_span,
                                                                                log_lines, shopper):
    """A caller's traceparent passes TLS and the access rules (it is no
    credential); a refused call's log line carries the trace and span ids."""
    servers, addresses = traced
    caller, metadata = client_span
    trace_id = caller.get_span_context().trace_id
    exporter.clear()
    other_shopper = tls_material().token("amazon-someone-else", ["shopper"], tenant="amazon")
    with gateway_channel(addresses["gateway"], token=other_shopper) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    spans = flushed(servers, exporter, whole)
    [span] = [s for s in spans if s.name == RECOMMEND]
    assert span.context.trace_id == trace_id and parent_id(span) == caller.get_span_context().span_id
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    # (Its status stays unset: for a server, semconv counts only server faults as errors.)
    [line] = [line for line in log_lines.getvalue().splitlines() if f"denied {RECOMMEND}" in line]
    assert line.endswith(f" trace_id={trace_id:032x} span_id={span.context.span_id:016x}"), line

    # Allowed, the same caller's trace runs through every service.
    exporter.clear()
    with gateway_channel(addresses["gateway"]) as channel:
        gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
            gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30, metadata=metadata)
    spans = flushed(servers, exporter, whole)
    assert {span.context.trace_id for span in spans} == {trace_id}
    assert {service_of(span) for span in spans} == set(SERVICES)
    # Any active span's ids, the caller's own too; outside every span (a new thread), none.
    logger = logging.getLogger("tests.tracing")
    logger.warning("in the caller's span")
    assert log_lines.getvalue().splitlines()[-1].endswith(
        f"in the caller's span trace_id={trace_id:032x} span_id={caller.get_span_context().span_id:016x}")
    outside = threading.Thread(target=logger.warning, args=("outside any span",))
    outside.start()
    outside.join()
    assert log_lines.getvalue().splitlines()[-1].endswith(": outside any span")


def test_the_embedding_service_traces_its_call_to_triton(traced, exporter, client_span):
    from services.embedding.config import EmbeddingConfig

    servers, addresses = traced
    caller, metadata = client_span
    exporter.clear()
    with service_channel(addresses["embedding"], "embedding") as channel:
        reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedTexts(
            embedding_pb2.EmbedTextsRequest(texts=["a red running shoe", "a kettle"]), timeout=30, metadata=metadata)
    assert len(reply.vectors) == 2
    spans = flushed(servers, exporter, lambda spans: any(s.name.endswith("/EmbedTexts") for s in spans))
    [server_span] = [s for s in spans if s.name == "/recsys.embedding.v1.EmbeddingService/EmbedTexts"]
    assert parent_id(server_span) == caller.get_span_context().span_id
    # Encoding runs in the server's blocking pool: the span's context went with it.
    [infer] = [s for s in spans if s.name == "/inference.GRPCInferenceService/ModelInfer"]
    assert infer.kind == CLIENT and service_of(infer) == "embedding"
    assert parent_id(infer) == server_span.context.span_id
    assert infer.context.trace_id == caller.get_span_context().trace_id
    assert infer.attributes["triton.model.name"] == EmbeddingConfig().triton_model
    assert infer.attributes["triton.rows"] == 2 and infer.attributes["rpc.method"] == "ModelInfer"


def test_triton_continues_the_trace_of_the_call_to_it(exported_encoder, exported_review_classifier, tmp_path):
    """With its own tracing on (recsys_core.models.triton.tracing_args), Triton
    reads the traceparent our client sends: its spans join our trace under
    the client's ModelInfer span."""
    from recsys_core.data import paths
    from recsys_core.models.triton import TritonServer, tracing_args
    from recsys_core.models.triton_encoder import TritonEncoder

    ours = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ours))
    tracer = provider.get_tracer("test")
    with OtlpHttpReceiver() as collector:
        flags = [*tracing_args(collector.url), "--trace-config", "opentelemetry,bsp_schedule_delay=100"]
        with TritonServer(paths.MODEL_REPO, extra_args=flags, log_path=tmp_path / "triton.log") as server:
            with TritonEncoder(server.grpc_url, tracer=tracer) as encoder:
                with tracer.start_as_current_span("a traced call"):
                    encoder.encode(["a red running shoe"])
                give_up = time.monotonic() + 20
                while time.monotonic() < give_up and not any(s["name"] == "InferRequest" for s in collector.spans):
                    time.sleep(0.1)
    [client] = [span for span in ours.get_finished_spans() if span.name.endswith("/ModelInfer")]
    [request] = [span for span in collector.spans if span["name"] == "InferRequest"]
    assert request["trace_id"] == format(client.context.trace_id, "032x")
    assert request["parent_span_id"] == format(client.context.span_id, "016x")
    assert request["resource"]["service.name"] == "recsys-triton"


def test_with_tracing_off_nothing_is_installed_and_no_span_is_made(stack, client_span, log_lines, shopper):
    """conftest's stack runs with tracing off (the default): a caller's
    traceparent is not even read, so refused calls log no trace id, and a
    provider installed globally (as auto-instrumentation would) gets nothing."""
    assert not any(server.tracing.enabled for server in stack.servers.values())
    global_exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(global_exporter))
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider  # set_tracer_provider refuses a second one per process
    try:
        _, metadata = client_span
        other_shopper = tls_material().token("amazon-someone-else", ["shopper"], tenant="amazon")
        with gateway_channel(stack.gateway, token=other_shopper) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                    gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with gateway_channel(stack.gateway) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=shopper, k=5), timeout=30, metadata=metadata)
        assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
    finally:
        trace._TRACER_PROVIDER = previous
    assert global_exporter.get_finished_spans() == ()
    [line] = [line for line in log_lines.getvalue().splitlines() if f"denied {RECOMMEND}" in line]
    assert "trace_id=" not in line


def test_plaintext_development_channels_carry_the_trace_beside_the_declared_identity():
    """In plaintext mode an aio channel has two interceptors adding metadata
    (the caller's declared identity, the trace context): both arrive."""
    from recsys_core.rpc.grpc_util import aio_channel
    from recsys_core.rpc.runtime import EventLoopThread
    from recsys_core.rpc.tracing import Tracing
    from recsys_core.rpc.transport import Security
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    spans_out = InMemorySpanExporter()
    tracing = TracingConfig(mode="console", exporter=spans_out)
    server, address = start(create_server(RankingConfig(address="127.0.0.1:0", security=Security.plaintext("ranking"),
                                                        tracing=tracing)))
    gateway = Tracing.start(tracing, "gateway")
    loop = EventLoopThread("test-caller")

    async def rank():
        async with aio_channel(address, Security.plaintext("gateway"), "ranking", gateway) as channel:
            return await ranking_pb2_grpc.RankingServiceStub(channel).Rank(one_candidate(), timeout=5)

    try:
        # Rank is for the gateway's identity only (recsys_core/rpc/access.py): declared, here.
        assert [c.item_id for c in loop.run(rank).candidates] == ["a"]
        # The client span ends in a done-callback of the call, on the caller's loop.
        spans = flushed({"ranking": server, "gateway": gateway}, spans_out,
                        lambda spans: {span.kind for span in spans} == {CLIENT, SERVER})
    finally:
        server.stop(None).wait(10)
        gateway.shutdown()
        loop.stop()
    [client] = [span for span in spans if span.kind == CLIENT]
    [served] = [span for span in spans if span.kind == SERVER]
    assert (service_of(client), service_of(served)) == ("gateway", "ranking")
    assert parent_id(served) == client.context.span_id and served.context.trace_id == client.context.trace_id


# -- OTLP, to a real collector -------------------------------------------------------

def test_spans_reach_an_otlp_collector():
    """The production exporter, over OTLP/gRPC to a receiver in this process."""
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    with OtlpReceiver() as collector:
        config = RankingConfig.from_env({"RANKING_TRACING": "otlp", "RANKING_TRACING_ENDPOINT": collector.endpoint})
        server, address = start(create_server(RankingConfig(address="127.0.0.1:0", tracing=config.tracing,
                                                            **secured("ranking"))))
        try:
            with service_channel(address, "ranking") as channel:
                reply = ranking_pb2_grpc.RankingServiceStub(channel).Rank(one_candidate(), timeout=5)
            assert [c.item_id for c in reply.candidates] == ["a"]
        finally:
            server.stop(None).wait(10)  # stopping sends what is still buffered
        spans = list(collector.spans())
        assert [(resource["service.name"], span.name) for resource, span in spans] == [
            ("recsys-ranking", "/recsys.ranking.v1.RankingService/Rank")]
        assert spans[0][1].kind == spans[0][1].SPAN_KIND_SERVER


# -- configuration ----------------------------------------------------------------

def test_tracing_is_off_unless_configured_and_reads_the_standard_variables():
    from services.gateway.config import GatewayConfig

    assert not GatewayConfig.from_env({}).tracing.enabled
    # The standard OTEL_* variables fill in what GATEWAY_TRACING_* leaves unset.
    config = GatewayConfig.from_env({
        "GATEWAY_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}).tracing
    assert (config.mode, config.endpoint, config.sample_ratio) == ("otlp", "https://collector.example:4317", 0.25)
    config = GatewayConfig.from_env({
        "GATEWAY_TRACING": "otlp", "GATEWAY_TRACING_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://elsewhere:4317", "GATEWAY_TRACING_SAMPLE_RATIO": "0.5",
        "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_TRACES_SAMPLER": "traceidratio"}).tracing
    assert (config.endpoint, config.sample_ratio) == ("http://127.0.0.1:4317", 0.5)
    assert not GatewayConfig.from_env({"GATEWAY_TRACING": "otlp", "OTEL_SDK_DISABLED": "true"}).tracing.enabled
    # While off, the shared OTEL_* variables (perhaps meant for something else) are not judged.
    assert not GatewayConfig.from_env({"OTEL_TRACES_SAMPLER": "jaeger_remote"}).tracing.enabled


@pytest.mark.parametrize("environ, complaint", [
    ({"RANKING_TRACING": "jaeger"}, "RANKING_TRACING='jaeger' must be one of off, otlp, console, file"),
    ({"RANKING_TRACING": "otlp", "RANKING_TRACING_SAMPLE_RATIO": "1.5"}, "RANKING_TRACING_SAMPLE_RATIO=1.5 is above"),
    ({"RANKING_TRACING_SAMPLE_RATIO": "half"}, "RANKING_TRACING_SAMPLE_RATIO='half' is not a number"),
    ({"RANKING_TRACING": "file"}, "RANKING_TRACING=file needs RANKING_TRACING_FILE"),
    ({"RANKING_TRACING": "otlp", "RANKING_TRACING_ENDPOINT": "collector:4317"}, "must be http://host:port"),
    ({"RANKING_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"},
     "OTEL_EXPORTER_OTLP_ENDPOINT='grpc://collector:4317' must be http://host:port"),
    ({"RANKING_TRACING": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "only the grpc exporter"),
    ({"RANKING_TRACING": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG=2 must be between 0 and 1"),
    ({"RANKING_TRACING": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
])
def test_bad_tracing_settings_fail_fast(environ, complaint):
    from services.ranking.config import RankingConfig

    with pytest.raises(ConfigError) as error:
        RankingConfig.from_env(environ)
    assert complaint in str(error.value)


def test_a_service_with_bad_tracing_settings_does_not_start(tmp_path):
    """The process stops at start with the variable named, before binding anything."""
    env = {**os.environ, "RANKING_INSECURE": "1", "RANKING_ADDRESS": "127.0.0.1:0", "RANKING_TRACING": "zipkin"}
    done = subprocess.run([sys.executable, "-m", "services.ranking.server"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode != 0
    assert "RANKING_TRACING='zipkin' must be one of off, otlp, console, file" in done.stderr


# -- the benchmark ------------------------------------------------------------------

@pytest.mark.integration
def test_the_tracing_benchmark_measures_both_sides(tmp_path, exported_encoder):
    """bench/tracing.py end to end, small: two stacks as real processes, and
    the spans of the traced one received over OTLP."""
    from recsys_core.data import paths

    out = tmp_path / "tracing.json"
    run = subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "bench" / "tracing.py"), "--requests", "15", "--concurrency", "1",
         "--seconds", "10", "--json", str(out)],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    [row] = report["summary"]
    assert row["off_p99_ms"] > 0 and row["on_p99_ms"] > 0 and row["p99_ms_ratio"] > 0
    runs = {run["tracing"]: run for run in report["runs"]}
    assert runs["off"]["levels"][0]["ok"] == runs["on"]["levels"][0]["ok"] == 15
    # Every traced Recommend is at least the gateway's span and one call downstream, each end.
    assert runs["on"]["spans_received"] >= 3 * runs["on"]["recommend_calls"]
    assert "spans_received" not in runs["off"]

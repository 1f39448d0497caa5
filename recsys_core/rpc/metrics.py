"""Prometheus metrics of every server: one gRPC server interceptor for the
RPC figures, per-server registries for the services' own, and the HTTP
endpoint Prometheus scrapes.

The RPC metrics follow go-grpc-prometheus, so its dashboards and alerts work
unchanged: the same names, labels and status code spellings ("OK",
"InvalidArgument", "Unavailable", ...):

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}   histogram
    grpc_server_in_flight{grpc_service,grpc_method}                      gauge

The status is what the caller receives: the code of `context.abort` (what
`grpc_util.handle_errors` does for every failure) or of `context.set_code`;
DEADLINE_EXCEEDED or CANCELLED when the call ended before the handler did;
UNKNOWN for an exception that escaped the handler, as grpcio itself answers.
A call the server's blocking pool refuses (its queue is full) counts as
ResourceExhausted like any other reply; so do the health checks and
reflection calls, and each open health Watch stream is in flight until it ends.

Each server has its own registry, so servers sharing a process (the tests'
in-process stack) keep their figures apart. Services add their domain figures
to `ServerMetrics.registry`, and may watch the replies of chosen methods with
`on_reply` so that neither servicers nor domain code need to know about metrics.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from recsys_core.rpc.runtime import WrappingInterceptor

log = logging.getLogger(__name__)

# No `*_created` series beside every counter and histogram (go-grpc-prometheus
# has none either; they double the series count). Process-wide, as the client's switch is.
disable_created_metrics()

# Seconds: from a cache hit (sub-millisecond) to the gateway's default budget (5 s) and beyond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# grpc.StatusCode -> the name Go's codes.Code.String() gives it (go-grpc-prometheus' label values).
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"

ReplyObserver = Callable[[object, object], None]


def split_method(full_method: str) -> tuple[str, str]:
    """"/recsys.gateway.v1.GatewayService/Recommend" -> (service, method)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def listen_host(address: str) -> str:
    """The host part of a gRPC listen address, for the metrics endpoint beside
    it: "0.0.0.0:50051" -> "0.0.0.0", "127.0.0.1:0" -> "127.0.0.1", "[::]:1" -> "::"."""
    host = address.rpartition(":")[0].strip("[]")
    if host in ("", "*"):
        return "0.0.0.0"
    return "127.0.0.1" if host == "localhost" else host


class ServerMetrics:
    """The metrics of one gRPC server and, once `serve_http` ran, their endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:
            registry = CollectorRegistry()
            # process_cpu_seconds_total, process_resident_memory_bytes, ... of this process.
            ProcessCollector(registry=registry)
        self.registry = registry
        method_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", method_labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            [*method_labels, "grpc_code"], registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from the start of an RPC to its status, in seconds.",
            method_labels, buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight", "RPCs being handled right now.", ["grpc_service", "grpc_method"],
            registry=self.registry,
        )
        self._observers: dict[tuple[str, str], list[ReplyObserver]] = {}
        self._http = None
        self._http_thread: threading.Thread | None = None
        self.port: int | None = None

    # -- services' hooks ----------------------------------------------------

    def on_reply(self, service: str, method: str, observer: ReplyObserver) -> None:
        """Call `observer(request, reply)` after each successful unary call of
        service/method. An observer that raises is logged, never fails the call."""
        self._observers.setdefault((service, method), []).append(observer)

    def track_readiness(self, is_ready: Callable[[], bool]) -> None:
        """`recsys_service_ready`: 1 once the service has loaded (health SERVING), read at scrape time."""
        gauge = Gauge(
            "recsys_service_ready", "1 once the service has loaded its model, index or store (health SERVING).",
            registry=self.registry,
        )
        gauge.set_function(lambda: 1.0 if is_ready() else 0.0)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _MetricsInterceptor(self)

    # -- the endpoint ----------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) in a daemon thread; returns the port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_address[1]
        return self.port

    def close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- recording -------------------------------------------------------------

    def _begin(self, kind: str, service: str, method: str) -> float:
        self.started.labels(kind, service, method).inc()
        self.in_flight.labels(service, method).inc()
        return time.perf_counter()

    def _end(self, kind: str, service: str, method: str, began: float, code: grpc.StatusCode) -> None:
        self.handling_seconds.labels(kind, service, method).observe(time.perf_counter() - began)
        self.handled.labels(kind, service, method, GO_CODE_NAMES.get(code, code.name)).inc()
        self.in_flight.labels(service, method).dec()

    def _observe(self, service: str, method: str, request, reply) -> None:
        for observer in self._observers.get((service, method), ()):
            try:
                observer(request, reply)
            except Exception:  # noqa: BLE001 - a metric must never fail a call
                log.exception("metrics observer of %s/%s failed", service, method)


def _final_code(context: grpc.aio.ServicerContext, ended: type[BaseException] | None) -> grpc.StatusCode:
    """The status the caller gets, from how the handler ended (`ended`: the
    type of the exception that ended it, None when it returned):
    DEADLINE_EXCEEDED or CANCELLED when the call ended under the handler (the
    aio server cancels the handler when the caller's deadline passes or it
    goes away); else the code the handler set (abort, set_code); else
    DEADLINE_EXCEEDED when it returned after the deadline (the reply is
    dropped), OK, or UNKNOWN when an exception escaped without a code
    (grpcio's answer)."""
    remaining = context.time_remaining()
    past_deadline = remaining is not None and remaining <= 0
    if ended is not None and issubclass(ended, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.DEADLINE_EXCEEDED if past_deadline else grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    if ended is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.DEADLINE_EXCEEDED if past_deadline else grpc.StatusCode.OK


class _Recorded:
    """One call's figures: started and in flight on entry; handled, with its
    final code, and its handling time on exit, however the handler ended."""

    def __init__(self, metrics: ServerMetrics, kind: str, service: str, method: str, context):
        self.metrics, self.kind, self.service, self.method, self.context = metrics, kind, service, method, context
        self.code = grpc.StatusCode.UNKNOWN

    def __enter__(self):
        self.began = self.metrics._begin(self.kind, self.service, self.method)
        return self

    def __exit__(self, exc_type, _exc, _tb) -> bool:
        self.code = _final_code(self.context, exc_type)
        self.metrics._end(self.kind, self.service, self.method, self.began, self.code)
        return False


class _MetricsInterceptor(WrappingInterceptor):
    """Wraps every handler of an aio server. The handlers it sees are
    coroutine functions or async generators: sync ones were made async by the
    interceptor after it (grpc_util's, which runs them in the blocking pool)."""

    def __init__(self, metrics: ServerMetrics):
        super().__init__()
        self.metrics = metrics

    def wrap(self, handler, full_method: str):
        m = self.metrics
        service, method = split_method(full_method)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        def recorded(kind: str, context) -> _Recorded:
            return _Recorded(m, kind, service, method, context)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                with recorded(UNARY, context) as call:
                    reply = await behavior(request, context)
                if call.code == grpc.StatusCode.OK:
                    m._observe(service, method, request, reply)
                return reply

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)

        if handler.stream_unary is not None:
            behavior = handler.stream_unary

            async def stream_unary(request_iterator, context):
                with recorded(CLIENT_STREAM, context):
                    return await behavior(request_iterator, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **options)

        def streaming(kind: str, behavior: Callable):
            # A streaming handler either yields its replies (an async
            # generator) or writes them (a coroutine: context.write, as the
            # health service's Watch does); the wrapper takes the same form.
            if inspect.isasyncgenfunction(behavior):
                async def replies(request_or_iterator, context):
                    with recorded(kind, context):
                        async for reply in behavior(request_or_iterator, context):
                            yield reply
                return replies

            async def written(request_or_iterator, context):
                with recorded(kind, context):
                    return await behavior(request_or_iterator, context)
            return written

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming(SERVER_STREAM, handler.unary_stream), **options)
        return grpc.stream_stream_rpc_method_handler(streaming(BIDI_STREAM, handler.stream_stream), **options)

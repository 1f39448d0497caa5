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

Each server has its own registry, so servers sharing a process (the tests'
in-process stack) keep their figures apart. Services add their domain figures
to `ServerMetrics.registry`, and may watch the replies of chosen methods with
`on_reply` so that neither servicers nor domain code need to know about metrics.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

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

    def interceptor(self) -> grpc.ServerInterceptor:
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


def _final_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The status the caller gets: the one the handler set (abort, set_code);
    DEADLINE_EXCEEDED or CANCELLED when the call ended under the handler (the
    caller's deadline passed, or it went away), whatever the handler did then;
    else OK, or UNKNOWN when an exception escaped without a code (grpcio's answer)."""
    code = context.code()
    if code is not None:
        return code
    if not context.is_active():
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        # The wrapped handler per method, built once: continuation() hands out
        # the same handler object for a method on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, *split_method(full_method))
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, service: str, method: str):
        m = self.metrics
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary_unary(request, context):
                began = m._begin(UNARY, service, method)
                failed = True
                try:
                    reply = behavior(request, context)
                    failed = False
                finally:
                    code = _final_code(context, failed)
                    m._end(UNARY, service, method, began, code)
                if code == grpc.StatusCode.OK:
                    m._observe(service, method, request, reply)
                return reply

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)

        if handler.stream_unary is not None:
            behavior = handler.stream_unary

            def stream_unary(request_iterator, context):
                began = m._begin(CLIENT_STREAM, service, method)
                failed = True
                try:
                    reply = behavior(request_iterator, context)
                    failed = False
                    return reply
                finally:
                    m._end(CLIENT_STREAM, service, method, began, _final_code(context, failed))

            return grpc.stream_unary_rpc_method_handler(stream_unary, **options)

        def streamed(kind: str, replies_of: Callable[[], Iterator], context) -> Iterator:
            began = m._begin(kind, service, method)
            failed = True
            try:
                yield from replies_of()
                failed = False
            finally:
                # Closed under us (GeneratorExit) means the call ended: _final_code sees it inactive.
                m._end(kind, service, method, began, _final_code(context, failed))

        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            def unary_stream(request, context):
                return streamed(SERVER_STREAM, lambda: behavior(request, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **options)

        behavior = handler.stream_stream

        def stream_stream(request_iterator, context):
            return streamed(BIDI_STREAM, lambda: behavior(request_iterator, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)

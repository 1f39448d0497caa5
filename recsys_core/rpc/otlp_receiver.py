"""A minimal OTLP/gRPC trace receiver: what a collector's port 4317 answers,
keeping (or only counting) the spans it is sent; and an OTLP/HTTP one (port
4318's /v1/traces), what Triton's own tracing sends.

For the tests and benchmarks, where the services' real OTLP exporter needs
something to talk to and no collector is at hand; not a collector (no
batching, no forwarding). As a process (bench/tracing.py runs it so that
receiving costs the benchmark client nothing):

    python -m recsys_core.rpc.otlp_receiver --port PORT

prints `listening on PORT`, counts spans, and prints `spans N` when stopped
(SIGTERM, SIGINT or stdin closed).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver:
    """An OTLP/gRPC TraceService on `host:port` (0: a free port), plaintext."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True):
        receiver = self
        self.keep = keep
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.span_count = 0
        self._lock = threading.Lock()

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                spans = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
                with receiver._lock:
                    receiver.span_count += spans
                    if receiver.keep:
                        receiver.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self.server.start()

    def spans(self) -> Iterator[tuple[dict[str, str], object]]:
        """(resource attributes, span) for every span kept so far."""
        with self._lock:
            requests = list(self.requests)
        for request in requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield attributes, span

    def stop(self) -> None:
        self.server.stop(None).wait(5)

    def __enter__(self) -> "OtlpReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class OtlpHttpReceiver:
    """OTLP/HTTP traces (POST /v1/traces, JSON or protobuf): what Triton's own
    OpenTelemetry tracing sends (`--trace-config opentelemetry,url=...`). Keeps
    (trace id, span id, parent span id, name, resource attributes) per span,
    ids in hex."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self
        self.spans: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                json_body = "json" in (self.headers.get("Content-Type") or "")
                try:
                    receiver._keep(_json_spans(body) if json_body else _protobuf_spans(body))
                except Exception:  # noqa: BLE001 - a malformed export is refused, not fatal
                    self.send_response(400)
                    self.end_headers()
                    return
                reply = b"{}" if json_body else trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if json_body else "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, name="otlp-http", daemon=True).start()

    def _keep(self, spans: list[dict]) -> None:
        self.spans.extend(spans)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "OtlpHttpReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _json_spans(body: bytes) -> list[dict]:
    """OTLP/JSON: ids are hex strings (not protobuf JSON's base64)."""
    import json

    spans = []
    for resource_spans in json.loads(body).get("resourceSpans", []):
        resource = {a["key"]: next(iter(a["value"].values()), "") for a in
                    resource_spans.get("resource", {}).get("attributes", [])}
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                spans.append({"trace_id": span["traceId"].lower(), "span_id": span["spanId"].lower(),
                              "parent_span_id": span.get("parentSpanId", "").lower(), "name": span["name"],
                              "resource": resource})
    return spans


def _protobuf_spans(body: bytes) -> list[dict]:
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                              "parent_span_id": span.parent_span_id.hex(), "name": span.name, "resource": resource})
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.host, args.port, keep=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Also ends when the parent closes our stdin (or dies).
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(f"listening on {receiver.port}", flush=True)
    stop.wait()
    receiver.stop()
    print(f"spans {receiver.span_count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

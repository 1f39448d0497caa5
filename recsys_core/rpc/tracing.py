"""OpenTelemetry tracing of every gRPC hop, off unless a service's
configuration turns it on; and trace ids on log lines.

When on, a service gets a TracerProvider of its own (resource
`service.name=recsys-<service>`), the official grpc instrumentation's
interceptors on its server (outermost, so a span covers the access check,
the metrics and the handler) and on every channel it opens to another
service, and a tracer for the spans it makes itself (the Triton client's).
Context travels in the W3C `traceparent` metadata (OTEL_PROPAGATORS), which
the access rules ignore: only `authorization`, `x-api-key` and, in plaintext
development mode, `x-recsys-dev-service` say who calls.

When off (the default) nothing is installed: no interceptor, no provider,
and the SDK is not even imported; the only cost left is the log filter's
look-up of the current span, which finds none.

Per-service settings (`<P>` the service's prefix, e.g. GATEWAY_), with the
standard OpenTelemetry variables as fallbacks:

    <P>TRACING               off (default) | otlp | console | file
    <P>TRACING_ENDPOINT      OTLP/gRPC collector, http://host:4317 (plaintext) or https://...;
                             else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT,
                             else http://localhost:4317
    <P>TRACING_FILE          where `file` writes spans, one JSON object a line
    <P>TRACING_SAMPLE_RATIO  0..1 of new traces kept (a trace that arrives sampled stays sampled);
                             else OTEL_TRACES_SAMPLER(_ARG), else 1
    OTEL_SDK_DISABLED=true   off whatever <P>TRACING says
    OTEL_RESOURCE_ATTRIBUTES added to every span's resource; OTEL_EXPORTER_OTLP_HEADERS,
                             _CERTIFICATE, _TIMEOUT, _COMPRESSION and OTEL_BSP_* are read by the
                             SDK's exporter and batch processor as usual
    OTEL_PYTHON_GRPC_EXCLUDED_SERVICES  more gRPC services whose calls get no span

Health checks and reflection are never traced: a probe every few seconds
would bury the calls that matter.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from recsys_core.rpc.envconfig import ConfigError, EnvReader


MODES = ("off", "otlp", "console", "file")
DEFAULT_ENDPOINT = "http://localhost:4317"
SERVICE_NAME_PREFIX = "recsys-"
# Calls that are not worth a trace each.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
# OTEL_TRACES_SAMPLER values and the ratio they mean here (parent-based always:
# a downstream service keeps what the gateway decided, so traces stay whole).
_SAMPLERS = {"always_on": 1.0, "parentbased_always_on": 1.0, "always_off": 0.0, "parentbased_always_off": 0.0,
             "traceidratio": None, "parentbased_traceidratio": None}


def _standard_ratio(environ: Mapping[str, str]) -> float:
    """The sample ratio the standard OTEL_TRACES_SAMPLER(_ARG) variables ask for; 1 when unset."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not sampler:
        return 1.0
    if sampler not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r} must be one of {', '.join(_SAMPLERS)}")
    fixed = _SAMPLERS[sampler]
    if fixed is not None:
        return fixed
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(raw) if raw else 1.0
    except ValueError:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw} must be between 0 and 1")
    return ratio


def _check_endpoint(name: str, endpoint: str) -> str:
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name}={endpoint!r} must be http://host:port (plaintext) or https://host:port, "
                          f"an OTLP/gRPC collector")
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"{name}={endpoint!r} has an invalid port") from None
    return endpoint


@dataclass(frozen=True)
class TracingConfig:
    """One service's tracing settings (read by its config's `from_env`)."""

    mode: str = "off"
    endpoint: str = DEFAULT_ENDPOINT
    file: str = ""
    sample_ratio: float = 1.0
    # In-process use only (tests): a SpanExporter that gets every span instead
    # of the one `mode` names. Never read from the environment.
    exporter: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"tracing mode {self.mode!r} must be one of {', '.join(MODES)}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"tracing sample ratio {self.sample_ratio} must be between 0 and 1")
        if self.mode == "file" and not self.file and self.exporter is None:
            raise ConfigError("tracing mode file needs a file (<SERVICE>_TRACING_FILE)")
        if self.mode == "otlp":
            _check_endpoint("the OTLP endpoint", self.endpoint)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def from_env(cls, env: EnvReader) -> "TracingConfig":
        """<P>TRACING, <P>TRACING_ENDPOINT, <P>TRACING_FILE, <P>TRACING_SAMPLE_RATIO, with the
        OTEL_* fallbacks the module says. The service's own variables fail fast
        even when tracing is off, so that turning it on later does not meet a
        typo first; the shared OTEL_* ones are read only when it is on."""
        environ = env.environ
        mode = env.choice("TRACING", "off", MODES)
        endpoint = env.str("TRACING_ENDPOINT", "")
        if endpoint:
            _check_endpoint(f"{env.prefix}TRACING_ENDPOINT", endpoint)
        has_ratio = bool(environ.get(env.prefix + "TRACING_SAMPLE_RATIO", "").strip())
        ratio = env.float("TRACING_SAMPLE_RATIO", 1.0, minimum=0.0, maximum=1.0)
        file = env.str("TRACING_FILE", "")
        if mode == "file" and not file:
            raise ConfigError(f"{env.prefix}TRACING=file needs {env.prefix}TRACING_FILE (a path for the spans)")
        if mode == "off" or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(mode="off", endpoint=endpoint or DEFAULT_ENDPOINT, file=file, sample_ratio=ratio)
        for standard in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            if not endpoint and environ.get(standard, "").strip():
                endpoint = _check_endpoint(standard, environ[standard].strip())
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "grpc").strip()
        if mode == "otlp" and protocol != "grpc":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only the grpc exporter is installed "
                              f"(a collector's port 4317)")
        if not has_ratio:
            ratio = _standard_ratio(environ)
        return cls(mode=mode, endpoint=endpoint or DEFAULT_ENDPOINT, file=file, sample_ratio=ratio)

    def describe(self) -> str:
        if not self.enabled:
            return "tracing off"
        where = {"otlp": f"OTLP to {self.endpoint}", "console": "to stdout", "file": f"to {self.file}"}[self.mode]
        if self.exporter is not None:
            where = f"to {type(self.exporter).__name__}"
        return f"tracing {where}, {self.sample_ratio:g} of new traces sampled"


class Tracing:
    """One service's tracing: what build_server installs and its channels use.
    `Tracing.start(config, service)`; `Tracing.OFF` when off."""

    def __init__(self, service: str, config: TracingConfig, provider=None):
        self.service = service
        self.config = config
        self.provider = provider
        # For spans a service makes itself (around a Triton call); None when off.
        self.tracer = None
        if provider is not None:
            from opentelemetry import trace

            self.tracer = trace.get_tracer("recsys", tracer_provider=provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @classmethod
    def start(cls, config: TracingConfig | None, service: str) -> "Tracing":
        if config is None or not config.enabled:
            return cls(service, config or TracingConfig())
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the service's own name wins.
        resource = Resource.create({"service.name": SERVICE_NAME_PREFIX + service, "service.namespace": "recsys"})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        provider.add_span_processor(BatchSpanProcessor(config.exporter or _exporter(config)))
        return cls(service, config, provider)

    def _filter(self):
        from opentelemetry.instrumentation.grpc import filters

        excluded = [*UNTRACED_SERVICES, *filter(None, (s.strip() for s in os.environ.get(
            "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(",")))]
        return filters.negate(filters.any_of(*(filters.service_prefix(name) for name in excluded)))

    def server_interceptors(self) -> list:
        """The grpc.aio server interceptor (first in the chain), or none when off."""
        if not self.enabled:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider, filter_=self._filter())]

    def aio_client_interceptors(self) -> list:
        """For a grpc.aio channel to another service: a client span per call, `traceparent` sent."""
        if not self.enabled:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return aio_client_interceptors(tracer_provider=self.provider, filter_=self._filter())

    def intercept_channel(self, channel):
        """A sync channel with the same client spans; the channel itself when off."""
        if not self.enabled:
            return channel
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        return intercept_channel(channel, client_interceptor(tracer_provider=self.provider, filter_=self._filter()))

    def shutdown(self) -> None:
        """Sends what is still buffered (bounded by the exporter's timeout)."""
        if self.provider is not None:
            self.provider.shutdown()

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True


Tracing.OFF = Tracing("", TracingConfig())


def _exporter(config: TracingConfig):
    if config.mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # http:// means plaintext, https:// TLS (OTEL_EXPORTER_OTLP_CERTIFICATE for a private CA).
        return OTLPSpanExporter(endpoint=config.endpoint, insecure=config.endpoint.startswith("http://"))
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if config.mode == "console":
        return ConsoleSpanExporter()
    try:
        out = open(config.file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the provider
    except OSError as error:
        raise ConfigError(f"cannot write spans to {config.file}: {error.strerror}") from None
    return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")


# -- trace ids in logs -------------------------------------------------------------

class TraceContextFilter(logging.Filter):
    """Gives every record `trace_id` and `span_id` (hex, "" outside a span)
    and `trace`, " trace_id=... span_id=..." or "", for a format to end with.
    On handlers, so records of every logger pass it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
            record.trace = f" trace_id={record.trace_id} span_id={record.span_id}"
        else:
            record.trace_id = record.span_id = record.trace = ""
        return True


def log_format(service: str) -> str:
    """Every service's log line: the trace ids last, when a span is active."""
    return f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s%(trace)s"


def trace_logging(handler: logging.Handler, service: str) -> logging.Handler:
    """`handler` with the services' format and the trace ids filled in."""
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(logging.Formatter(log_format(service)))
    return handler

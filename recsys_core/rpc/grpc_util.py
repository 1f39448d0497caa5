"""What every server and client of the platform shares: status mapping,
health and reflection, metrics, graceful shutdown, deadlines on outbound calls."""
from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from recsys_core import errors
from recsys_core.rpc.metrics import ServerMetrics, listen_host

log = logging.getLogger(__name__)

_STATUS_OF_ERROR = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# A downstream service's answer that the caller should hear unchanged: the
# request was wrong or named something missing, or the platform is degraded.
_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Messages are capped so a hostile request cannot make a server buffer
# gigabytes; 64 MiB fits a SearchItems reply with embeddings for k=500.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and message a servicer should answer for `exc`, or None when
    the failure is ours (a bug) and must become INTERNAL with its traceback logged."""
    for error_type, code in _STATUS_OF_ERROR.items():
        if isinstance(exc, error_type):
            return code, str(exc)
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        code = exc.code()
        if code in _PASSED_THROUGH:
            return code, exc.details() or code.name
    return None


def handle_errors(method: Callable) -> Callable:
    """Maps a servicer method's exceptions to gRPC statuses: the one place it happens."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            mapped = status_for(exc)
            if mapped is None:
                log.exception("internal error in %s", method.__qualname__)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see server log")
            context.abort(*mapped)

    return wrapper


class Deadline:
    """The caller's remaining time, handed out to each outbound call so that
    no downstream call outlives the request that caused it."""

    def __init__(self, context: grpc.ServicerContext | None, default: float):
        remaining = context.time_remaining() if context is not None else None
        budget = default if remaining is None else min(default, remaining)
        self.expires = time.monotonic() + budget

    def left(self) -> float:
        remaining = self.expires - time.monotonic()
        if remaining <= 0:
            raise errors.DeadlineExceeded("the request's deadline ran out before a downstream call")
        return remaining


def insecure_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


class ServingHealth:
    """Standard grpc.health.v1 service, NOT_SERVING until the owner says ready."""

    def __init__(self, server: grpc.Server, service_names: list[str]):
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self.service_names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            self.servicer.set(name, status)

    def set_component(self, name: str, serving: bool) -> None:
        """A named part's own health entry (e.g. a remote model), beside the service's."""
        self.servicer.set(
            name,
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


class Readiness:
    """Loads a service's model, index or store in the background while the
    server already answers health checks (NOT_SERVING), then flips to SERVING.

    Domain calls made before that get UNAVAILABLE rather than a half-loaded answer.
    """

    def __init__(self, serving: ServingHealth, name: str):
        self.serving = serving
        self.name = name
        self.ready = threading.Event()
        self.failed = threading.Event()
        self.error: BaseException | None = None

    def start(self, load: Callable[[], None]) -> threading.Thread:
        def run():
            try:
                load()
            except BaseException as exc:  # noqa: BLE001 - reported through `failed`
                log.exception("%s failed to load", self.name)
                self.error = exc
                self.failed.set()
                return
            self.ready.set()
            self.serving.set_serving(True)
            log.info("%s ready", self.name)

        thread = threading.Thread(target=run, name=f"{self.name}-load", daemon=True)
        thread.start()
        return thread

    def require(self) -> None:
        if not self.ready.is_set():
            raise errors.Unavailable(f"{self.name} is still loading; retry shortly")


class ReflectionServicer(reflection.ReflectionServicer):
    """Server reflection that also answers a method's name with its file.

    The reflection protocol takes `<package>.<service>[.<method>]` for
    file_containing_symbol, and clients such as ghz ask for the method; but
    protobuf's Python descriptor pool only resolves services, types and fields,
    so the stock servicer answers NOT_FOUND for methods.
    """

    def __init__(self, service_names, pool=None):
        super().__init__(service_names, pool=pool)
        self._symbols = pool if pool is not None else descriptor_pool.Default()

    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            self._symbols.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service_name, _, method = fully_qualified_name.rpartition(".")
            try:
                if method in self._symbols.FindServiceByName(service_name).methods_by_name:
                    fully_qualified_name = service_name
            except KeyError:
                pass
        return super()._file_containing_symbol(request, fully_qualified_name)


class ManagedServer:
    """A grpc.Server with its health reporting, metrics and background loading:
    what `create_server` of every service returns beside the bound port."""

    def __init__(self, server: grpc.Server, serving: ServingHealth, name: str, metrics: ServerMetrics | None = None):
        self.grpc_server = server
        self.serving = serving
        self.readiness = Readiness(serving, name)
        self.metrics = metrics if metrics is not None else ServerMetrics()
        # Set when the server begins to stop; background loops watch it.
        self.stopping = threading.Event()

    @property
    def metrics_port(self) -> int | None:
        """The port of the /metrics endpoint, None when the server has none."""
        return self.metrics.port

    def add(self, register: Callable, servicer) -> None:
        register(servicer, self.grpc_server)

    def start(self) -> None:
        self.grpc_server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: NOT_SERVING first, then refuse new calls and let in-flight ones finish."""
        self.stopping.set()
        self.serving.shutdown()
        stopped = self.grpc_server.stop(grace)
        # Scrapes still see the drain; the endpoint closes once the server has stopped.
        threading.Thread(
            target=lambda: (stopped.wait(), self.metrics.close_http()), name="metrics-close", daemon=True
        ).start()
        return stopped

    def run_until_terminated(self, grace_seconds: float) -> int:
        """Serve until SIGTERM or SIGINT, then drain: health turns NOT_SERVING
        so balancers stop sending, new calls are refused, in-flight calls get
        `grace_seconds` to finish. Returns the exit code: 1 when loading failed."""
        stop_requested = threading.Event()

        def request_stop(signum, _frame):
            log.info("signal %s: draining for up to %.1fs", signal.Signals(signum).name, grace_seconds)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop_requested.wait(0.2):
            if self.readiness.failed.is_set():
                log.error("stopping: %s could not load: %s", self.readiness.name, self.readiness.error)
                self.stop(0).wait()
                return 1
        self.stop(grace_seconds).wait()
        log.info("stopped")
        return 0


def build_server(
    address: str, workers: int, full_service_names: list[str], name: str, metrics_port: int | None = None
) -> tuple[ManagedServer, int]:
    """A server with health, reflection and the metrics interceptor registered
    and `address` bound; with a `metrics_port` (0: a free one) also the
    Prometheus endpoint, on the host of `address` (`ManagedServer.metrics_port`).

    Callers add their servicers, start loading, then start it. Raises if a
    port cannot be bound.
    """
    metrics = ServerMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
        options=CHANNEL_OPTIONS,
        # Every call of every service passes the one metrics interceptor.
        interceptors=[metrics.interceptor()],
        # Beyond this many queued calls the server answers RESOURCE_EXHAUSTED
        # at once instead of letting latency grow without bound. (Those calls
        # never reach a handler, so the RPC metrics do not count them.)
        maximum_concurrent_rpcs=workers * 16,
    )
    serving = ServingHealth(server, full_service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(
            [*full_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    managed = ManagedServer(server, serving, name, metrics)
    metrics.track_readiness(managed.readiness.ready.is_set)
    if metrics_port is not None:
        host = listen_host(address)
        try:
            metrics.serve_http(host, metrics_port)
        except OSError as error:
            server.stop(0)
            raise OSError(f"could not serve metrics on {host}:{metrics_port}: {error}") from error
        log.info("%s metrics on http://%s:%d/metrics", name, host, metrics.port)
    return managed, port


def setup_logging(service: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )


def serve_main(service: str, config_type, create_server: Callable) -> int:
    """What every service's `main()` does: configure from the environment
    (failing fast), serve, and drain on SIGTERM. Returns the exit code."""
    setup_logging(service)
    config = config_type.from_env()
    server, port = create_server(config)
    server.start()
    log.info("%s listening on port %d", service, port)
    return server.run_until_terminated(config.grace_seconds)

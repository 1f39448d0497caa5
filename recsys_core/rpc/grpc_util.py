"""What every server and client of the platform shares: status mapping,
health and reflection, metrics, transport security and access control,
graceful shutdown, deadlines on outbound calls.

Servers are grpc.aio servers, each on an event loop of its own thread
(recsys_core/rpc/runtime.py): servicer methods are `async def`, and run
their blocking work with `await server.blocking.run(...)`.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal
import threading
import time
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from threadpoolctl import threadpool_limits

from recsys_core import errors
from recsys_core.rpc import balancing
from recsys_core.rpc.envconfig import EnvReader
from recsys_core.rpc.access import AccessInterceptor, AccessPolicy, AuthConfig, Authenticator
from recsys_core.rpc.limits import (FieldLimitsInterceptor, RateLimitInterceptor, ServerLimits, request_bytes_limit,
                                    server_options)
from recsys_core.rpc.metrics import ServerMetrics, listen_host
from recsys_core.rpc.tracing import Tracing, TracingConfig, trace_logging
from recsys_core.rpc.transport import Security
from recsys_core.rpc.runtime import BlockingPool, EventLoopThread, PoolFull, WrappingInterceptor

log = logging.getLogger(__name__)

_STATUS_OF_ERROR = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
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
_MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Clients: round_robin, retries of reads, keepalive (recsys_core/rpc/balancing.py).
CHANNEL_OPTIONS = [*_MESSAGE_LIMITS, *balancing.CLIENT_OPTIONS]
# Servers: the keepalive pings clients send are welcome; connections age out.
SERVER_OPTIONS = [*_MESSAGE_LIMITS, *balancing.SERVER_OPTIONS]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and message a servicer should answer for `exc`, or None when
    the failure is ours (a bug) and must become INTERNAL with its traceback logged."""
    for error_type, code in _STATUS_OF_ERROR.items():
        if isinstance(exc, error_type):
            return code, str(exc)
    code = status_code(exc) if isinstance(exc, grpc.RpcError) else None
    if code in _PASSED_THROUGH:
        return code, exc.details() or code.name
    return None


def handle_errors(method: Callable) -> Callable:
    """Maps a servicer method's exceptions to gRPC statuses: the one place it
    happens. For `async def` methods (what the aio servers run) and plain ones."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self, request, context):
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise  # the method aborted itself: its status is already on the way
            except Exception as exc:  # noqa: BLE001 - every failure gets a status
                mapped = status_for(exc)
                if mapped is None:
                    log.exception("internal error in %s", method.__qualname__)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see server log")
                await context.abort(*mapped)

        return async_wrapper

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


def channel(target: str, security: Security, service: str, tracing: Tracing | None = None) -> grpc.Channel:
    """The one way a service (or a tool) opens a channel to one of the
    platform's services: `service` is the callee's name ("profile"), whose
    certificate the channel checks; `security` is the caller's own (mutual
    TLS with its certificate, or plaintext when it is explicitly in
    development mode). recsys_core/rpc/transport.py says what is checked.

    `target` is `host:port`, or on Kubernetes `dns:///<name>-headless...:port`
    so that round_robin sees every replica (recsys_core/rpc/balancing.py).

    With the caller's `tracing` on (ManagedServer.tracing), every call is a
    client span and carries the trace context (recsys_core/rpc/tracing.py)."""
    return (tracing or Tracing.OFF).intercept_channel(security.channel(target, service, CHANNEL_OPTIONS))


def aio_channel(target: str, security: Security, service: str, tracing: Tracing | None = None) -> grpc.aio.Channel:
    """As `channel`, for grpc.aio stubs (bound to the running event loop)."""
    return security.aio_channel(target, service, CHANNEL_OPTIONS,
                                interceptors=(tracing or Tracing.OFF).aio_client_interceptors())


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The status of a failed call, from a sync or an aio stub; None for anything else."""
    if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)):
        return error.code()
    return None


class _HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 on the event loop: a Watch stream waits there, costing no thread.

    The stock Watch forgets a service's condition when any one of its
    watchers leaves, so the others, still waiting on it, never hear a later
    change (such as NOT_SERVING when the server drains). Here the condition
    stays while anyone watches it.
    """

    def __init__(self):
        super().__init__()
        self._watching: dict[str, int] = {}

    async def Watch(self, request, context) -> None:
        service = request.service
        self._watching[service] = self._watching.get(service, 0) + 1
        condition = self._server_watchers[service]
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    await condition.wait()
        finally:
            self._watching[service] -= 1
            if not self._watching[service]:
                del self._watching[service]
                self._server_watchers.pop(service, None)


class ServingHealth:
    """Standard grpc.health.v1 service, NOT_SERVING until the owner says ready.
    Its statuses live on the server's event loop; set them from any thread."""

    def __init__(self, server: grpc.aio.Server, service_names: list[str], loop: EventLoopThread):
        self.loop = loop
        self.servicer = _HealthServicer()
        self.service_names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.set_serving(False)

    def _on_loop(self, make: Callable) -> None:
        if self.loop.in_loop():
            self.loop.submit(make)
        elif self.loop.running():
            self.loop.run(make)
        # Else the server has stopped: there is no one left to tell.

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def set_all():
            for name in self.service_names:
                await self.servicer.set(name, status)

        self._on_loop(set_all)

    def set_component(self, name: str, serving: bool) -> None:
        """A named part's own health entry (e.g. a remote model), beside the service's."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._on_loop(lambda: self.servicer.set(name, status))

    async def shutdown(self) -> None:
        """Every entry NOT_SERVING for good (later sets are ignored); on the loop."""
        await self.servicer.enter_graceful_shutdown()


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
        # Run after loading, before SERVING (ManagedServer opens a deferred port here).
        self.before_serving: Callable[[], None] | None = None

    def start(self, load: Callable[[], None]) -> threading.Thread:
        def run():
            try:
                load()
                if self.before_serving is not None:
                    self.before_serving()
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


class ReflectionServicer(reflection.aio.ReflectionServicer):
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


class _ThreadContext:
    """The context a plain (not async) handler gets while it runs in the
    blocking pool. The aio context belongs to the event loop, so what the
    handler says (abort, set_code, set_details) is kept here and told to the
    real context on the loop once the handler is done."""

    class Aborted(Exception):
        """Raised by abort(), as grpc's own context raises, to end the handler."""

    def __init__(self, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        self._expires = None if remaining is None else time.monotonic() + remaining
        self._metadata = context.invocation_metadata()
        self._peer = context.peer()
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self.aborted = False
        self.ended = False  # set on the loop when the call ended under the handler

    def time_remaining(self) -> float | None:
        return None if self._expires is None else max(0.0, self._expires - time.monotonic())

    def is_active(self) -> bool:
        return not self.ended and (self._expires is None or time.monotonic() < self._expires)

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def abort(self, code: grpc.StatusCode, details: str = ""):
        self._code, self._details, self.aborted = code, details, True
        raise self.Aborted(details)

    async def tell(self, context: grpc.aio.ServicerContext) -> None:
        """Passes on what the handler said; raises AbortError after an abort."""
        if self.aborted:
            await context.abort(self._code, self._details or "")
        if self._code is not None:
            context.set_code(self._code)
        if self._details is not None:
            context.set_details(self._details)


class _BlockingHandlers(WrappingInterceptor):
    """Makes plain (sync) unary-request handlers async: they run in the
    server's blocking pool with a `_ThreadContext`, and the loop waits. The
    platform's servicers are async already; this keeps handlers written for
    grpc.server working (and, with the pool, bounded)."""

    def __init__(self, pool: BlockingPool):
        super().__init__()
        self.pool = pool

    def wrap(self, handler, full_method: str):
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            return handler
        if handler.request_streaming:
            raise NotImplementedError(f"{full_method}: a request-streaming handler must be async on this server")
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        pool = self.pool

        async def run(context, thread_context: _ThreadContext, function, *args):
            """function(*args) in the pool, its abort told to the caller."""
            try:
                return await pool.run(function, *args)
            except _ThreadContext.Aborted:
                await thread_context.tell(context)  # raises AbortError
            except PoolFull as exc:  # as handle_errors answers it for async handlers
                await context.abort(*status_for(exc))
            except asyncio.CancelledError:
                thread_context.ended = True  # is_active() turns False for the handler
                raise

        if handler.unary_unary is not None:

            async def unary_unary(request, context):
                thread_context = _ThreadContext(context)
                reply = await run(context, thread_context, behavior, request, thread_context)
                await thread_context.tell(context)
                return reply

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)

        finished = object()

        async def unary_stream(request, context):
            thread_context = _ThreadContext(context)
            # Calling a generator function is cheap, but a plain function that
            # returns an iterator may do its work right there: in the pool too.
            replies = iter(await run(context, thread_context, behavior, request, thread_context))
            while (reply := await run(context, thread_context, next, replies, finished)) is not finished:
                try:
                    yield reply
                except GeneratorExit:  # closed by the server: the call ended
                    thread_context.ended = True
                    raise
            await thread_context.tell(context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)


class _Undecodable:
    """What a request body that does not parse becomes, for the handler to refuse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class _Oversized:
    """A request body over its method's limit (recsys_core/rpc/limits.py), left unparsed."""

    __slots__ = ("size", "limit")

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit


class _DecodingInterceptor(WrappingInterceptor):
    """An undecodable request body is the caller's mistake: INVALID_ARGUMENT
    and one log line. Left to grpc, it is INTERNAL with a traceback logged per
    request ("Exception deserializing request!"), an easy log flood.

    A body over its method's size limit (`limits`) is not parsed at all:
    RESOURCE_EXHAUSTED, as grpc answers a body over the server's limit."""

    def __init__(self, limits: ServerLimits | None = None):
        super().__init__()
        self.limits = limits

    def wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        decode = handler.request_deserializer
        # Unary calls only: the one streaming method with a request is health's
        # Watch, whose handler writes through the context rather than yielding.
        if decode is None or handler.unary_unary is None:
            return handler
        method_name = full_method.rsplit('/', 1)[-1]
        limit = request_bytes_limit(full_method, self.limits) if self.limits is not None else None

        def tolerant(raw: bytes):
            if limit is not None and len(raw) > limit:
                return _Oversized(len(raw), limit)
            try:
                return decode(raw)
            except Exception as error:  # protobuf's DecodeError, or anything a parser raises
                return _Undecodable(error)

        async def refuse(request: _Undecodable, context) -> None:
            log.warning("%s: undecodable request body from %s (%s)", full_method, context.peer(),
                        type(request.error).__name__)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request body is not a valid {method_name} request")

        behavior = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                return await refuse(request, context)
            if isinstance(request, _Oversized):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"the request is {request.size:,} bytes; {method_name} takes at most "
                                    f"{request.limit:,}")
            # Always a coroutine: _BlockingHandlers, further in, makes plain handlers async.
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=tolerant, response_serializer=handler.response_serializer)


# How long a draining server keeps accepting calls after turning NOT_SERVING.
SETTLE_SECONDS = 1.0
# How often a lame duck looks whether its clients have left.
_LAME_DUCK_POLL_SECONDS = 0.1


def _tcp_sockets(port: int, status: str) -> list:
    """This process's TCP sockets on local `port` in `status` (psutil's names: LISTEN, ESTABLISHED)."""
    import psutil

    return [c for c in psutil.Process().net_connections("tcp") if c.laddr and c.laddr.port == port
            and c.status == status]


def listener_fds(port: int) -> set[int]:
    """The descriptors of this process's listening sockets on `port`."""
    return {c.fd for c in _tcp_sockets(port, "LISTEN")}


def close_listeners(fds: set[int]) -> int:
    """Stop accepting connections on the listening sockets `fds` while the
    connections already accepted go on: gRPC offers no call for it, so the
    sockets are shut down under it (gRPC then logs once "Closing acceptor.
    Failed accept4: Invalid argument" and closes them). A listener shut down
    leaves its SO_REUSEPORT group at once, so the kernel hands new
    connections to the replicas that share the port. Returns how many were
    closed."""
    import socket

    closed = 0
    for fd in fds:
        borrowed = socket.socket(fileno=fd)
        try:
            borrowed.shutdown(socket.SHUT_RD)
            closed += 1
        except OSError as error:
            log.warning("could not close listener %d: %s", fd, error)
        finally:
            borrowed.detach()  # gRPC owns the descriptor and closes it
    return closed


class ManagedServer:
    """A grpc.aio server on its own event-loop thread, with its blocking pool,
    health reporting, metrics and background loading: what `create_server`
    of every service returns beside the bound port. Its methods block and may
    be called from any thread."""

    def __init__(self, loop: EventLoopThread, server: grpc.aio.Server, serving: ServingHealth, name: str,
                 blocking: BlockingPool, metrics: ServerMetrics | None = None):
        self.loop = loop
        self.grpc_server = server
        self.serving = serving
        self.blocking = blocking
        self.readiness = Readiness(serving, name)
        self.metrics = metrics if metrics is not None else ServerMetrics()
        # Set when the server begins to stop; background loops watch it.
        self.stopping = threading.Event()
        self._stopped: threading.Event | None = None
        self._stop_lock = threading.Lock()
        self._after_drain: list[Callable[[], Awaitable[None]]] = []
        # Set by build_server: the port callers use, its binding when it
        # opens only once loaded, and the connection age of a lame duck.
        self.port = 0
        self._bind: Callable[[], int] | None = None
        self._started = threading.Event()
        self.connection_age_seconds: float | None = None
        # The listening sockets this server opened (not another's in the same process).
        self._listeners: set[int] = set()

    @property
    def metrics_port(self) -> int | None:
        """The port of the /metrics endpoint, None when the server has none."""
        return self.metrics.port

    def add(self, register: Callable, servicer) -> None:
        register(servicer, self.grpc_server)

    health_server: grpc.aio.Server | None = None
    # Its spans' provider and tracer (recsys_core/rpc/tracing.py), for the
    # channels and clients the service opens; Tracing.OFF unless configured.
    tracing: Tracing = Tracing.OFF

    def start(self) -> None:
        """Serve. A port bound only once loaded (build_server: a health port
        and a fixed port) opens when loading ends; health answers from now."""
        if self.health_server is not None:
            self.loop.run(self.health_server.start)
        if self._bind is None:
            before = listener_fds(self.port) if self.connection_age_seconds is not None else set()
            self.loop.run(self.grpc_server.start)
            if self.connection_age_seconds is not None:
                self._listeners = listener_fds(self.port) - before
        self._started.set()

    def _open_deferred_port(self) -> None:
        self._started.wait()
        if self.stopping.is_set():
            return  # stopped while loading: the port never opens

        async def bind_and_start() -> None:
            if self.stopping.is_set():
                return
            before = listener_fds(self.port)
            if self._bind() == 0:
                raise OSError(f"could not bind port {self.port} for {self.readiness.name}")
            await self.grpc_server.start()
            self._listeners = listener_fds(self.port) - before
            log.info("%s accepting calls on port %d", self.readiness.name, self.port)

        self.loop.run(bind_and_start)

    async def _lame_duck(self, budget: float) -> None:
        """Let callers leave before the server stops: stop accepting
        connections, then wait (at most `budget` seconds) until every open
        connection has been closed by its client after the GOAWAY its age
        brings (counted by port: one server per port in a process). Calls on them go on being served all the while, so none is
        caught by stop(), which cancels the calls that reach it after it
        began (a C-core server's drain does; seen as CANCELLED replies in a
        rolling restart of the gateway)."""
        closed = await asyncio.to_thread(close_listeners, self._listeners)
        give_up = time.monotonic() + budget
        remaining = await asyncio.to_thread(_tcp_sockets, self.port, "ESTABLISHED")
        while remaining and time.monotonic() < give_up:
            await asyncio.sleep(_LAME_DUCK_POLL_SECONDS)
            remaining = await asyncio.to_thread(_tcp_sockets, self.port, "ESTABLISHED")
        log.info("lame duck: %d listener(s) closed, %d connection(s) still open after %.1fs", closed,
                 len(remaining), budget - max(0.0, give_up - time.monotonic()))

    def after_drain(self, close: Callable[[], Awaitable[None]]) -> None:
        """`close()` is awaited on the loop once in-flight calls are done
        (e.g. the aio channels the servicer calls out on)."""
        self._after_drain.append(close)

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: NOT_SERVING first, then refuse new calls and let in-flight
        ones finish within `grace` seconds (None: end them now). Returns an
        event set once the server has stopped; a second call returns the same."""
        with self._stop_lock:
            if self._stopped is not None:
                return self._stopped
            self._stopped = stopped = threading.Event()
        self.stopping.set()

        async def drain():
            await self.serving.shutdown()
            # A port that opens once loaded and has not opened yet has no caller to wait for.
            serving_calls = self._bind is None or self.readiness.ready.is_set()
            left = grace or 0
            if grace and serving_calls:
                # Calls that reached the transport but were not yet handed to
                # a handler are cancelled by stop(), not drained: keep taking
                # them for a moment while health says NOT_SERVING and callers
                # and balancers turn away (seen as CANCELLED replies to a burst
                # that arrived just before SIGTERM).
                await asyncio.sleep(min(SETTLE_SECONDS, grace))
                left = grace - min(SETTLE_SECONDS, grace)
                if self.connection_age_seconds is not None and left > 0:
                    # Each connection's GOAWAY comes within its age (gRPC adds
                    # up to 10 %), then the client's next call reconnects elsewhere.
                    budget = min(left * 0.75, self.connection_age_seconds * 1.1 + 0.5)
                    await self._lame_duck(budget)
                    left -= budget
            await self.grpc_server.stop(left if grace else grace)
            if self.health_server is not None:
                await self.health_server.stop(0)
            for close in self._after_drain:
                await close()

        def finish(_future) -> None:
            # Scrapes still see the drain; the endpoint closes once the server has stopped.
            self.metrics.close_http()
            self.blocking.shutdown()
            self.loop.stop()
            self.tracing.shutdown()  # the last spans out before the process may exit
            stopped.set()

        self.loop.submit(drain).add_done_callback(finish)
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
    address: str, workers: int, full_service_names: list[str], name: str, metrics_port: int | None = None,
    security: Security | None = None, auth: AuthConfig | None = None, public: bool = False,
    limits: ServerLimits | None = None,
    health_port: int | None = None, tracing: TracingConfig | None = None,
    connection_age_seconds: float | None = None,
) -> tuple[ManagedServer, int]:
    """A server with health, reflection and the metrics interceptor registered
    and `address` bound; with a `metrics_port` (0: a free one) also the
    Prometheus endpoint, on the host of `address` (`ManagedServer.metrics_port`).

    `workers` threads run the blocking work (`ManagedServer.blocking`), and
    at most 16 calls per thread may run or wait for one: beyond that a call
    is answered RESOURCE_EXHAUSTED at once instead of letting latency grow
    without bound. Calls that only wait (health Watch streams) take no thread
    and count against no bound.

    `security` is the service's transport (recsys_core/rpc/transport.py):
    mutual TLS (client certificates of the platform's CA required) or, when it
    says so explicitly, plaintext; `public` (the gateway) serves TLS without
    client certificates instead, for callers with tokens. With a `security`,
    every call passes the access rules (recsys_core/rpc/access.py, tokens
    checked as `auth` says) and reflection is served only when
    `security.reflection`. Without one (tests of this plumbing only): plaintext,
    no access control, reflection on.

    With a `health_port` (Kubernetes: its gRPC probes speak no TLS), a second,
    plaintext listener on the host of `address` serves grpc.health.v1 alone:
    the same statuses, nothing else; and `address`, when it names a port,
    opens only once the service has loaded, so that a replica starting on a
    port its siblings share (SO_REUSEPORT: `recsys serve --replicas` runs
    the gateway so) or behind a balancer takes no connection it would answer
    "still loading".

    `connection_age_seconds`: each connection is closed (GOAWAY, calls on it
    finishing) after about that long, and a draining server first turns
    lame duck: it stops accepting connections and waits for its clients to
    leave, up to that age, before it stops. For the gateway, whose outside
    callers resend nothing. None: the platform's 5 minutes, no lame duck.

    With `tracing` on, every call is a span (the first interceptor, so the
    span covers the others) continuing the caller's trace; off: nothing is
    installed (recsys_core/rpc/tracing.py). `ManagedServer.tracing` is for
    the service's own channels and clients.

    `limits` (recsys_core/rpc/limits.py): the largest request the server
    reads (and each method's, from the LIMITS table), the streams a
    connection may open, and the calls per second each authenticated caller
    may make; the LIMITS table's caps on repeated fields and text hold
    everywhere. None: the transport's 64 MiB, no stream or rate limit.

    Callers add their servicers, start loading, then start it. Raises if a
    port cannot be bound, and ConfigError without certificates.
    """
    if security is not None:
        security.check()
        access = AccessPolicy(
            authenticator=Authenticator(auth) if auth is not None and auth.configured else None,
            trust_declared_identity=security.insecure,
        )
        credentials = security.public_server_credentials() if public else security.server_credentials()
        reflection_on = security.reflection
    else:
        access, credentials, reflection_on = None, None, True
    traced = Tracing.start(tracing, name)
    metrics = ServerMetrics()
    blocking = BlockingPool(workers, workers * 16, name)
    loop = EventLoopThread(name)

    async def make() -> grpc.aio.Server:
        # Every call of every service passes the metrics interceptor first;
        # plain handlers then become async ones that run in the pool. No
        # maximum_concurrent_rpcs: on an aio server it counts open streams too.
        # The access rules come before the servicer sees a request, after metrics
        # (refusals are counted) and decoding (with the size limits); then the
        # caller's rate, known once access has identified it, and the LIMITS
        # table's caps on fields.
        interceptors = [metrics.interceptor(), _DecodingInterceptor(limits)]
        if access is not None:
            interceptors.append(AccessInterceptor(access))
        if limits is not None and limits.rate_limited:
            interceptors.append(RateLimitInterceptor(limits))
        interceptors += [FieldLimitsInterceptor(), _BlockingHandlers(blocking)]
        interceptors = [*traced.server_interceptors(), *interceptors]
        options = SERVER_OPTIONS
        own = dict(server_options(limits)) if limits is not None else {}
        if connection_age_seconds is not None:
            own["grpc.max_connection_age_ms"] = int(connection_age_seconds * 1000)
        options = [*[o for o in SERVER_OPTIONS if o[0] not in own], *own.items()]
        return grpc.aio.server(options=options, interceptors=interceptors)

    server = loop.run(make)
    serving = ServingHealth(server, full_service_names, loop)
    health_server = None
    if health_port is not None:
        async def make_health() -> grpc.aio.Server:
            return grpc.aio.server(options=SERVER_OPTIONS)

        health_server = loop.run(make_health)
        health_pb2_grpc.add_HealthServicer_to_server(serving.servicer, health_server)
        health_address = f"{listen_host(address)}:{health_port}"
        if health_server.add_insecure_port(health_address) == 0:
            raise OSError(f"could not bind the health port {health_address}")
    if reflection_on:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(
                [*full_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
            ),
            server,
        )
    managed = ManagedServer(loop, server, serving, name, blocking, metrics)
    managed.health_server = health_server
    managed.tracing = traced
    managed.connection_age_seconds = connection_age_seconds

    def bind() -> int:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)

    fixed_port = int(address.rpartition(":")[2] or 0)
    if health_server is not None and fixed_port:
        port = managed.port = fixed_port
        managed._bind = bind
        managed.readiness.before_serving = managed._open_deferred_port
    else:
        port = managed.port = bind()
    if port == 0:
        managed.stop(0)
        raise OSError(f"could not bind {address}")
    metrics.track_readiness(managed.readiness.ready.is_set)
    if metrics_port is not None:
        host = listen_host(address)
        try:
            metrics.serve_http(host, metrics_port)
        except OSError as error:
            managed.stop(0)
            raise OSError(f"could not serve metrics on {host}:{metrics_port}: {error}") from error
        log.info("%s metrics on http://%s:%d/metrics", name, host, metrics.port)
    return managed, port


def setup_logging(service: str) -> None:
    """Every service's log lines; inside a traced call they end with its
    trace_id and span_id (recsys_core/rpc/tracing.py)."""
    logging.basicConfig(level=logging.INFO)
    for handler in logging.getLogger().handlers:
        trace_logging(handler, service)


# Threads each service process gives its native maths libraries (OpenBLAS
# under numpy, OpenMP under LightGBM and FAISS). A service answers many
# small requests at once, each with small products: a pool per library
# with a thread per core only adds threads that busy-wait for work and take
# the cores from the other requests and processes. On this 2-core machine
# that doubled Recommend's p99 at one client (docs/performance.md).
NATIVE_THREADS_VARIABLE = "RECSYS_NATIVE_THREADS"


def limit_native_threads(environ=None) -> int:
    """Caps the native maths libraries' thread pools to
    RECSYS_NATIVE_THREADS (default 1); returns the cap."""
    threads = EnvReader("RECSYS_", environ).int("NATIVE_THREADS", 1, minimum=1, maximum=1024)
    # Libraries loaded already are capped now; those loaded later (LightGBM's
    # OpenMP with a ranking model) read these when they load.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    threadpool_limits(threads)
    return threads


def serve_main(service: str, config_type, create_server: Callable) -> int:
    """What every service's `main()` does: configure from the environment
    (failing fast), serve, and drain on SIGTERM. Returns the exit code."""
    setup_logging(service)
    threads = limit_native_threads()
    config = config_type.from_env()
    server, port = create_server(config)
    server.start()
    security = getattr(config, "security", None)
    log.info("%s: native maths libraries limited to %d thread(s) (%s)", service, threads, NATIVE_THREADS_VARIABLE)
    log.info("%s listening on port %d%s; %s", service, port,
             "" if security is None else ": " + (security.describe_public() if service == "gateway" else security.describe()),
             server.tracing.config.describe())
    return server.run_until_terminated(config.grace_seconds)

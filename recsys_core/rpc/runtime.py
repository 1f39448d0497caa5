"""How a server of the platform runs: a grpc.aio server on an event loop of
its own thread, and a bounded pool of threads for the blocking work.

The event loop holds every open call, so a call that only waits (a health
Watch stream, a reply being sent) costs no thread. What blocks or burns CPU
(the domain: FAISS, SQLite, numpy) runs in the server's `BlockingPool`,
whose queue is bounded: beyond it a call is refused with RESOURCE_EXHAUSTED
at once rather than let latency grow without bound. The gateway's calls
downstream use grpc.aio stubs and wait on the loop, taking a slot of the
same bound (`BlockingPool.admitted`) but no thread while they wait; their
message work runs in the pool (`run_admitted`), off the loop.

The loop runs in a thread, not in the main one, so that a server keeps the
same blocking API it had as a grpc.Server (start, stop, health set from any
thread) and the tests can run several servers in one process.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import TypeVar

import grpc

from recsys_core import errors

T = TypeVar("T")

# How long a thread outside the loop waits for the loop to run something
# small (start the server, set a health status). A loop that does not answer
# in this time is stuck, which is a bug worth an exception.
LOOP_CALL_SECONDS = 30.0


class EventLoopThread:
    """An asyncio event loop running forever in a daemon thread of its own."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, make: Callable[[], Awaitable[T]], timeout: float | None = LOOP_CALL_SECONDS) -> T:
        """Runs the awaitable `make()` builds on the loop and waits for its result.
        Built there, since grpc.aio objects bind to the loop they are made on."""
        if self.in_loop():
            raise RuntimeError("EventLoopThread.run called from its own loop: it would wait for itself")

        async def call():
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def submit(self, make: Callable[[], Awaitable[T]]) -> futures.Future:
        """Like `run`, without waiting: a concurrent.futures.Future of the result.
        From the loop itself too (then it runs once the caller yields)."""

        async def call():
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop)

    def running(self) -> bool:
        return self.loop.is_running()

    def stop(self) -> None:
        """Ends the loop (and so its thread) once what is scheduled now has run."""
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # closed meanwhile
                pass


class PoolFull(errors.ResourceExhausted):
    """The blocking pool's queue is full: the call is refused (RESOURCE_EXHAUSTED)."""


class BlockingPool:
    """`workers` threads for blocking work, with at most `limit` calls running
    or waiting; one more is refused with `PoolFull`, an
    `errors.ResourceExhausted` (the servicers' handle_errors answers
    RESOURCE_EXHAUSTED).

    This is the bound the thread-pool servers had as maximum_concurrent_rpcs:
    an aio server's maximum_concurrent_rpcs counts open streams too, so idle
    Watch streams would use up the calls that do work.
    """

    def __init__(self, workers: int, limit: int, name: str):
        self.workers = workers
        self.limit = limit
        self.name = name
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Calls running or waiting for a thread now."""
        return self._pending

    async def run(self, function: Callable[..., T], *args, **kwargs) -> T:
        """`function(*args, **kwargs)` in a pool thread; the caller's event loop waits
        without blocking. A caller that goes away (deadline, cancel) before a
        thread picked the call up also drops the call."""
        self._take()
        try:
            # In the caller's context: its trace span (logs, spans of calls made there).
            future = self._executor.submit(contextvars.copy_context().run, function, *args, **kwargs)
        except BaseException:
            self._release(None)
            raise
        # Released when the work ends (or is dropped unstarted), not when the
        # caller stops waiting: a thread still busy with an abandoned call is busy.
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    @contextlib.contextmanager
    def admitted(self):
        """A slot under the same bound for work that awaits on the loop
        instead of taking a thread (the gateway's calls downstream on aio
        stubs): beyond the bound, PoolFull at once."""
        self._take()
        try:
            yield
        finally:
            self._release(None)

    async def run_admitted(self, function: Callable[..., T], *args, **kwargs) -> T:
        """`function(*args, **kwargs)` in a pool thread for a call that holds
        a slot already (`admitted`): it takes no second one, so a call is
        never refused half-way through. For CPU work between awaits that
        would otherwise hold the loop, which accepts new calls and answers
        health checks."""
        return await asyncio.wrap_future(
            self._executor.submit(contextvars.copy_context().run, function, *args, **kwargs))

    def _take(self) -> None:
        with self._lock:
            if self._pending >= self.limit:
                raise PoolFull(
                    f"{self.name} is busy: {self.limit} calls already running or waiting; retry shortly"
                )
            self._pending += 1

    def _release(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        """No new work; what runs finishes in its thread, unstarted work is dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that replaces each method's handler with a wrapped
    one, built once per method: the continuation hands out the same handler
    object for a method on every call."""

    def __init__(self):
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, full_method)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def guarded(handler: grpc.RpcMethodHandler,
            guard: Callable[[object, grpc.aio.ServicerContext], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """`handler` with `await guard(request, context)` before its behaviour, for
    every kind of method; request streams pass None (nothing is read before
    the call opens). The guard refuses a call by aborting its context."""
    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            await guard(request, context)
            return await _maybe_await(behavior(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def unary_stream(request, context):
            await guard(request, context)
            async for reply in _iterate(behavior(request, context)):
                yield reply

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        async def stream_unary(requests, context):
            await guard(None, context)
            return await _maybe_await(behavior(requests, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **options)
    behavior = handler.stream_stream

    async def stream_stream(requests, context):
        await guard(None, context)
        async for reply in _iterate(behavior(requests, context)):
            yield reply

    return grpc.stream_stream_rpc_method_handler(stream_stream, **options)


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


async def _iterate(replies):
    if hasattr(replies, "__aiter__"):
        async for reply in replies:
            yield reply
    else:
        if inspect.isawaitable(replies):
            replies = await replies
        if replies is not None:
            for reply in replies:
                yield reply

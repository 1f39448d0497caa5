"""The gateway's exposure log: what each Recommend reply showed, in which A/B
arm, recorded by the profile service (RecordExposures) beside the shopper's
events, so that `recsys ab-report` can attribute later events to the arm.

Never on a reply's path: Recommend puts its exposure on a bounded queue and
returns; one background task on the gateway's event loop sends batches of up
to GATEWAY_EXPOSURE_BATCH, at least every GATEWAY_EXPOSURE_FLUSH_SECONDS.
A full queue drops the new exposure rather than wait or grow (the profile
service down for long, say), and a batch that fails three attempts is
dropped; both are counted in recsys_gateway_exposures_total{outcome} so that
a report over a period with drops can be read for what it is. Resending a
batch is safe: exposures are stored once per exposure_id.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter

from recsys.profile.v1 import profile_pb2
from recsys_core.rpc.grpc_util import status_code

log = logging.getLogger(__name__)

OUTCOMES = ("recorded", "duplicate", "dropped_queue_full", "dropped_send_failed")
ATTEMPTS = 3
SEND_TIMEOUT_SECONDS = 5.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED)

Send = Callable[[profile_pb2.RecordExposuresRequest, float], Awaitable[profile_pb2.RecordExposuresResponse]]


def exposure(user_id: str, experiment: str, arm: str, model_version: str, item_ids: list[str],
             now: float | None = None) -> profile_pb2.Exposure:
    return profile_pb2.Exposure(exposure_id=uuid.uuid4().hex, user_id=user_id, experiment=experiment, arm=arm,
                                model_version=model_version, timestamp=int(time.time() if now is None else now),
                                item_ids=item_ids)


class ExposureLog:
    def __init__(self, send: Send, capacity: int, batch: int, flush_seconds: float,
                 registry: CollectorRegistry | None = None):
        self._send = send
        self.capacity, self.batch, self.flush_seconds = capacity, batch, flush_seconds
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # The batch the task is filling or sending.
        self._current: list[profile_pb2.Exposure] = []
        self.counts = Counter("recsys_gateway_exposures", "A/B exposures by what became of them: recorded, "
                              "duplicate, dropped_queue_full, dropped_send_failed.", ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.counts.labels(outcome)

    def offer(self, item: profile_pb2.Exposure) -> bool:
        """Queue an exposure (on the event loop); False when it was dropped."""
        if self._queue is None:
            self._queue = asyncio.Queue(self.capacity)
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            self._queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.counts.labels("dropped_queue_full").inc()
            return False

    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def _take_batch(self) -> list[profile_pb2.Exposure]:
        # Taken into self._current, so that close() finds what the task held.
        batch = self._current
        batch.append(await self._queue.get())
        give_up = time.monotonic() + self.flush_seconds
        while len(batch) < self.batch:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._take_batch()
            await self._deliver(batch)
            self._current = []

    async def _deliver(self, batch: list[profile_pb2.Exposure]) -> None:
        request = profile_pb2.RecordExposuresRequest(exposures=batch)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                reply = await self._send(request, SEND_TIMEOUT_SECONDS)
                self.counts.labels("recorded").inc(reply.recorded)
                self.counts.labels("duplicate").inc(reply.duplicates)
                return
            except grpc.RpcError as error:
                code = status_code(error)
                if code not in RETRYABLE or attempt == ATTEMPTS:
                    log.warning("%d exposures not recorded (%s): %s", len(batch), code,
                                error.details() if isinstance(error, grpc.Call) else error)
                    self.counts.labels("dropped_send_failed").inc(len(batch))
                    return
                await asyncio.sleep(0.2 * attempt)

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (within `timeout`), then stop."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        # The batch the task held (perhaps sent already: stored once by id) and the queue.
        left: list[profile_pb2.Exposure] = list(self._current)
        self._current = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        give_up = time.monotonic() + timeout
        for start in range(0, len(left), self.batch):
            if time.monotonic() > give_up:
                self.counts.labels("dropped_send_failed").inc(len(left) - start)
                break
            await self._deliver(left[start:start + self.batch])

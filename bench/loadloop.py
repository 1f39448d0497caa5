"""A bounded closed-loop load generator shared by the benchmarks.

C threads each make blocking calls back to back until `max_requests` calls
were issued or `max_seconds` passed, whichever comes first; every call has a
deadline, so every run stops by itself.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

CALL_TIMEOUT_SECONDS = 10.0


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def closed_loop(call, payloads: list, concurrency: int, max_requests: int, max_seconds: float,
                abort: threading.Event, on_reply=None) -> dict:
    """`concurrency` threads, each making blocking calls back to back, until
    `max_requests` calls were issued or `max_seconds` passed, whichever first.
    Every call has a deadline, so the loop ends at most CALL_TIMEOUT_SECONDS late."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: Counter = Counter()
    # The clock starts once every client thread exists, so that thread start-up
    # does not count against short loops (the echo loop may last a fraction of a second).
    ready = threading.Barrier(concurrency + 1)
    started = deadline = 0.0

    def worker():
        nonlocal issued
        try:
            ready.wait(30)
        except threading.BrokenBarrierError:
            return
        while not abort.is_set():
            with lock:
                if issued >= max_requests or time.perf_counter() >= deadline:
                    return
                index = issued
                issued += 1
            begin = time.perf_counter()
            try:
                reply = call(payloads[index % len(payloads)], timeout=CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                with lock:
                    errors[code.name if code is not None else type(error).__name__] += 1
                continue
            except Exception as error:  # noqa: BLE001 - counted, the loop goes on
                with lock:
                    errors[type(error).__name__] += 1
                continue
            elapsed = time.perf_counter() - begin
            with lock:
                latencies.append(elapsed)
                if on_reply is not None:
                    on_reply(reply)

    threads = [threading.Thread(target=worker, name=f"client-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline = started + max_seconds
    ready.wait(30)
    join_until = deadline + CALL_TIMEOUT_SECONDS + 5
    for thread in threads:
        # Short joins keep Ctrl-C responsive; the bound keeps the loop finite.
        while thread.is_alive() and time.perf_counter() < join_until:
            thread.join(0.2)
    wall = time.perf_counter() - started
    latencies.sort()
    ms = [value * 1000 for value in latencies]
    return {
        "issued": issued,
        "ok": len(latencies),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "seconds": round(wall, 3),
        "stopped_by": "requests" if issued >= max_requests else "time",
        "p50_ms": round_or_none(percentile(ms, 50)),
        "p99_ms": round_or_none(percentile(ms, 99)),
        "mean_ms": round_or_none(sum(ms) / len(ms)) if ms else None,
        "throughput_rps": round(len(latencies) / wall, 2) if wall > 0 else 0.0,
    }


def round_or_none(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)

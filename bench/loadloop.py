"""A bounded closed-loop load generator shared by the benchmarks.

C threads each issue blocking calls back to back until `max_requests` calls
in total or `max_seconds` have passed, whichever comes first, so every run
stops by itself.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Summary:
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: Counter = field(default_factory=Counter)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
            "errors": dict(self.errors),
        }


def closed_loop(
    call: Callable[[int], None],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    classify_error: Callable[[BaseException], str] = lambda e: type(e).__name__,
) -> Summary:
    """Run `call(i)` (i: the request's sequence number) from `concurrency`
    threads; exceptions are counted by `classify_error`, not raised."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: Counter = Counter()
    stop_at = time.monotonic() + max_seconds

    def worker():
        nonlocal issued
        while True:
            with lock:
                if issued >= max_requests or time.monotonic() >= stop_at:
                    return
                number = issued
                issued += 1
            started = time.perf_counter()
            try:
                call(number)
            except Exception as error:  # noqa: BLE001 - counted, the loop goes on
                with lock:
                    errors[classify_error(error)] += 1
                continue
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    return Summary(requests=len(latencies), seconds=seconds, latencies_ms=np.asarray(latencies), errors=errors)

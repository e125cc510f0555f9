"""Bounded admission: at most ``max_in_flight`` calls worked on, at most ``max_queue`` waiting.

A call beyond both bounds is refused at once with RESOURCE_EXHAUSTED (+ RetryInfo) instead of queueing
without bound, so admitted calls keep their latency and shed calls fail fast (TEI/Triton style).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from . import metrics
from .errors import Overloaded


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, retry_after_s: float = 0.05) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._sem = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.waiting = 0
        self.shed = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            self.shed += 1
            metrics.SHED.inc()
            raise Overloaded(
                f"server busy: {self.in_flight} calls in flight and {self.waiting} queued", self.retry_after_s
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            self._sem.release()

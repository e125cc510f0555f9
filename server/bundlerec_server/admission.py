"""Bounded admission: at most ``limit`` calls worked on, at most ``max_queue`` waiting (FIFO).

A call beyond both bounds is refused at once with RESOURCE_EXHAUSTED (+ RetryInfo) instead of queueing
without bound, so shed calls fail fast (TEI/Triton style).

A fixed limit cannot be right both at the sustainable rate and under overload: loose enough not to shed at
R, it admits so much at 2R (when the CPU is also busy refusing) that admitted latency grows. With a latency
target (``target_latency_s`` > 0) the limit adapts, AIMD as in TCP congestion control and Netflix's
concurrency-limits: a call whose estimated latency (the time it held its slot plus LOOP_HOPS x the event
loop's measured lag) stays within the target adds 1/limit (about +1 per round of calls); one that overshoots
cuts the limit by 10 %, at most once per target interval; the limit stays between 1 and ``max_in_flight``
and bounds the queue too. Under overload the limit shrinks until admitted calls meet the target again and
the rest are shed; when load drops it grows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from . import metrics
from .errors import Overloaded

DECREASE = 0.9
LOOP_HOPS = 8  # event-loop turns a streamed call waits for (arrival, start, encode done, each message, end)
LAG_PROBE_S = 0.005


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, retry_after_s: float = 0.05,
                 target_latency_s: float = 0.0) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.target_latency_s = target_latency_s
        self.limit = float(max_in_flight)
        self.in_flight = 0  # calls holding a slot (granted ones not yet resumed included)
        self.shed = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_cut = 0.0
        self.loop_lag_s = 0.0  # moving average of how late the event loop runs a timer (see watch_loop)
        metrics.ADMISSION_LIMIT.set(self.limit)

    async def watch_loop(self) -> None:
        """Measures event-loop lag (a 5 ms timer's lateness) for the latency estimate: under overload calls wait
        in gRPC and the loop *before* any handler sees them, which no handler timing can show."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            lag = max(0.0, loop.time() - t - LAG_PROBE_S)
            self.loop_lag_s = 0.8 * self.loop_lag_s + 0.2 * lag

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _has_room(self) -> bool:
        return self.in_flight < int(self.limit)

    def queue_bound(self) -> int:
        """Calls allowed to wait: ``max_queue``, and with a latency target no more than the current limit (a
        longer queue would wait longer than a round of calls)."""
        return min(self.max_queue, int(self.limit)) if self.target_latency_s > 0 else self.max_queue

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._has_room() and not self._waiters:
            self.in_flight += 1
        elif len(self._waiters) >= self.queue_bound():
            self.shed += 1
            metrics.SHED.inc()
            raise Overloaded(
                f"server busy: {self.in_flight} calls in flight and {len(self._waiters)} queued", self.retry_after_s
            )
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(granted)
            try:
                await granted  # _release counts us in before it wakes us
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # woken, then cancelled: give the slot on
                    self._release()
                else:
                    self._waiters.remove(granted)
                raise
        metrics.IN_FLIGHT.inc()
        started = time.perf_counter()
        try:
            yield
        finally:
            metrics.IN_FLIGHT.dec()
            self._adapt(time.perf_counter() - started)
            self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        while self._waiters and self._has_room():
            self.in_flight += 1
            self._waiters.popleft().set_result(None)

    def _adapt(self, held_s: float) -> None:
        if self.target_latency_s <= 0:
            return
        if held_s + LOOP_HOPS * self.loop_lag_s <= self.target_latency_s:
            self.limit = min(float(self.max_in_flight), self.limit + 1.0 / self.limit)
        else:
            now = time.perf_counter()
            if now - self._last_cut >= self.target_latency_s:
                self.limit = max(1.0, self.limit * DECREASE)
                self._last_cut = now
        metrics.ADMISSION_LIMIT.set(self.limit)

"""Bounded admission: at most ``limit`` calls worked on, at most ``max_queue`` waiting (FIFO); beyond both a
call is refused at once with RESOURCE_EXHAUSTED + RetryInfo.

With ``target_latency_s`` the limit adapts (AIMD per window on the 99th percentile of estimated latency); with
``queue_target_s`` the queue is governed by CoDel. Design and reasons: docs/server-notes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from . import metrics
from .errors import Overloaded

DECREASE = 0.9
LOOP_HOPS = 8  # weight of the loop lag: a call waits several loop turns before its handler runs
WINDOW_MIN_CALLS = 20  # with TARGET_QUANTILE: the second-slowest of 20 calls decides
TARGET_QUANTILE = 0.99
LAG_PROBE_S = 0.005
CODEL_INTERVAL_S = 0.1


@dataclass(eq=False)
class _Waiter:
    granted: asyncio.Future[None]
    since: float
    timer: asyncio.TimerHandle | None = None


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, retry_after_s: float = 0.05,
                 target_latency_s: float = 0.0, queue_target_s: float = 0.0,
                 interval_s: float = CODEL_INTERVAL_S) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.target_latency_s = target_latency_s
        self.queue_target_s = queue_target_s
        self.interval_s = interval_s
        self.limit = float(max_in_flight)
        self.in_flight = 0  # calls holding a slot (granted ones not yet resumed included)
        self.shed = 0
        self.overloaded = False  # CoDel's verdict on the last interval: the queue is standing
        self._interval_end = 0.0
        self._min_wait = 0.0
        self._waiters: deque[_Waiter] = deque()
        self._window: list[float] = []
        self._window_end = 0.0
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
        arrived = time.perf_counter()
        if self._has_room() and not self._waiters:
            self.in_flight += 1
            self._observe_wait(0.0)
        elif len(self._waiters) >= self.queue_bound():
            raise self._refuse(f"server busy: {self.in_flight} calls in flight and {len(self._waiters)} queued")
        else:
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop.create_future(), arrived)
            if self.overloaded and self.queue_target_s > 0:  # a standing queue: wait 2 x target, no longer
                waiter.timer = loop.call_later(2 * self.queue_target_s, self._expire, waiter)
            self._waiters.append(waiter)
            try:
                await waiter.granted  # _release counts us in before it wakes us (or refuses us)
            except asyncio.CancelledError:
                if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                    self._release()  # woken, then cancelled: give the slot on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self._cancel_timer(waiter)
                raise
        metrics.IN_FLIGHT.inc()
        try:
            yield
        finally:
            metrics.IN_FLIGHT.dec()
            self._adapt(time.perf_counter() - arrived)
            self._release()

    def _refuse(self, message: str) -> Overloaded:
        self.shed += 1
        metrics.SHED.inc()
        return Overloaded(message, self.retry_after_s)

    def _release(self) -> None:
        self.in_flight -= 1
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            self._cancel_timer(waiter)
            wait = time.perf_counter() - waiter.since
            if self._observe_wait(wait):
                waiter.granted.set_exception(self._too_long(wait))
                continue
            self.in_flight += 1
            waiter.granted.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        """A queued call's timer: still waiting after 2 x target under overload, it is refused now."""
        waiter.timer = None
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.granted.set_exception(self._too_long(time.perf_counter() - waiter.since))

    def _too_long(self, wait: float) -> Overloaded:
        return self._refuse(f"server overloaded: no slot within {wait * 1000:.0f} ms (queue standing for "
                            f"{self.interval_s * 1000:.0f} ms, {self.in_flight} calls in flight)")

    @staticmethod
    def _cancel_timer(waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None

    def _observe_wait(self, wait: float) -> bool:
        """CoDel's detector, fed each granted call's queue wait (0 when it found a free slot); at the end of
        every interval the queue is called standing (``overloaded``) when even the shortest wait of that
        interval exceeded the target. True when this call should be refused: overloaded and waited over
        2 x target (folly's "slough" rule)."""
        if self.queue_target_s <= 0:
            return False
        now = time.perf_counter()
        if now >= self._interval_end:
            self.overloaded = self._min_wait > self.queue_target_s
            self._interval_end = now + self.interval_s
            self._min_wait = wait
            return False  # the first call of an interval is never refused
        self._min_wait = min(self._min_wait, wait)
        return self.overloaded and wait > 2 * self.queue_target_s

    def _adapt(self, latency_s: float) -> None:
        """Collects the call's estimated latency; at the end of a window, one AIMD step on its TARGET_QUANTILE."""
        if self.target_latency_s <= 0:
            return
        self._window.append(latency_s + LOOP_HOPS * self.loop_lag_s)
        now = time.perf_counter()
        if now < self._window_end or len(self._window) < WINDOW_MIN_CALLS:
            return
        window = sorted(self._window)
        if window[int(TARGET_QUANTILE * (len(window) - 1))] > self.target_latency_s:
            self.limit = max(1.0, self.limit * DECREASE)
        else:
            self.limit = min(float(self.max_in_flight), self.limit + 1.0)
        self._window.clear()
        self._window_end = now + self.interval_s
        metrics.ADMISSION_LIMIT.set(self.limit)

"""Single-flight: while one call computes what a cache lacks under a key (the leader), other calls that miss the
same key await the leader's result instead of computing it again.

Everything here runs on the event loop (plain asyncio futures, no locks). Each cache of a
:class:`~bundlerec_server.runtime.Serving` snapshot has its own :class:`Flights`, so a call never joins work of
another snapshot. A waiter keeps its own deadline (OutOfTime when it comes first; the leader carries on, shielded
from the waiter's cancellation), and a leader that ends without a result (failed, cancelled, out of time)
hands its waiters None: each then computes for itself, the first one as the next leader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any

from prometheus_client import Counter

from .errors import OutOfTime

Budget = Callable[[], float | None]  # seconds left for the waiter's work (None: no deadline); raises OutOfTime when none


class Flight:
    """A leader's computation for one key; the leader sets :attr:`result` (None: none) before the block ends,
    possibly from a worker thread. Leaving the block hands the result to the waiters."""

    __slots__ = ("_flights", "_key", "future", "result")

    def __init__(self, flights: Flights | None, key: Hashable, future: asyncio.Future[Any] | None) -> None:
        self._flights, self._key, self.future = flights, key, future
        self.result: Any = None

    def __enter__(self) -> Flight:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._flights is not None and self.future is not None:
            del self._flights._running[self._key]
            self.future.set_result(self.result)


class Flights:
    """The keys being computed now, each with the future its waiters await."""

    def __init__(self, coalesced: Counter) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._counter = coalesced
        self.coalesced = 0  # calls served by another call's computation

    def __len__(self) -> int:
        return len(self._running)

    def running(self, key: Hashable) -> bool:
        return key in self._running

    def lead(self, key: Hashable) -> Flight:
        """Registers the caller as ``key``'s leader (use as ``with``); a no-op flight if another call leads it."""
        if key in self._running:
            return Flight(None, key, None)
        future = asyncio.get_running_loop().create_future()
        self._running[key] = future
        return Flight(self, key, future)

    async def join(self, key: Hashable, budget: Budget) -> Any:
        """The result of the computation in flight for ``key``, or None when there is none or it produced none
        (the caller computes, and may lead). OutOfTime when the caller's own budget runs out first."""
        while (future := self._running.get(key)) is not None:
            left = budget()  # OutOfTime when none is left
            try:
                async with asyncio.timeout(left):
                    value = await asyncio.shield(future)  # the waiter's deadline or cancellation never reaches the leader
            except TimeoutError:
                raise OutOfTime() from None
            if value is not None:
                self.coalesced += 1
                self._counter.inc()
                return value
        return None

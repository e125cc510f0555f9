"""Deadline-aware pacing of a bundle stream (pure logic; the clock is injected so tests can fake it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from .domain import Stop

T = TypeVar("T")


class Paced(Generic[T]):
    """Iterates ``items`` while the call has more than ``margin_s`` left after the next message's expected
    cost; afterwards :attr:`stop` says why it ended.

    ``time_left()`` returns the seconds until the call's deadline, or None when the call has none. The cost
    of a message is learnt from the stream itself (the largest gap seen between two consecutive items), so
    a slow consumer or a busy machine makes the stream stop earlier rather than overrun the deadline.
    """

    def __init__(self, items: Iterable[T], time_left: Callable[[], float | None], margin_s: float) -> None:
        self.items = items
        self.time_left = time_left
        self.margin_s = margin_s
        self.sent = 0
        self.stop: Stop | None = None
        self._last_left: float | None = None
        self._cost = 0.0

    def expired(self) -> bool:
        left = self.time_left()
        if left is None:
            return False
        if self._last_left is not None:
            self._cost = max(self._cost, self._last_left - left)
        self._last_left = left
        return left - self._cost <= self.margin_s

    def __iter__(self) -> Iterator[T]:
        self._last_left = None
        self._cost = 0.0
        for item in self.items:
            if self.expired():
                self.stop = Stop.DEADLINE
                return
            self.sent += 1
            yield item
        self.stop = Stop.COMPLETE if self.sent else Stop.NO_MATCH

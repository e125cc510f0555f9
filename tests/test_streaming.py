"""Deadline pacing with a fake clock: the stream ends itself before the deadline, with the right reason."""

from bundlerec_server.domain import Stop
from bundlerec_server.streaming import Paced


class Clock:
    def __init__(self, left: float, per_item: float) -> None:
        self.left, self.per_item = left, per_item

    def __call__(self) -> float:
        return self.left

    def tick(self) -> None:
        self.left -= self.per_item


def test_no_deadline_sends_everything():
    p = Paced(range(5), lambda: None, 0.002)
    assert list(p) == [0, 1, 2, 3, 4]
    assert p.stop is Stop.COMPLETE and p.sent == 5


def test_stops_before_margin_with_deadline_reason():
    clock = Clock(left=0.010, per_item=0.003)  # 10 ms left, each message costs 3 ms, margin 2 ms
    p = Paced(range(10), clock, 0.002)
    sent = []
    for item in p:
        sent.append(item)
        clock.tick()
    # 10 -> 7 -> 4 -> 1 (<= 2): three items went out
    assert sent == [0, 1, 2]
    assert p.stop is Stop.DEADLINE and p.sent == 3


def test_already_expired_sends_nothing():
    p = Paced(range(3), lambda: 0.001, 0.002)
    assert list(p) == []
    assert p.stop is Stop.DEADLINE


def test_empty_is_no_match():
    p = Paced([], lambda: 1.0, 0.002)
    assert list(p) == []
    assert p.stop is Stop.NO_MATCH

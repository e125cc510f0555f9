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
    # left 10 ms: send (cost unknown); 7: learnt cost 3, 7 - 3 = 4 > 2: send; 4: 4 - 3 = 1 <= 2: stop
    assert sent == [0, 1]
    assert p.stop is Stop.DEADLINE and p.sent == 2


def test_a_slow_gap_makes_it_stop_earlier():
    lefts = iter([0.050, 0.049, 0.030, 0.015])  # one 19 ms stall between the 2nd and 3rd message
    p = Paced(range(10), lambda: next(lefts), 0.002)
    # at 15 ms left a plain margin check would send again; the learnt 19 ms cost would overrun: stop
    assert list(p) == [0, 1, 2]
    assert p.stop is Stop.DEADLINE


def test_already_expired_sends_nothing():
    p = Paced(range(3), lambda: 0.001, 0.002)
    assert list(p) == []
    assert p.stop is Stop.DEADLINE


def test_empty_is_no_match():
    p = Paced([], lambda: 1.0, 0.002)
    assert list(p) == []
    assert p.stop is Stop.NO_MATCH

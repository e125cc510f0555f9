"""Bounded admission (pure asyncio, no gRPC): slots, a bounded queue, immediate refusal beyond both."""

from __future__ import annotations

import asyncio

import pytest

from bundlerec_server.admission import WINDOW_MIN_CALLS, Admission
from bundlerec_server.errors import Overloaded


def hold_slot(adm: Admission, gate: asyncio.Event) -> asyncio.Task:
    """A call that takes a slot (or queues for one) and holds it until ``gate`` is set."""
    async def hold():
        async with adm.slot():
            await gate.wait()

    return asyncio.create_task(hold())


async def test_calls_beyond_slots_and_queue_are_refused_at_once_and_the_rest_complete():
    adm = Admission(max_in_flight=2, max_queue=3, retry_after_s=0.2)
    gate = asyncio.Event()
    started, done = [], []

    async def call(i):
        async with adm.slot():
            started.append(i)
            await gate.wait()
            done.append(i)

    tasks = [asyncio.create_task(call(i)) for i in range(5)]  # 2 run, 3 queue
    await asyncio.sleep(0.01)
    assert (adm.in_flight, adm.waiting) == (2, 3) and started == [0, 1]
    with pytest.raises(Overloaded) as exc:  # the sixth call: no slot, queue full -> refused without waiting
        async with adm.slot():
            pass
    assert exc.value.retry_after_s == 0.2 and "2 calls in flight and 3 queued" in str(exc.value)
    assert adm.shed == 1
    gate.set()
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2, 3, 4] and sorted(done) == started  # queued calls ran in arrival order
    assert (adm.in_flight, adm.waiting) == (0, 0)


async def test_a_failing_call_releases_its_slot():
    adm = Admission(max_in_flight=1, max_queue=0)
    with pytest.raises(RuntimeError):
        async with adm.slot():
            raise RuntimeError("handler failed")
    async with adm.slot():  # the slot is free again
        assert adm.in_flight == 1
    assert adm.in_flight == 0 and adm.shed == 0


async def test_a_cancelled_waiter_leaves_the_queue():
    adm = Admission(max_in_flight=1, max_queue=1)
    gate = asyncio.Event()
    holder = hold_slot(adm, gate)
    await asyncio.sleep(0.01)

    async def wait_for_slot():
        async with adm.slot():
            pass

    waiter = asyncio.create_task(wait_for_slot())
    await asyncio.sleep(0.01)
    assert adm.waiting == 1
    waiter.cancel()  # the caller went away while queued
    await asyncio.sleep(0.01)
    assert adm.waiting == 0
    async with asyncio.timeout(1):  # its place in the queue is free: a new call queues instead of being refused
        gate.set()
        await holder
        async with adm.slot():
            pass


async def test_limit_adapts_to_the_latency_target(monkeypatch):
    """AIMD per window (>= WINDOW_MIN_CALLS calls and one interval): a window whose 99th percentile is over the
    target cuts the limit by 10 %, one within it adds 1, always between 1 and max_in_flight; the slowest call of
    a window alone does not cut, two do; a lower limit refuses sooner."""
    now = [0.0]
    monkeypatch.setattr("bundlerec_server.admission.time.perf_counter", lambda: now[0])
    adm = Admission(max_in_flight=8, max_queue=0, target_latency_s=0.01, interval_s=0.1)

    def window(latencies):
        now[0] += 0.1
        for s in latencies:
            adm._adapt(s)

    window([0.03] * WINDOW_MIN_CALLS)  # all over the target: 8 -> 7.2
    assert adm.limit == pytest.approx(7.2)
    window([0.03] * (WINDOW_MIN_CALLS - 1))  # too few calls for a verdict yet
    assert adm.limit == pytest.approx(7.2)
    adm._adapt(0.03)
    assert adm.limit == pytest.approx(6.48)
    window([0.005] * (WINDOW_MIN_CALLS - 1) + [0.5])  # one slow call: the 99th percentile is within the target
    assert adm.limit == pytest.approx(7.48)
    window([0.005] * (WINDOW_MIN_CALLS - 2) + [0.5] * 2)  # two are over it
    assert adm.limit == pytest.approx(7.48 * 0.9)
    for _ in range(40):
        window([0.03] * WINDOW_MIN_CALLS)
    assert adm.limit == pytest.approx(1.0)  # floor
    gate = asyncio.Event()
    first = hold_slot(adm, gate)
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):  # limit 1, no queue: the second call is refused
        async with adm.slot():
            pass
    gate.set()
    await first
    for _ in range(10):
        window([0.001] * WINDOW_MIN_CALLS)
    assert adm.limit == pytest.approx(8.0)  # ceiling


async def test_fixed_limit_without_target():
    adm = Admission(max_in_flight=3, max_queue=1)
    for _ in range(3):
        async with adm.slot():
            await asyncio.sleep(0.01)
    assert adm.limit == 3.0


def test_codel_calls_the_queue_standing_only_when_a_whole_interval_waited(monkeypatch):
    """CoDel's detector on a fake clock: bursts (some call of the interval found a free slot) never count; an
    interval whose shortest wait exceeded the target makes the next one overloaded, and then (and only then)
    a call that waited over 2 x target is refused — never the first of an interval."""
    now = [0.0]
    monkeypatch.setattr("bundlerec_server.admission.time.perf_counter", lambda: now[0])
    adm = Admission(max_in_flight=1, max_queue=10, queue_target_s=0.005, interval_s=0.1)
    steps = [  # (time, wait of the granted call, refused?, overloaded after)
        (0.00, 0.000, False, False),
        (0.05, 0.020, False, False),  # long wait, but the interval also saw a free slot: a burst
        (0.11, 0.020, False, False),  # interval 1 ends: shortest wait 0 -> not overloaded
        (0.15, 0.030, False, False),
        (0.22, 0.030, False, True),   # interval 2 ends: shortest wait 20 ms > 5 ms -> standing; first call kept
        (0.25, 0.008, False, True),   # within 2 x target
        (0.26, 0.020, True, True),    # over 2 x target while overloaded: refused
        (0.33, 0.000, False, True),   # interval 3 ends: shortest 8 ms > 5 ms, still standing
        (0.44, 0.000, False, False),  # interval 4 ends: a free slot was seen -> no longer overloaded
        (0.45, 0.050, False, False),  # long waits are tolerated again
    ]
    for t, wait, refused, overloaded in steps:
        now[0] = t
        assert adm._observe_wait(wait) is refused, t
        assert adm.overloaded is overloaded, t


async def test_codel_refuses_a_queued_call_after_2x_target_without_waiting_for_a_slot():
    adm = Admission(max_in_flight=1, max_queue=8, queue_target_s=0.005, interval_s=60.0)
    gate = asyncio.Event()
    holder = hold_slot(adm, gate)
    await asyncio.sleep(0.01)
    adm.overloaded, adm._interval_end = True, float("inf")  # a standing queue was seen
    async with asyncio.timeout(5):
        with pytest.raises(Overloaded) as exc:
            async with adm.slot():
                pass
    assert "no slot within" in str(exc.value) and exc.value.retry_after_s == adm.retry_after_s
    assert not holder.done() and adm.in_flight == 1  # refused by its timer while the slot was still held
    assert adm.waiting == 0 and adm.shed == 1
    gate.set()
    await holder
    assert adm.in_flight == 0


async def test_codel_refuses_a_stale_waiter_at_grant_and_serves_the_next():
    adm = Admission(max_in_flight=1, max_queue=8, queue_target_s=0.02, interval_s=60.0)
    adm._interval_end = float("inf")
    gate = asyncio.Event()
    results = []

    async def call(tag, hold=False):
        try:
            async with adm.slot():
                results.append((tag, "ran"))
                if hold:
                    await gate.wait()
        except Overloaded:
            results.append((tag, "refused"))

    holder = asyncio.create_task(call("holder", hold=True))
    await asyncio.sleep(0)
    stale = asyncio.create_task(call("stale"))  # queued before overload was detected: no timer
    await asyncio.sleep(0.06)  # waits 60 ms > 2 x 20 ms
    adm.overloaded = True
    fresh = asyncio.create_task(call("fresh"))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, stale, fresh)
    assert results == [("holder", "ran"), ("stale", "refused"), ("fresh", "ran")]
    assert adm.in_flight == 0 and adm.waiting == 0 and adm.shed == 1


async def test_a_queue_target_of_zero_is_plain_fifo():
    adm = Admission(max_in_flight=1, max_queue=4)
    adm.overloaded = True  # never set without a target; even so, no timers, no refusals at grant
    gate = asyncio.Event()

    async def call(hold=False):
        async with adm.slot():
            if hold:
                await gate.wait()

    tasks = [asyncio.create_task(call(hold=True))] + [asyncio.create_task(call()) for _ in range(3)]
    await asyncio.sleep(0.03)
    gate.set()
    await asyncio.gather(*tasks)
    assert adm.shed == 0

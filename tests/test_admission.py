"""Bounded admission (pure asyncio, no gRPC): slots, a bounded queue, immediate refusal beyond both."""

from __future__ import annotations

import asyncio

import pytest

from bundlerec_server.admission import Admission
from bundlerec_server.errors import Overloaded


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

    async def hold():
        async with adm.slot():
            await gate.wait()

    holder = asyncio.create_task(hold())
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


async def test_limit_adapts_to_the_latency_target():
    """AIMD: calls over the target cut the limit by 10 % (once per target interval), calls within it grow it
    by 1/limit, always between 1 and max_in_flight; a lower limit refuses sooner."""
    adm = Admission(max_in_flight=8, max_queue=0, target_latency_s=0.01)

    async def call(seconds):
        async with adm.slot():
            await asyncio.sleep(seconds)

    await call(0.03)  # over the target: 8 -> 7.2
    assert adm.limit == pytest.approx(7.2)
    await asyncio.gather(call(0.03), call(0.03))  # both end within one interval: one cut only
    assert adm.limit == pytest.approx(6.48)
    for _ in range(40):
        await call(0.03)
    assert adm.limit == pytest.approx(1.0)  # floor
    gate = asyncio.Event()

    async def held():
        async with adm.slot():
            await gate.wait()

    first = asyncio.create_task(held())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):  # limit 1, no queue: the second call is refused
        async with adm.slot():
            pass
    gate.set()
    await first
    for _ in range(200):
        await call(0)  # within the target: +1/limit each
    assert adm.limit == pytest.approx(8.0)  # ceiling


async def test_fixed_limit_without_target():
    adm = Admission(max_in_flight=3, max_queue=1)
    for _ in range(3):
        async with adm.slot():
            await asyncio.sleep(0.01)
    assert adm.limit == 3.0

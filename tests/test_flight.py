"""Single-flight: concurrent misses of one key compute it once and all get the same reply; a waiter keeps its own
deadline; a leader that fails or is cancelled never hangs or fails its waiters; a reload never joins a call to the
old snapshot's work. And the Search reply cache: identical replies on and off, emptied on reload, bypassed by
re-ranking (tests/test_cross_encoder.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings
from prometheus_client import REGISTRY, Counter, generate_latest

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server.batching import MicroBatcher
from bundlerec_server.errors import OutOfTime
from bundlerec_server.flight import Flights
from bundlerec_server.query_cache import QueryCache
from bundlerec_server.runtime import Runtime, Serving
from bundlerec_server.settings import Settings

UNIT = Counter("bundlerec_test_flight_coalesced_total", "test-only")
WAIT = 30.0  # a bound on waiting for an event, never a measured time


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# --- the single-flight object -------------------------------------------------------------------------------


async def test_waiters_get_the_leaders_result_and_nothing_is_left_in_flight():
    flights = Flights(UNIT)
    assert await flights.join("k", lambda: None) is None  # nobody computes it: the caller does
    release = asyncio.Event()

    async def leader():
        with flights.lead("k") as flight:
            await release.wait()
            flight.result = "value"
        return "value"

    lead = asyncio.create_task(leader())
    await asyncio.sleep(0)
    assert flights.running("k") and not flights.running("other")
    with flights.lead("k") as second:  # another call finds a leader: a no-op flight, nothing replaced
        assert second.future is None
    waiters = [asyncio.create_task(flights.join("k", lambda: None)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(lead, *waiters) == ["value"] * 4
    assert flights.coalesced == 3 and len(flights) == 0


async def test_a_waiter_out_of_time_leaves_the_leader_running():
    flights = Flights(UNIT)
    release = asyncio.Event()

    async def leader():
        with flights.lead("k") as flight:
            await release.wait()
            flight.result = 42
        return 42

    lead = asyncio.create_task(leader())
    await asyncio.sleep(0)
    with pytest.raises(OutOfTime):  # its own budget, 10 ms: the leader is held until after it
        await flights.join("k", lambda: 0.01)
    def spent():
        raise OutOfTime()

    with pytest.raises(OutOfTime):  # no budget left at all: not even a wait
        await flights.join("k", spent)
    late = asyncio.create_task(flights.join("k", lambda: None))
    await asyncio.sleep(0)
    late.cancel()  # a cancelled waiter does not cancel the leader either
    release.set()
    assert await lead == 42 and late.cancelled() and flights.coalesced == 0


@pytest.mark.parametrize("ending", ["fails", "cancelled", "out of time"])
async def test_a_leader_without_a_result_hands_its_waiters_none_and_the_first_one_leads_next(ending):
    flights = Flights(UNIT)
    entered, release = asyncio.Event(), asyncio.Event()

    async def leader():
        with flights.lead("k"):
            entered.set()
            await release.wait()
            if ending == "fails":
                raise RuntimeError("boom")
            if ending == "out of time":
                raise OutOfTime()

    async def caller(n):  # what Runtime.cached does: join, else lead and compute
        got = await flights.join("k", lambda: None)
        if got is not None:
            return got
        with flights.lead("k") as flight:
            await asyncio.sleep(0)
            flight.result = f"computed by {n}"
        return flight.result

    lead = asyncio.create_task(leader())
    await entered.wait()
    waiters = [asyncio.create_task(caller(n)) for n in range(3)]
    await asyncio.sleep(0)
    if ending == "cancelled":
        lead.cancel()
    release.set()
    results = await asyncio.gather(*waiters)
    assert results == ["computed by 0"] * 3  # the first waiter led; the others joined it
    assert flights.coalesced == 2 and len(flights) == 0
    with pytest.raises((RuntimeError, OutOfTime, asyncio.CancelledError)):
        await lead


# --- the query cache's single-flight in Runtime.call (a gated encoder) --------------------------------------


class Gated:
    """An encoder that blocks until ``gate`` is set, counting texts and batches."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.texts: list[str] = []

    def __call__(self, texts):
        self.entered.set()
        self.gate.wait(WAIT)
        self.texts += texts
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def _runtime(enc: Gated, workers: int = 1) -> tuple[Runtime, Serving]:
    rt = Runtime(Settings(provider="cpu", encode_workers=workers))
    batcher = MicroBatcher(enc, rt.pool, max_batch=4, workers=workers)
    return rt, Serving(engine=None, batcher=batcher, cache=QueryCache(16, "v", "a"))  # type: ignore[arg-type]


async def _entered(enc: Gated) -> None:
    await asyncio.get_running_loop().run_in_executor(None, enc.entered.wait, WAIT)


async def test_concurrent_misses_of_one_text_encode_once():
    enc = Gated()
    rt, serving = _runtime(enc)
    coalesced0 = counter("bundlerec_query_cache_coalesced_total")
    try:
        calls = [asyncio.create_task(rt.call(serving, "milk", lambda v: float(v[0]), None)) for _ in range(5)]
        calls.append(asyncio.create_task(rt.encode(serving, "milk", None)))
        await _entered(enc)
        await asyncio.sleep(0)
        enc.gate.set()
        out = await asyncio.gather(*calls)
        assert out[:5] == [4.0] * 5 and np.array_equal(out[5], [4.0, 1.0])
        assert enc.texts == ["milk"] and serving.cache.flights.coalesced == 5
        assert counter("bundlerec_query_cache_coalesced_total") - coalesced0 == 5
    finally:
        await rt.close()


async def test_a_waiter_with_a_short_deadline_is_out_of_time_and_the_leader_completes():
    enc = Gated()
    rt, serving = _runtime(enc)
    try:
        lead = asyncio.create_task(rt.call(serving, "milk", lambda v: float(v[0]), None))
        await _entered(enc)
        with pytest.raises(OutOfTime):
            await rt.call(serving, "milk", lambda v: float(v[0]), lambda: 0.02)  # 17 ms of budget
        enc.gate.set()
        assert await lead == 4.0 and enc.texts == ["milk"] and serving.cache.flights.coalesced == 0
    finally:
        await rt.close()


async def test_a_waiter_whose_leader_ran_out_of_time_encodes_itself():
    enc = Gated()
    rt, serving = _runtime(enc, workers=2)  # the waiter's own batch gets the second worker
    try:
        # a deadline long enough for the leader's batch to start even on busy cores, short enough to pass while held
        lead = asyncio.create_task(rt.call(serving, "milk", lambda v: float(v[0]), lambda: 1.0))
        await _entered(enc)
        waiter = asyncio.create_task(rt.call(serving, "milk", lambda v: float(v[0]), None))
        enc.entered.clear()
        with pytest.raises(OutOfTime):
            await lead
        await _entered(enc)  # the waiter's own encode has started (the leader's is still held): no race with its fill
        enc.gate.set()
        assert await waiter == 4.0
        await _until(lambda: serving.batcher.idle)  # the leader's batch, released by the same gate, may finish later
        assert enc.texts == ["milk", "milk"]  # the waiter's own encode: nothing inherited
    finally:
        await rt.close()


# --- through the server ----------------------------------------------------------------------------------------


def _search(text: str, **kw) -> pb.SearchRequest:
    return pb.SearchRequest(query=text, k=kw.pop("k", 10), retrieval_mode=kw.pop("mode", pb.RETRIEVAL_MODE_DENSE), **kw)


def _recommend(text: str) -> pb.RecommendRequest:
    return pb.RecommendRequest(query=text, retrieval_mode=pb.RETRIEVAL_MODE_DENSE, max_bundles=4)


async def _one(stub, req, timeout: float | None = WAIT):
    """A Search reply or a Recommend stream (serialised, the summary without server_ms), or the status code."""
    try:
        if isinstance(req, pb.SearchRequest):
            return (await stub.Search(req, timeout=timeout)).SerializeToString(deterministic=True)
        out = []
        async for m in stub.Recommend(req, timeout=timeout):
            m.summary.server_ms = 0
            out.append(m.SerializeToString(deterministic=True))
        return out
    except grpc.aio.AioRpcError as err:
        return err.code()


class Held:
    """Wraps an engine method: its first call waits for ``gate`` (then raises ``fail`` if set); every call is
    counted. Installed on the engine instance, removed by :meth:`restore`."""

    def __init__(self, engine, name: str, fail: bool = False) -> None:
        self.engine, self.name, self.fail = engine, name, fail
        self.real = getattr(engine, name)
        self.calls = 0
        self.gate, self.entered = threading.Event(), threading.Event()
        setattr(engine, name, self)

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.gate.wait(WAIT)
            if self.fail:
                raise RuntimeError("the leader's work failed")
        return self.real(*args, **kw)

    def restore(self) -> None:
        delattr(self.engine, self.name)


async def _until(predicate) -> None:
    """Waits (without a timed assertion) until ``predicate()`` holds, e.g. calls admitted on the server."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        await asyncio.sleep(0.005)


def _held_run(held: Held, main):
    """``asyncio.run(main())``, then ``held`` released and removed whatever happened."""
    try:
        return asyncio.run(main())
    finally:
        held.gate.set()
        held.restore()


def _reference(server: ServerThread, req):
    """What ``server`` (no cache) replies to ``req``."""
    return asyncio.run(_replies(server.target, [req], False))[0]


def _held_request(server: ServerThread, rpc: str, text: str, fail: bool = False) -> tuple[object, Held]:
    """A ``rpc`` request for ``text``, and the engine method its work runs (Search: ``search``; Recommend:
    ``anchors``) held for its first call."""
    req = _search(text) if rpc == "search" else _recommend(text)
    return req, Held(server.app.runtime.serving().engine, "search" if rpc == "search" else "anchors", fail)


@pytest.fixture(scope="module")
def flights_servers(tiny_artifact):
    """Caches on (query cache 64, reply caches), and no cache at all: the reference replies."""
    on = ServerThread(server_settings(tiny_artifact, query_cache_size=64, encode_workers=2)).start()
    off = ServerThread(server_settings(tiny_artifact, query_cache_size=0)).start()
    yield on, off
    on.stop()
    off.stop()


@pytest.mark.parametrize("rpc", ["search", "recommend"])
def test_concurrent_identical_misses_compute_once_and_get_identical_replies(flights_servers, rpc):
    on, off = flights_servers
    serving = on.app.runtime.serving()
    cache = serving.searches if rpc == "search" else serving.replies
    metric = f"bundlerec_{'search' if rpc == 'search' else 'reply'}_cache_coalesced_total"
    req, held = _held_request(on, rpc, f"organic milk {rpc}")
    coalesced0, misses0 = counter(metric), cache.misses

    async def main():
        async with grpc.aio.insecure_channel(on.target) as ch:
            stub = pb_grpc.BundleRecommenderStub(ch)
            calls = [asyncio.create_task(_one(stub, req)) for _ in range(6)]
            await _until(lambda: on.app.runtime.admission.in_flight == 6 and held.entered.is_set())
            held.gate.set()
            return await asyncio.gather(*calls)

    got = _held_run(held, main)
    want = _reference(off, req)
    assert want and got == [want] * 6  # exactly what an uncached server computes
    assert held.calls == 1 and cache.misses - misses0 == 6 and len(cache.flights) == 0
    assert counter(metric) - coalesced0 == 5


@pytest.mark.parametrize("rpc", ["search", "recommend"])
def test_a_waiter_out_of_time_gets_deadline_while_the_leader_completes(flights_servers, rpc):
    on, off = flights_servers
    req, held = _held_request(on, rpc, f"sparkling water {rpc}")

    async def main():
        async with grpc.aio.insecure_channel(on.target) as ch:
            stub = pb_grpc.BundleRecommenderStub(ch)
            lead = asyncio.create_task(_one(stub, req))
            await _until(held.entered.is_set)
            late = await _one(stub, req, timeout=0.3)  # joins the leader, held past its deadline
            assert not lead.done()
            held.gate.set()
            return late, await lead

    late, lead = _held_run(held, main)
    if rpc == "search":
        assert late == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # the stream's own DEADLINE stop, or the client's deadline if it came first
        assert late == grpc.StatusCode.DEADLINE_EXCEEDED or (
            pb.RecommendResponse.FromString(late[-1]).summary.stop_reason == pb.STOP_REASON_DEADLINE)
    assert isinstance(lead, (bytes, list)) and held.calls == 1

    assert lead == _reference(off, req)


@pytest.mark.parametrize("ending", ["fails", "cancelled"])
def test_a_failing_or_cancelled_leader_neither_hangs_nor_fails_its_waiters(flights_servers, ending):
    on, off = flights_servers
    req, held = _held_request(on, "search", f"frozen pizza {ending}", fail=ending == "fails")

    async def main():
        async with grpc.aio.insecure_channel(on.target) as ch:
            stub = pb_grpc.BundleRecommenderStub(ch)
            lead_call = stub.Search(req, timeout=WAIT)
            await _until(held.entered.is_set)
            waiters = [asyncio.create_task(_one(stub, req)) for _ in range(3)]
            await _until(lambda: on.app.runtime.admission.in_flight == 4)
            if ending == "cancelled":
                lead_call.cancel()  # the leader's worker is still held: the waiters must not wait for it
                got = await asyncio.gather(*waiters)
                held.gate.set()
            else:
                held.gate.set()
                got = await asyncio.gather(*waiters)
            try:
                lead = await lead_call
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                lead = err.code() if isinstance(err, grpc.aio.AioRpcError) else grpc.StatusCode.CANCELLED
            return lead, got

    lead, got = _held_run(held, main)

    want = _reference(off, req)
    assert lead in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)  # the leader's own end
    assert got == [want] * 3 and held.calls == 2  # the first waiter computed; the others took its reply


# --- the Search reply cache ------------------------------------------------------------------------------------


def _search_requests(category: str) -> list[pb.SearchRequest]:
    out = []
    for i, text in enumerate(["organic", "milk", "bananas", "  organic\tbaby   spinach ", "organic baby spinach",
                              "pasta sauce\n", "pasta  sauce", "cheese"]):
        for mode in (pb.RETRIEVAL_MODE_UNSPECIFIED, pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_HYBRID, pb.RETRIEVAL_MODE_LEXICAL):
            out.append(pb.SearchRequest(query=text, retrieval_mode=mode, k=3 + i))
            out.append(pb.SearchRequest(query=text, retrieval_mode=mode, filters=pb.Filters(exclude_categories=[category])))
    return out


async def _replies(target: str, reqs: list, concurrent: bool) -> list:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.BundleRecommenderStub(ch)
        if concurrent:
            return list(await asyncio.gather(*(_one(stub, r) for r in reqs)))
        return [await _one(stub, r) for r in reqs]


def test_search_replies_are_identical_cached_and_uncached(flights_servers):
    on, off = flights_servers
    reqs = _search_requests(on.app.runtime.engine().catalog.categories[0])
    searches = on.app.runtime.serving().searches
    assert searches is not None and off.app.runtime.serving().searches is None
    want = asyncio.run(_replies(off.target, reqs, concurrent=False))
    assert all(isinstance(w, bytes) for w in want) and len(set(want)) > len(reqs) // 4
    hits0, h0, m0, n0 = counter("bundlerec_search_cache_hits_total"), searches.hits, searches.misses, len(searches)
    assert asyncio.run(_replies(on.target, reqs, concurrent=False)) == want
    assert asyncio.run(_replies(on.target, reqs, concurrent=False)) == want  # every one a hit
    assert asyncio.run(_replies(on.target, reqs * 3, concurrent=True)) == want * 3
    hits, misses = searches.hits - h0, searches.misses - m0
    assert hits >= len(reqs) * 4 and counter("bundlerec_search_cache_hits_total") - hits0 == hits
    assert hits + misses == len(reqs) * 5 and len(searches) - n0 < len(reqs)  # whitespace variants share (dense)


@pytest.fixture(scope="module")
def other_encoder_artifact(artifact_root, tiny_artifact) -> Path:
    """The same catalog under a differently seeded tiny BERT: other vectors, another version."""
    from bundlerec_export.tiny import make_tiny_bert

    time.sleep(1.1)  # artifact versions carry the build time
    model = make_tiny_bert(artifact_root / "tiny-bert-seed5", seed=5)
    return build_tiny_artifact(artifact_root, name="tiny-seed5", base_model=model)


def test_a_reload_empties_the_search_cache_and_never_joins_the_old_snapshots_work(flights_servers, tiny_artifact,
                                                                                 other_encoder_artifact):
    fresh_a = flights_servers[1]  # no cache, artifact A
    cached = ServerThread(server_settings(tiny_artifact, query_cache_size=32, encode_workers=2)).start()
    fresh_b = ServerThread(server_settings(other_encoder_artifact)).start()
    reqs = [_search(q) for q in ("organic", "milk", "cheese", "chips")]
    held_req = _search("yogurt")
    try:
        on_a = asyncio.run(_replies(cached.target, reqs, False))
        old = cached.app.runtime.serving()
        assert len(old.searches) == len(reqs)
        held = Held(old.engine, "search")

        async def main():
            async with grpc.aio.insecure_channel(cached.target) as ch:
                stub = pb_grpc.BundleRecommenderStub(ch)
                on_old = asyncio.create_task(_one(stub, held_req))  # leads "yogurt" on the old snapshot, held
                await _until(held.entered.is_set)
                reload = cached.app.runtime.reload(other_encoder_artifact)  # on the server's loop
                assert await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(reload, cached.loop)) is True
                on_new = await _one(stub, held_req)  # computed on the new snapshot while the old one is held
                assert not on_old.done()
                held.gate.set()
                return await on_old, on_new

        old_reply, new_reply = _held_run(held, main)
        new = cached.app.runtime.serving().searches
        assert new is not None and new is not old.searches and new.misses == 1 and len(new) == 1
        assert old_reply == _reference(fresh_a, held_req)
        assert new_reply == _reference(fresh_b, held_req) != old_reply
        on_b = asyncio.run(_replies(cached.target, reqs, False))
        assert on_b == asyncio.run(_replies(fresh_b.target, reqs, False)) and on_b != on_a
        assert asyncio.run(_replies(cached.target, reqs, False)) == on_b and new.hits == len(reqs)
    finally:
        cached.stop()
        fresh_b.stop()


def test_settings_and_counters(tiny_artifact):
    assert Settings().reply_cache is True  # the Search reply cache comes with the Recommend one
    text = generate_latest().decode()
    for name in ("bundlerec_search_cache_hits_total", "bundlerec_search_cache_misses_total", "bundlerec_search_cache_entries",
                 "bundlerec_query_cache_coalesced_total", "bundlerec_reply_cache_coalesced_total",
                 "bundlerec_search_cache_coalesced_total"):
        assert f"\n{name} " in text

"""One hop per call: retrieval, bundling and the reply run in the encode worker right after the batch's encode.

Results are identical to the engine's own pipeline run directly (alone and as concurrent micro-batched calls,
cache on and off, dense / hybrid / lexical / personalised); a hot reload never mixes two artifacts within a
call; cancellation, deadlines and errors reach only the caller they belong to; one loop wake-up per batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server import convert
from bundlerec_server.batching import MicroBatcher
from bundlerec_server.domain import RerankOutcome
from bundlerec_server.engine import Engine
from bundlerec_server.errors import OutOfTime
from bundlerec_server.runtime import Runtime, Serving
from bundlerec_server.settings import Settings

QUERIES = ["organic", "milk", "bananas", "sparkling water", "cheese", "chips", "frozen pizza", "yogurt",
           "organic baby spinach", "pasta sauce", "dark chocolate", "eggs"]
MODES = [pb.RETRIEVAL_MODE_UNSPECIFIED, pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_HYBRID, pb.RETRIEVAL_MODE_LEXICAL]


# --- the reference: the engine's pipeline, run directly, one query at a time -----------------------------


def _mode(engine: Engine, mode: int):
    return engine.mode_for(convert.check_mode(mode, "retrieval_mode", []))


def reference_recommend(engine: Engine, req: pb.RecommendRequest) -> list[bytes]:
    q = convert.recommend_query(req, engine.settings)
    vec = None
    if engine.needs_vector(_mode(engine, req.retrieval_mode)):
        vec, _ = engine.personalize(engine.encoder.encode([q.query])[0], q.recent_item_ids)
    bundles = engine.recommend(q, vec)
    return [convert.bundle_message(b, rank, engine.catalog).SerializeToString(deterministic=True)
            for rank, b in enumerate(bundles, start=1)]


def reference_search(engine: Engine, req: pb.SearchRequest) -> bytes:
    q = convert.search_query(req, engine.settings)
    vec = engine.encoder.encode([q.query])[0] if engine.needs_vector(_mode(engine, req.retrieval_mode)) else None
    hits = engine.search(q, vec)
    return pb.SearchResponse(hits=[convert.search_hit(h, engine.catalog) for h in hits], artifact_version=engine.version,
                             rerank=convert.RERANK_TO_PB[RerankOutcome.NOT_USED]).SerializeToString(deterministic=True)


def requests(item_id: str) -> list[pb.RecommendRequest | pb.SearchRequest]:
    out: list[pb.RecommendRequest | pb.SearchRequest] = []
    for i, text in enumerate(QUERIES):
        mode = MODES[i % len(MODES)]
        recent = [item_id] if i % 3 == 0 else []  # personalised: the history blend follows the lookup
        out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, recent_item_ids=recent, max_bundles=5))
        out.append(pb.SearchRequest(query=text, retrieval_mode=mode, k=10))
    return out


async def _served(target: str, reqs: list, concurrent: bool) -> list[tuple[str, object]]:
    """(artifact version, bundle messages or the serialised SearchResponse) of each request."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BundleRecommenderStub(channel)

        async def one(req):
            if isinstance(req, pb.SearchRequest):
                resp = await stub.Search(req, timeout=30)
                return resp.artifact_version, resp.SerializeToString(deterministic=True)
            bundles, version = [], ""
            async for m in stub.Recommend(req, timeout=30):
                if m.HasField("bundle"):
                    bundles.append(pb.RecommendResponse(bundle=m.bundle).SerializeToString(deterministic=True))
                else:
                    version = m.summary.artifact_version
                    assert m.summary.bundles_sent == len(bundles)
            return version, bundles

        if concurrent:
            return list(await asyncio.gather(*(one(r) for r in reqs)))
        return [await one(r) for r in reqs]


def test_results_equal_the_engines_own_pipeline_alone_and_concurrently(cache_on_off):
    on, off = cache_on_off
    engine = off.app.runtime.engine()
    assert engine.batch_exact and engine.lexical is not None
    item_id = next(iter(engine.catalog.row_of))
    reqs = requests(item_id)
    want = [(engine.version, reference_recommend(engine, r) if isinstance(r, pb.RecommendRequest) else reference_search(engine, r))
            for r in reqs]
    assert any(w[1] for w in want if isinstance(w[1], list))  # bundles exist to compare
    batcher = off.app.runtime.serving().batcher
    assert asyncio.run(_served(off.target, reqs, concurrent=False)) == want
    before = (batcher.batches, batcher.encoded)
    assert asyncio.run(_served(off.target, reqs * 4, concurrent=True)) == want * 4
    batches, encoded = batcher.batches - before[0], batcher.encoded - before[1]
    assert batches < encoded, "the concurrent calls formed micro-batches"
    serving = on.app.runtime.serving()
    assert asyncio.run(_served(on.target, reqs * 4, concurrent=True)) == want * 4  # misses micro-batched, then hits
    assert asyncio.run(_served(on.target, reqs, concurrent=False)) == want  # hits only
    # a reply-cache hit (impersonal Recommend, Search) skips the query cache
    assert serving.cache.hits + serving.replies.hits + serving.searches.hits >= len(reqs) and serving.cache.misses > 0


# --- a hot reload while calls run in the workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def other_artifact(artifact_root, tiny_artifact) -> Path:
    """The same catalog under a differently seeded tiny BERT: other vectors, other rankings, another version."""
    from bundlerec_export.tiny import make_tiny_bert

    time.sleep(1.1)  # artifact versions carry the build time
    model = make_tiny_bert(artifact_root / "tiny-bert-seed2", seed=2)
    return build_tiny_artifact(artifact_root, name="tiny-seed2", base_model=model)


def _wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.mark.parametrize("cache_size", [0, 16])
def test_a_reload_while_calls_run_in_workers_never_mixes_artifacts(tiny_artifact, other_artifact, cache_size):
    srv = ServerThread(server_settings(tiny_artifact, query_cache_size=cache_size, encode_workers=2)).start()
    try:
        old = srv.app.runtime.serving()
        gate, inner = threading.Event(), old.batcher.encode_fn

        def gated(texts):  # the old engine's batches wait in the workers until the reload is done
            gate.wait(60)
            return inner(texts)

        old.batcher.encode_fn = gated
        item_id = next(iter(old.engine.catalog.row_of))
        reqs = [r for r in requests(item_id) if r.retrieval_mode != pb.RETRIEVAL_MODE_LEXICAL]
        results: dict[str, list] = {}
        first = threading.Thread(target=lambda: results.__setitem__("old", asyncio.run(_served(srv.target, reqs, True))))
        first.start()
        _wait_until(lambda: old.batcher.encoded >= 2 and len(old.batcher._queue) > 0)  # both workers held, more queued
        assert srv.call(srv.app.runtime.reload(other_artifact)) is True
        new = srv.app.runtime.serving()
        assert new.engine.version != old.engine.version
        second = threading.Thread(target=lambda: results.__setitem__("new", asyncio.run(_served(srv.target, reqs, True))))
        second.start()
        gate.set()
        first.join(60)
        second.join(60)
        for name, engine in (("old", old.engine), ("new", new.engine)):
            want = [(engine.version, reference_recommend(engine, r) if isinstance(r, pb.RecommendRequest) else reference_search(engine, r))
                    for r in reqs]
            assert results[name] == want, f"calls that took the {name} artifact were served by it alone"
        assert reference_search(old.engine, reqs[1]) != reference_search(new.engine, reqs[1])
    finally:
        srv.stop()


# --- the batcher: one hop, one wake-up per batch, errors and cancellation per caller -----------------------


class Gated:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []

    def __call__(self, texts):
        self.gate.wait(10)
        self.batch_sizes.append(len(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


async def test_then_runs_in_the_worker_and_a_batch_wakes_the_loop_once():
    enc = Gated()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=4, workers=1)
    loop = asyncio.get_running_loop()
    wakeups = []
    real = loop.call_soon_threadsafe

    def counting(*args, **kw):
        wakeups.append(threading.current_thread().name)
        return real(*args, **kw)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    ran_in = []

    def then(vec):
        ran_in.append(threading.current_thread())
        return ("done", int(vec[0]))

    try:
        first = asyncio.create_task(b.submit("a", then))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b.submit("x" * n, then)) for n in range(2, 7)]
        await asyncio.sleep(0.05)
        enc.gate.set()
        out = await asyncio.gather(first, *rest)
    finally:
        del loop.call_soon_threadsafe
    assert out == [("done", n) for n in range(1, 7)]
    assert enc.batch_sizes == [1, 4, 1]
    assert len(wakeups) == 3  # one per batch, not one per caller
    assert all(t is not threading.main_thread() for t in ran_in) and len(ran_in) == 6


async def test_a_free_worker_and_an_empty_queue_start_at_once_without_a_task():
    enc = Gated()
    enc.gate.set()
    pool = ThreadPoolExecutor(2)
    b = MicroBatcher(enc, pool, max_batch=4, workers=2)
    tasks_before = asyncio.all_tasks()
    fut = b._enqueue("a", None, None)  # what submit awaits
    assert not b._queue and b._free == 1  # handed to a worker synchronously: no dispatcher turn, no queue
    assert asyncio.all_tasks() == tasks_before  # and no dispatcher task exists
    assert int((await fut)[0]) == 1 and b._free == 2
    assert not b.running


async def test_max_wait_lets_a_batch_fill():
    enc = Gated()
    enc.gate.set()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05, workers=1)
    out = await asyncio.gather(*(b.submit("x" * n) for n in range(1, 4)))
    assert [int(v[0]) for v in out] == [1, 2, 3] and enc.batch_sizes == [3]


async def test_an_error_in_one_callers_work_reaches_only_that_caller():
    enc = Gated()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=8, workers=1)

    def boom(vec):
        raise ValueError("bad request for this caller")

    first = asyncio.create_task(b.submit("busy"))
    await asyncio.sleep(0.05)
    good = asyncio.create_task(b.submit("good", lambda v: int(v[0])))
    bad = asyncio.create_task(b.submit("bad", boom))
    no_text = asyncio.create_task(b.run(np.array([7.0]), lambda v: float(v[0])))  # e.g. a cached vector
    await asyncio.sleep(0.05)
    enc.gate.set()
    assert (await first)[0] == 4 and await good == 4 and await no_text == 7.0
    with pytest.raises(ValueError, match="this caller"):
        await bad
    assert enc.batch_sizes == [1, 2]  # the vector job joined the batch without being encoded


async def test_a_caller_gone_during_its_encode_costs_no_retrieval():
    enc = Gated()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=8, workers=1)
    ran = []
    doomed = asyncio.create_task(b.submit("doomed", lambda v: ran.append("doomed")))
    kept = asyncio.create_task(b.submit("kept", lambda v: ran.append("kept")))
    await asyncio.sleep(0.05)  # doomed is in the worker (blocked in encode), kept is queued
    doomed.cancel()
    enc.gate.set()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert ran == ["kept"] and enc.batch_sizes == [1, 1]


async def test_a_pool_shut_down_cancels_waiting_callers_instead_of_hanging():
    enc = Gated()
    pool = ThreadPoolExecutor(1)
    b = MicroBatcher(enc, pool, max_batch=1, workers=2)  # two slots, one thread: the second batch waits in the pool
    running = asyncio.create_task(b.submit("a"))
    waiting = asyncio.create_task(b.submit("b"))
    await asyncio.sleep(0.05)
    pool.shutdown(wait=False, cancel_futures=True)
    enc.gate.set()
    assert int((await running)[0]) == 1
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)
    with pytest.raises(RuntimeError):  # and a later call fails at once
        await asyncio.wait_for(b.submit("c"), 10)


async def test_the_deadline_covers_encode_and_retrieval_and_skips_the_work_of_a_late_call():
    enc = Gated()
    rt = Runtime(Settings(provider="cpu", deadline_margin_ms=5.0))
    batcher = MicroBatcher(enc, rt.pool, max_batch=4, workers=2)
    serving = Serving(engine=None, batcher=batcher)  # type: ignore[arg-type]  # call() never touches the engine
    ran = []
    with pytest.raises(OutOfTime):
        await rt.call(serving, "slow", lambda v: ran.append(v), lambda: 0.05)  # 45 ms of budget, the encode blocks
    with pytest.raises(OutOfTime):
        await rt.call(serving, "already late", lambda v: ran.append(v), lambda: 0.004)  # inside the margin: not queued
    enc.gate.set()
    assert await rt.call(serving, "in time", lambda v: int(v[0]), lambda: 30.0) == 7
    rt.pool.shutdown(wait=True)  # the late call's batch has finished in its worker too
    assert ran == [] and sorted(enc.batch_sizes) == [1, 1]  # its retrieval never ran; the second never encoded



# --- a query-cache hit: nothing to encode, so no hop (``cache_hits_on_loop``) -------------------------------


@pytest.mark.parametrize("on_loop", [True, False])
def test_a_cache_hit_runs_on_the_loop_without_a_hop_unless_turned_off(tiny_artifact, on_loop):
    rt = Runtime(server_settings(tiny_artifact, query_cache_size=8, cache_hits_on_loop=on_loop))
    rt.swap(rt.load(tiny_artifact))

    def where(vec):
        return threading.current_thread().name, np.asarray(vec).copy()

    async def main():
        serving = rt.serving()
        try:
            first = await rt.call(serving, "organic milk", where, None)  # a miss: encoded in a worker
            second = await rt.call(serving, "organic milk", where, None)  # a hit
            with pytest.raises(OutOfTime):  # a hit whose deadline has come does no work
                await rt.call(serving, "organic milk", where, lambda: 0.0)
            return first, second
        finally:
            await rt.close()

    (t1, v1), (t2, v2) = asyncio.run(main())
    assert t1.startswith("encode")
    assert (t2 == threading.current_thread().name) is on_loop and t2.startswith("encode") is not on_loop
    assert np.array_equal(v1, v2)
    assert rt.serving().cache.hits == 2  # the second call and the late one both found the vector


# --- encode inline: the only call in flight, the batcher idle (``encode_inline``) ----------------------------


def test_encode_inline_runs_a_lone_call_on_the_loop_and_anything_else_in_a_worker(tiny_artifact):
    rt = Runtime(server_settings(tiny_artifact, encode_inline=True, query_cache_size=8))
    rt.swap(rt.load(tiny_artifact))
    engine = rt.engine()

    def where(vec):
        return threading.current_thread().name, np.asarray(vec).copy()

    async def main():
        serving = rt.serving()
        batcher = serving.batcher
        try:
            alone = await rt.call(serving, "organic milk", where, None)  # nothing in flight: inline
            assert serving.cache.get("organic milk") is not None  # and the miss filled the cache
            rt.admission.in_flight = 2  # another call holds a slot: through the batcher
            busy_calls = await rt.call(serving, "dark chocolate", where, None)
            gate, inner = threading.Event(), batcher.encode_fn
            batcher.encode_fn = lambda texts: (gate.wait(10), inner(texts))[1]
            held = asyncio.ensure_future(rt.call(serving, "frozen pizza", where, None))  # a batch in the worker
            await asyncio.sleep(0)
            assert not batcher.idle
            rt.admission.in_flight = 0
            queued = asyncio.ensure_future(rt.call(serving, "bananas", where, None))  # alone, the batcher busy: queued
            await asyncio.sleep(0.05)
            assert not queued.done()
            gate.set()
            return alone, busy_calls, await held, await queued
        finally:
            await rt.close()

    loop_thread = threading.current_thread().name
    results = asyncio.run(main())
    assert [t for t, _ in results] == [loop_thread, "encode_0", "encode_0", "encode_0"]
    for (_, vec), text in zip(results, ["organic milk", "dark chocolate", "frozen pizza", "bananas"], strict=True):
        assert np.array_equal(vec, engine.encoder.encode([text])[0])  # the same vector either way
    assert Settings().encode_inline is False and Settings.load(["--encode-inline"]).encode_inline is True


def test_encode_inline_serves_the_engines_own_results(tiny_artifact):
    srv = ServerThread(server_settings(tiny_artifact, encode_inline=True)).start()
    try:
        engine = srv.app.runtime.engine()
        reqs = requests(next(iter(engine.catalog.row_of)))
        want = [(engine.version, reference_recommend(engine, r) if isinstance(r, pb.RecommendRequest) else reference_search(engine, r))
                for r in reqs]
        batcher = srv.app.runtime.serving().batcher
        assert asyncio.run(_served(srv.target, reqs, concurrent=False)) == want
        assert asyncio.run(_served(srv.target, reqs * 3, concurrent=True)) == want * 3
        assert batcher.batches < batcher.encoded  # the concurrent calls still formed micro-batches
    finally:
        srv.stop()

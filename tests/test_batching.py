"""Micro-batching: batch mates never change a result, and callers gone before their batch cost no work."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bundlerec import AsyncClient
from bundlerec_server.batching import MicroBatcher


class GatedEncoder:
    """Fake encode fn: records every text it encodes; blocks until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[str] = []
        self.batch_sizes: list[int] = []

    def __call__(self, texts):
        self.gate.wait(10)
        self.seen.extend(texts)
        self.batch_sizes.append(len(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


async def test_batches_form_under_load_and_results_map_back():
    enc = GatedEncoder()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=4, workers=1)
    first = asyncio.create_task(b.submit("a"))  # occupies the only worker
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(b.submit("x" * n)) for n in range(2, 8)]
    await asyncio.sleep(0.05)
    enc.gate.set()
    out = await asyncio.gather(first, *rest)
    assert [int(v[0]) for v in out] == [1, 2, 3, 4, 5, 6, 7]  # each caller gets its own row
    assert enc.batch_sizes == [1, 4, 2]  # bounded batches formed while the worker was busy
    await b.stop()


async def test_cancelled_callers_cost_no_encoder_work():
    enc = GatedEncoder()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=8, workers=1)
    first = asyncio.create_task(b.submit("busy"))
    await asyncio.sleep(0.05)
    doomed = [asyncio.create_task(b.submit(f"gone-{i}")) for i in range(5)]
    kept = asyncio.create_task(b.submit("kept"))
    timed_out = asyncio.create_task(asyncio.wait_for(b.submit("late"), timeout=0.01))
    await asyncio.sleep(0.05)
    for t in doomed:
        t.cancel()
    with pytest.raises(asyncio.TimeoutError):
        await timed_out
    enc.gate.set()
    await first
    await kept
    assert enc.seen == ["busy", "kept"]  # cancelled and expired queries never reached the encoder
    assert b.dropped == 6 and b.encoded == 2
    await b.stop()


async def test_retired_batcher_stops_when_idle_and_restarts_for_late_callers():
    enc = GatedEncoder()
    enc.gate.set()
    b = MicroBatcher(enc, ThreadPoolExecutor(1), max_batch=4, workers=1)
    await b.submit("a")
    b.retire()
    await asyncio.sleep(0.05)
    assert not b.running  # nothing queued: the dispatcher task ended
    late = await b.submit("late")  # a call that still held the old engine
    assert int(late[0]) == 4 and enc.seen == ["a", "late"]
    await asyncio.sleep(0.05)
    assert not b.running


async def test_same_request_same_ranking_alone_and_under_concurrent_load(server):
    """Determinism: a query's results are identical alone and inside micro-batches with other queries."""
    serving = server.app.runtime.serving()
    assert serving.engine.batch_exact
    batcher = serving.batcher
    async with AsyncClient(server.target) as c:
        alone = await c.search("organic", 20, retrieval_mode="dense")
        before = (batcher.batches, batcher.encoded)
        others = ["soda", "milk", "bananas", "sparkling water", "cheese", "chips", "frozen pizza", "yogurt"]

        async def target():
            return await c.search("organic", 20, retrieval_mode="dense")

        calls = [target() if i % 4 == 0 else c.search(others[i % len(others)], 20) for i in range(64)]
        results = await asyncio.gather(*calls)
        batches = batcher.batches - before[0]
        encoded = batcher.encoded - before[1]
    assert encoded == 64 and batches < encoded, "concurrent queries were micro-batched"
    for i in range(0, 64, 4):
        got = results[i]
        assert [h.item_id for h in got] == [h.item_id for h in alone]
        assert np.allclose([h.score for h in got], [h.score for h in alone], rtol=0, atol=1e-5)


def test_fixed_shape_encoder_is_independent_of_batch_mates(tiny_artifact):
    """The CUDA path's fixed (rows, max_length) runs, exercised on CPU: bit-identical alone or batched, chunked
    past ``fixed_rows``, and equal (to float tolerance) to the unpadded encoding."""
    from bundlerec_server.encoder import Encoder

    model, tok = tiny_artifact / "model" / "fp32.onnx", tiny_artifact / "model" / "tokenizer.json"
    fixed = Encoder(model, tok, max_length=32, fixed_rows=4)
    plain = Encoder(model, tok, max_length=32)
    texts = ["milk", "organic baby spinach leaves", "买一双好穿的鞋子", "a much longer query about pasta sauce with basil",
             "eggs", "sparkling water", "dark chocolate", "bananas", "cheddar cheese"]
    batched = fixed.encode(texts)  # 9 texts: three runs of 4 rows
    alone = np.concatenate([fixed.encode([t]) for t in texts])
    assert batched.shape == (len(texts), fixed.dim)
    assert np.array_equal(batched, alone)
    np.testing.assert_allclose(batched, plain.encode(texts), atol=1e-5)
    cuda_only = Encoder(model, tok, max_length=32, fixed_rows=4, fixed_rows_on_cuda_only=True)
    assert cuda_only.fixed_rows == 0  # on CPU the CUDA-only padding stays off


def test_batch_exactness_is_measured_not_assumed(server):
    """An encoder whose output shifts with batch size is detected, so micro-batching would be turned off."""
    from bundlerec_server.engine import Engine

    engine = server.app.runtime.engine()
    assert engine.batch_exact  # the served per-token int8 graph passes the probe

    class Drifting:
        provider = "fake"

        def encode(self, texts):
            return np.full((len(texts), 4), 1.0 + 1e-3 * len(texts), dtype=np.float32)

    class Probe:
        variant, encoder = "fake", Drifting()

    assert Engine.batch_exact.func(Probe()) is False

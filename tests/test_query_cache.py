"""The query-embedding cache: invalidated by a hot reload, never changes a ranking, bounded, counted."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings
from prometheus_client import REGISTRY, generate_latest

from bundlerec import AsyncClient
from bundlerec_server.query_cache import QueryCache, collapse_whitespace, exact, for_engine, key_function
from bundlerec_server.runtime import Runtime
from bundlerec_server.settings import Settings

QUERIES = ["organic", "milk", "bananas", "sparkling water", "cheese", "chips", "frozen pizza", "yogurt",
           "  organic\tbaby   spinach ", "organic baby spinach", "pasta sauce\n", "pasta  sauce"]


@pytest.fixture(scope="module")
def other_encoder_artifact(artifact_root, tiny_artifact) -> Path:
    """The same catalog under a differently seeded tiny BERT: every query vector differs from tiny_artifact's."""
    from bundlerec_export.tiny import make_tiny_bert

    time.sleep(1.1)  # artifact versions carry the build time
    model = make_tiny_bert(artifact_root / "tiny-bert-seed1", seed=1)
    return build_tiny_artifact(artifact_root, name="tiny-seed1", base_model=model)


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# --- the cache itself -------------------------------------------------------------------------------


def test_bounded_lru_with_read_only_private_copies():
    cache = QueryCache(3, "int8_pertoken", "v1")
    batch = np.arange(8, dtype=np.float32).reshape(4, 2)
    for i in range(10):
        cache.put(f"q{i}", batch[i % 4])
        assert len(cache) <= 3
    assert cache.get("q0") is None and cache.get("q9") is not None
    cache.get("q7")  # most recently used now: q8 is evicted next
    cache.put("new", batch[0])
    assert cache.get("q8") is None and cache.get("q7") is not None
    got = cache.get("new")
    assert got is not None and not got.flags.writeable and not np.shares_memory(got, batch)
    with pytest.raises(ValueError):
        got[0] = 1.0
    assert cache.stats()["capacity"] == 3 and len(cache) == 3


def test_bounded_under_concurrent_threads():
    cache = QueryCache(16, "v", "a")
    vec = np.ones(4, dtype=np.float32)
    sizes: list[int] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, 64, size=2000):
            if cache.get(str(i)) is None:
                cache.put(str(i), vec)
            sizes.append(len(cache))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(sizes) <= 16 and len(cache) == 16
    assert cache.hits + cache.misses == 8000 and cache.hits > 0


def test_keys_hold_variant_and_version():
    a = QueryCache(4, "int8_pertoken", "v1")
    assert a.key("milk") == ("milk", "int8_pertoken", "v1")
    assert QueryCache(4, "fp32", "v1").key("milk") != a.key("milk")
    assert QueryCache(4, "int8_pertoken", "v2").key("milk") != a.key("milk")
    with pytest.raises(ValueError):
        QueryCache(0, "x", "y")


def test_whitespace_is_collapsed_only_where_the_tokenizer_provably_ignores_it(tiny_artifact):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from benchmarks.load import load_queries

    minilm = Tokenizer.from_file(str(tiny_artifact / "model" / "tokenizer.json"))
    assert key_function(minilm) is collapse_whitespace
    # the encoder sees the same token ids for every real query in whitespace-mangled variants and their key
    for q in load_queries(None):
        for variant in (q, f"  {q} ", q.replace(" ", "\t  "), q.replace(" ", "\r\n"), f"\n{q}\t"):
            assert minilm.encode(variant).ids == minilm.encode(collapse_whitespace(variant)).ids, repr(variant)
    # anything else keys on the exact text: a tokenizer that keeps whitespace, or none at all
    kept = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    kept.pre_tokenizer = pre_tokenizers.Metaspace()
    assert key_function(kept) is exact and key_function(None) is exact
    assert collapse_whitespace(" a \t\n b\u00a0 c ") == "a b\u00a0 c"  # Unicode whitespace is left alone


def test_size_setting():
    assert Settings.load(["--query-cache-size", "64"]).query_cache_size == 64
    assert Settings().query_cache_size == 0  # off unless asked for
    with pytest.raises(ValueError, match="query_cache_size"):
        Settings(query_cache_size=-1).check()


# --- through the runtime: reload ------------------------------------------------------------------


async def test_reload_to_another_encoder_never_serves_a_stale_vector(tiny_artifact, other_encoder_artifact):
    rt = Runtime(Settings(artifact=tiny_artifact, provider="cpu", intra_op_threads=1, query_cache_size=8))
    try:
        a, b = rt.load(tiny_artifact), rt.load(other_encoder_artifact)
        text = "organic baby spinach"
        want_a, want_b = a.encoder.encode([text])[0], b.encoder.encode([text])[0]
        assert not np.allclose(want_a, want_b, atol=1e-3), "the two artifacts' encoders must differ"
        rt.swap(a)
        old = rt.serving()
        assert old.cache is not None and old.cache.version == a.version
        assert np.array_equal(await rt.encode(old, text, None), want_a)  # miss: encoded
        assert np.array_equal(await rt.encode(old, text, None), want_a) and old.cache.hits == 1  # hit
        rt.swap(b)
        new = rt.serving()
        assert new.cache is not None and new.cache is not old.cache and len(new.cache) == 0
        assert np.array_equal(await rt.encode(new, text, None), want_b)
        assert (new.cache.hits, new.cache.misses) == (0, 1)
        # a call that took the old snapshot before the swap reads the old cache only, and fills nothing new
        assert np.array_equal(await rt.encode(old, text, None), want_a)
        assert np.array_equal(await rt.encode(old, "milk", None), a.encoder.encode(["milk"])[0])
        assert len(new.cache) == 1 and old.cache.key("milk") in old.cache._entries
    finally:
        await rt.close()


def test_reload_through_the_server_serves_the_new_encoders_results(tiny_artifact, other_encoder_artifact):
    """Search on A (cache filled), hot reload to B: the same query's hits equal a cache-off server's on B."""
    cached = ServerThread(server_settings(tiny_artifact, query_cache_size=32, reply_cache=False)).start()  # the query cache alone
    fresh_b = ServerThread(server_settings(other_encoder_artifact)).start()

    async def hits(target: str, q: str) -> list[tuple[str, float]]:
        async with AsyncClient(target) as c:
            return [(h.item_id, h.score) for h in await c.search(q, 10, retrieval_mode="dense")]

    try:
        on_a = [asyncio.run(hits(cached.target, q)) for q in QUERIES]
        assert len(cached.app.runtime.serving().cache) == len({collapse_whitespace(q) for q in QUERIES})
        assert cached.call(cached.app.runtime.reload(other_encoder_artifact)) is True
        on_b = [asyncio.run(hits(cached.target, q)) for q in QUERIES]
        want_b = [asyncio.run(hits(fresh_b.target, q)) for q in QUERIES]
        assert on_b == want_b and on_b != on_a
        assert cached.app.runtime.serving().cache.hits == len(QUERIES) - len({collapse_whitespace(q) for q in QUERIES})
    finally:
        cached.stop()
        fresh_b.stop()


# --- never changes a ranking ----------------------------------------------------------------------


async def _results(target: str, calls: list[tuple[str, str, dict]], concurrent: bool) -> list:
    async with AsyncClient(target) as c:
        async def one(rpc: str, q: str, kw: dict):
            if rpc == "search":
                return [(h.item_id, h.score) for h in await c.search(q, 10, **kw)]
            return [b.SerializeToString(deterministic=True) async for b in c.recommend(q, max_bundles=5, **kw)]

        if concurrent:
            return list(await asyncio.gather(*(one(*call) for call in calls)))
        return [await one(*call) for call in calls]


def _calls(repeat: int, item_id: str) -> list[tuple[str, str, dict]]:
    kinds = [{}, {"retrieval_mode": "dense"}, {"retrieval_mode": "hybrid"}]
    calls = []
    for r in range(repeat):
        for i, q in enumerate(QUERIES):
            kw = dict(kinds[(i + r) % len(kinds)])
            calls.append(("search", q, kw))
            rec = dict(kw, recent_item_ids=[item_id]) if i % 3 == 0 else kw  # personalised after the lookup
            calls.append(("recommend", q, rec))
    return calls


def test_same_rankings_with_cache_on_and_off_alone_and_under_concurrent_load(cache_on_off):
    on, off = cache_on_off
    assert on.app.runtime.serving().cache is not None and off.app.runtime.serving().cache is None
    item_id = next(iter(on.app.runtime.engine().catalog.row_of))
    calls = _calls(repeat=3, item_id=item_id)  # every query three times: hits after the first
    want = asyncio.run(_results(off.target, calls, concurrent=False))
    hits0 = counter("bundlerec_query_cache_hits_total")
    assert asyncio.run(_results(on.target, calls, concurrent=False)) == want
    assert asyncio.run(_results(on.target, calls, concurrent=True)) == want  # micro-batched and cached
    assert asyncio.run(_results(off.target, calls, concurrent=True)) == want
    cache = on.app.runtime.serving().cache
    assert cache.hits > 0 and counter("bundlerec_query_cache_hits_total") - hits0 == cache.hits
    assert len(cache) <= cache.capacity


def test_hit_and_miss_counters_are_exported(cache_on_off):
    on, _ = cache_on_off
    misses0 = counter("bundlerec_query_cache_misses_total")
    asyncio.run(_results(on.target, [("search", "a query never seen before 42", {"retrieval_mode": "dense"})] * 2, False))
    assert counter("bundlerec_query_cache_misses_total") - misses0 == 1
    text = generate_latest().decode()
    for name in ("bundlerec_query_cache_hits_total", "bundlerec_query_cache_misses_total", "bundlerec_query_cache_entries"):
        assert f"\n{name} " in text


def test_no_cache_for_size_zero_and_the_engine_is_not_referenced():
    class Engine:
        variant, version, encoder = "fake", "v0", None

    assert for_engine(Engine(), 0) is None
    cache = for_engine(Engine(), 2)
    assert cache is not None and cache.normalise is exact and (cache.variant, cache.version) == ("fake", "v0")

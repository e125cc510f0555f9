"""The reply cache: whole Recommend replies for requests nothing personalises. Never changes a stream (bundles and
summary, cache on and off), is emptied by a hot reload, is bypassed by personalised and re-ranked requests, keeps
what is per call (pacing, deadline, summary) per call, and is off with the query cache or by its flag."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings
from prometheus_client import REGISTRY, generate_latest

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server import convert
from bundlerec_server.domain import Filters, ItemCount, Mode, RecommendQuery
from bundlerec_server.errors import OutOfTime
from bundlerec_server.query_cache import ReplyCache, collapse_whitespace
from bundlerec_server.runtime import Runtime
from bundlerec_server.settings import Settings

QUERIES = ["organic", "milk", "bananas", "sparkling water", "cheese", "chips", "frozen pizza", "yogurt",
           "  organic\tbaby   spinach ", "organic baby spinach", "pasta sauce\n", "pasta  sauce"]
MODES = [pb.RETRIEVAL_MODE_UNSPECIFIED, pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_HYBRID, pb.RETRIEVAL_MODE_LEXICAL]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# --- keys ---------------------------------------------------------------------------------------------------


def test_keys_hold_every_request_field_and_personalised_or_reranked_requests_have_none():
    cache = ReplyCache(8, "int8_pertoken", "v1", collapse_whitespace)
    q = RecommendQuery(query=" organic\tmilk ")
    key = cache.key(q, Mode.DENSE, False)
    assert key is not None and key == cache.key(RecommendQuery(query="organic milk"), Mode.DENSE, False)
    assert key == cache.key(dataclasses.replace(q, mode=Mode.DENSE), Mode.DENSE, False)  # the mode as resolved
    # text read by BM25, spelling or the learned ranker: the exact text
    assert cache.key(q, Mode.HYBRID, False) != cache.key(RecommendQuery(query="organic milk"), Mode.HYBRID, False)
    assert cache.key(q, Mode.LEXICAL, False) != key
    others = [dataclasses.replace(q, max_bundles=4), dataclasses.replace(q, items_per_bundle=2),
              dataclasses.replace(q, filters=Filters(max_price=3.0)), dataclasses.replace(q, filters=Filters(exclude_ids=frozenset({"1"}))),
              dataclasses.replace(q, filters=Filters(include_categories=frozenset({"dairy"})))]
    assert len({cache.key(o, Mode.DENSE, False) for o in others} | {key}) == len(others) + 1
    assert ReplyCache(8, "fp32", "v1", collapse_whitespace).key(q, Mode.DENSE, False) != key
    assert ReplyCache(8, "int8_pertoken", "v2", collapse_whitespace).key(q, Mode.DENSE, False) != key
    for personal in (dataclasses.replace(q, user_id="u1"), dataclasses.replace(q, recent_item_ids=("1",)),
                     dataclasses.replace(q, recent_item_counts=(ItemCount("1", 2),))):
        assert cache.key(personal, Mode.DENSE, False) is None
    assert cache.key(q, Mode.DENSE, True) is None  # a re-rank's outcome depends on the call's deadline


def test_bounded_lru_of_tuples():
    cache = ReplyCache(2, "v", "a")
    keys = [cache.key(RecommendQuery(query=t), Mode.DENSE, False) for t in ("a", "b", "c")]
    stored = cache.put(keys[0], [1, 2])
    assert stored == (1, 2) and cache.get(keys[0]) is stored
    cache.put(keys[1], [3])
    cache.get(keys[0])  # most recently used: b goes next
    cache.put(keys[2], [4])
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == (1, 2) and len(cache) == 2
    assert cache.stats() == {"hits": 3, "misses": 1, "entries": 2, "capacity": 2, "coalesced": 0}


def test_settings_and_the_snapshot(tiny_artifact):
    assert Settings().reply_cache is True and Settings.load(["--no-reply-cache"]).reply_cache is False

    def replies(**kw):
        rt = Runtime(Settings(artifact=tiny_artifact, provider="cpu", intra_op_threads=1, **kw))
        try:
            rt.swap(rt.load(tiny_artifact))
            return rt.serving()
        finally:
            asyncio.run(rt.close())

    on = replies(query_cache_size=16)
    assert on.replies is not None and on.replies.capacity == 16 and on.replies.version == on.engine.version
    assert on.replies.normalise is on.cache.normalise
    assert replies(query_cache_size=0).replies is None  # off with the query cache
    assert replies(query_cache_size=16, reply_cache=False).replies is None  # or by its own flag


async def test_a_hit_whose_deadline_has_come_is_out_of_time(tiny_artifact):
    rt = Runtime(Settings(artifact=tiny_artifact, provider="cpu", intra_op_threads=1, query_cache_size=4))
    try:
        rt.swap(rt.load(tiny_artifact))
        replies = rt.serving().replies
        key = replies.key(RecommendQuery(query="milk"), Mode.DENSE, False)
        computed = []

        async def compute(reply=("m",)):
            computed.append(reply)
            return reply

        # a miss: the caller computes (and sees the deadline itself)
        assert await rt.cached(replies, key, compute, lambda: 0.001) == ("m",) and len(computed) == 1
        assert await rt.cached(replies, key, compute, lambda: 1.0) == ("m",)
        assert await rt.cached(replies, key, compute, None) == ("m",) and len(computed) == 1
        with pytest.raises(OutOfTime):
            await rt.cached(replies, key, compute, lambda: rt.settings.deadline_margin_ms / 1000 / 2)
        assert await rt.cached(replies, None, compute, None) == ("m",) and len(computed) == 2  # no key: never stored
    finally:
        await rt.close()


# --- through the server --------------------------------------------------------------------------------------


def requests(item_id: str, category: str) -> list[pb.RecommendRequest]:
    out = []
    for i, text in enumerate(QUERIES):
        mode = MODES[i % len(MODES)]
        out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, max_bundles=5))
        out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, max_bundles=3, max_items_per_bundle=2))
        out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, filters=pb.Filters(exclude_categories=[category])))
        out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, filters=pb.Filters(max_bundle_price=8.0)))
        if i % 2 == 0:  # personalised: they bypass the cache
            out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, recent_item_ids=[item_id]))
            out.append(pb.RecommendRequest(query=text, retrieval_mode=mode, user_id="shopper-1"))
            out.append(pb.RecommendRequest(query=text, retrieval_mode=mode,
                                           recent_item_counts=[pb.ItemCount(item_id=item_id, count=3)]))
    return out


async def _streams(target: str, reqs: list[pb.RecommendRequest], concurrent: bool) -> list[list[bytes]]:
    """Every message of each call, serialised; the summary without its per-call server_ms."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BundleRecommenderStub(channel)

        async def one(req: pb.RecommendRequest) -> list[bytes]:
            out = []
            async for m in stub.Recommend(req, timeout=30):
                if m.HasField("summary"):
                    assert m.summary.server_ms > 0
                    m.summary.server_ms = 0
                out.append(m.SerializeToString(deterministic=True))
            return out

        if concurrent:
            return list(await asyncio.gather(*(one(r) for r in reqs)))
        return [await one(r) for r in reqs]


@pytest.fixture(scope="module")
def servers(tiny_artifact):
    """Reply cache on (query cache 64), and the query cache alone (reply cache off)."""
    on = ServerThread(server_settings(tiny_artifact, query_cache_size=64)).start()
    off = ServerThread(server_settings(tiny_artifact, query_cache_size=64, reply_cache=False)).start()
    yield on, off
    on.stop()
    off.stop()


def test_identical_streams_with_the_reply_cache_on_and_off_and_personalised_calls_bypass_it(servers, cache_on_off):
    on, off = servers
    _, no_cache = cache_on_off
    engine = on.app.runtime.engine()
    item_id = next(iter(engine.catalog.row_of))
    reqs = requests(item_id, engine.catalog.categories[0])
    personal = [r for r in reqs if r.user_id or r.recent_item_ids or r.recent_item_counts]
    impersonal = [r for r in reqs if r not in personal]
    want = asyncio.run(_streams(no_cache.target, reqs, concurrent=False))  # no cache at all
    assert sum(len(s) > 1 for s in want) > len(reqs) // 2  # bundles exist to compare
    replies = on.app.runtime.serving().replies
    assert replies is not None and off.app.runtime.serving().replies is None
    hits0 = counter("bundlerec_reply_cache_hits_total")
    assert asyncio.run(_streams(on.target, reqs, concurrent=False)) == want  # misses (and whitespace-variant hits)
    assert asyncio.run(_streams(on.target, reqs, concurrent=False)) == want  # every impersonal call a hit
    assert asyncio.run(_streams(on.target, reqs * 3, concurrent=True)) == want * 3
    assert asyncio.run(_streams(off.target, reqs * 3, concurrent=True)) == want * 3
    assert replies.hits >= len(impersonal) * 4 and counter("bundlerec_reply_cache_hits_total") - hits0 == replies.hits
    assert replies.hits + replies.misses == len(impersonal) * 5  # personalised calls never looked it up
    # personalised calls alone: no lookup, no entry
    entries, lookups = len(replies), replies.hits + replies.misses
    assert asyncio.run(_streams(on.target, [with_fields(r, query="never seen 7") for r in personal], False))
    assert (len(replies), replies.hits + replies.misses) == (entries, lookups)


def with_fields(req: pb.RecommendRequest, **changes) -> pb.RecommendRequest:
    out = pb.RecommendRequest()
    out.CopyFrom(req)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def test_a_hit_keeps_its_own_pacing_and_summary(servers):
    """Two calls served from one cached reply: each streams under its own count and summary; the shared messages
    are never modified by a call."""
    on, _ = servers
    req = pb.RecommendRequest(query="frozen pizza extra", retrieval_mode=pb.RETRIEVAL_MODE_DENSE, max_bundles=4)
    first = asyncio.run(_streams(on.target, [req], False))[0]
    replies = on.app.runtime.serving().replies
    hits = replies.hits
    again = asyncio.run(_streams(on.target, [req] * 2, True))
    assert again == [first, first] and replies.hits == hits + 2
    summary = pb.RecommendResponse.FromString(first[-1]).summary
    assert summary.bundles_sent == len(first) - 1 and summary.stop_reason == pb.STOP_REASON_COMPLETE
    key = replies.key(convert.recommend_query(req, on.settings), Mode.DENSE, False)
    cached = replies.get(key)
    assert cached is not None and [m.SerializeToString(deterministic=True) for m in cached] == first[:-1]
    assert all(not m.HasField("summary") for m in cached)


def test_an_empty_reply_is_cached_and_streams_no_match(servers):
    on, _ = servers
    req = pb.RecommendRequest(query="sparkling water", retrieval_mode=pb.RETRIEVAL_MODE_DENSE,
                              filters=pb.Filters(include_categories=["no such aisle"]))  # nothing passes
    replies = on.app.runtime.serving().replies
    hits = replies.hits
    first, second = asyncio.run(_streams(on.target, [req, req], False))
    assert first == second and len(first) == 1 and replies.hits == hits + 1
    summary = pb.RecommendResponse.FromString(first[0]).summary
    assert summary.bundles_sent == 0 and summary.stop_reason == pb.STOP_REASON_NO_MATCH


# --- hot reload ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_encoder_artifact(artifact_root, tiny_artifact) -> Path:
    """The same catalog under a differently seeded tiny BERT: other vectors, other bundles, another version."""
    from bundlerec_export.tiny import make_tiny_bert

    time.sleep(1.1)  # artifact versions carry the build time
    model = make_tiny_bert(artifact_root / "tiny-bert-seed3", seed=3)
    return build_tiny_artifact(artifact_root, name="tiny-seed3", base_model=model)


def test_a_reload_empties_it_and_never_serves_a_stale_reply(tiny_artifact, other_encoder_artifact):
    cached = ServerThread(server_settings(tiny_artifact, query_cache_size=32)).start()
    fresh_b = ServerThread(server_settings(other_encoder_artifact)).start()
    reqs = [pb.RecommendRequest(query=q, retrieval_mode=pb.RETRIEVAL_MODE_DENSE) for q in QUERIES]
    try:
        on_a = asyncio.run(_streams(cached.target, reqs, False))
        old = cached.app.runtime.serving().replies
        assert len(old) == len({collapse_whitespace(q) for q in QUERIES})
        assert asyncio.run(_streams(cached.target, reqs, False)) == on_a and old.hits >= len(reqs)
        assert cached.call(cached.app.runtime.reload(other_encoder_artifact)) is True
        new = cached.app.runtime.serving().replies
        assert new is not None and new is not old and len(new) == 0
        on_b = asyncio.run(_streams(cached.target, reqs, False))
        assert on_b == asyncio.run(_streams(fresh_b.target, reqs, False)) and on_b != on_a
        assert asyncio.run(_streams(cached.target, reqs, False)) == on_b  # hits on the new artifact's replies
        assert new.hits >= len(reqs)
    finally:
        cached.stop()
        fresh_b.stop()


def test_counters_are_exported(servers):
    text = generate_latest().decode()
    for name in ("bundlerec_reply_cache_hits_total", "bundlerec_reply_cache_misses_total", "bundlerec_reply_cache_entries"):
        assert f"\n{name} " in text

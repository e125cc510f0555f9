"""Integration: a real grpc.aio server on loopback over the tiny artifact (real ONNX Runtime, real hnswlib)."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bundlerec import AsyncClient, BundleRecError, Client
from bundlerec.cli import main as cli_main
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc


def categories(server) -> dict[str, str]:
    cat = server.app.runtime.engine().catalog
    return dict(zip(cat.ids, cat.categories, strict=True))


def test_recommend_streams_ranked_bundles_then_summary(client, server):
    stream = client.recommend("soda", max_bundles=4)
    bundles = list(stream)
    assert 1 <= len(bundles) <= 4
    assert [b.rank for b in bundles] == list(range(1, len(bundles) + 1))
    assert all(a.score >= b.score for a, b in zip(bundles, bundles[1:]))
    cats = categories(server)
    for b in bundles:
        assert b.items[0].role == pb.ITEM_ROLE_ANCHOR
        assert all(i.role == pb.ITEM_ROLE_COMPLEMENT for i in b.items[1:])
        assert len(b.items) <= 3
        anchor_cat = cats[b.items[0].item_id]
        assert all(cats[i.item_id] != anchor_cat for i in b.items[1:]), "complements come from other categories"
        assert b.reason
    s = stream.summary
    assert s.bundles_sent == len(bundles)
    assert s.stop_reason == pb.STOP_REASON_COMPLETE
    assert s.artifact_version == client.info().artifact_version


def test_summary_is_the_last_message_on_the_wire(server):
    with grpc.insecure_channel(server.target) as ch:
        msgs = list(pb_grpc.BundleRecommenderStub(ch).Recommend(pb.RecommendRequest(query="milk", max_bundles=2), timeout=10))
    assert [m.WhichOneof("payload") for m in msgs] == ["bundle"] * (len(msgs) - 1) + ["summary"]


def test_filters_are_honoured(client, server):
    cats = categories(server)
    first = list(client.recommend("organic", max_bundles=5))
    excluded_cat = cats[first[0].items[0].item_id]
    excluded_id = first[1].items[0].item_id if len(first) > 1 else "none"
    again = list(client.recommend("organic", max_bundles=5, exclude_categories=[excluded_cat.upper()], exclude_item_ids=[excluded_id]))
    for b in again:
        for item in b.items:
            assert cats[item.item_id] != excluded_cat and item.item_id != excluded_id
    only = list(client.recommend("organic", max_bundles=5, include_categories=[excluded_cat]))
    assert only and all(cats[b.items[0].item_id] == excluded_cat for b in only)


def test_no_match_when_filters_exclude_everything(client):
    stream = client.recommend("soda", include_categories=["no such aisle"])
    assert list(stream) == []
    assert stream.summary.stop_reason == pb.STOP_REASON_NO_MATCH and stream.summary.bundles_sent == 0


def test_history_personalizes_and_unknown_ids_are_reported(client):
    hits = client.search("cantaloupe", 2)
    stream = client.recommend("snacks", recent_item_ids=[hits[0].item_id, "no-such-item"])
    list(stream)
    assert stream.summary.personalized
    assert list(stream.summary.unknown_item_ids) == ["no-such-item"]
    plain = client.recommend("snacks")
    list(plain)
    assert not plain.summary.personalized


def test_search_modes(client):
    dense = client.search("cantaloupe", 5, retrieval_mode="dense")
    lexical = client.search("cantaloupe", 5, retrieval_mode="lexical")
    hybrid = client.search("cantaloupe", 5, retrieval_mode="hybrid")
    assert len(dense) == 5 and all(a.score >= b.score for a, b in zip(dense, dense[1:]))
    assert lexical and lexical[0].title == "Cantaloupe"  # BM25 finds the exact title word
    assert {h.item_id for h in hybrid} <= {h.item_id for h in client.search("cantaloupe", 64, retrieval_mode="dense")} | {
        h.item_id for h in client.search("cantaloupe", 64, retrieval_mode="lexical")}


def test_get_info(client, tiny_artifact):
    info = client.info()
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert info.artifact_version == manifest["artifact_version"]
    assert info.item_count == manifest["item_count"]
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.model_variant == "int8_pertoken"  # batch-exact int8 preferred on CPU
    assert info.embedding_dim == manifest["embedding_dim"]
    assert pb.RETRIEVAL_MODE_HYBRID in info.retrieval_modes


def test_health_serving(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "bundlerec.v1.BundleRecommender"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"bundlerec.v1.BundleRecommender", "grpc.health.v1.Health"} <= services


def test_invalid_argument_has_field_violations(client):
    with pytest.raises(BundleRecError) as info:
        list(client.recommend("   ", max_bundles=10_000))
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in err.field_violations} == {"query", "max_bundles"}


def test_deadline_shorter_than_stream_ends_cleanly(tiny_artifact):
    """15 ms for max_bundles at its cap: status OK, a prefix of the full answer, an explicit stop reason.
    The server runs in its own process (as in production), so the client does not share its GIL. A machine
    busy enough to stall the server longer than its margin (3 ms + one message's cost) can still turn a call
    into DEADLINE_EXCEEDED, so that is tolerated on a minority of the calls, never any other outcome."""
    from conftest import server_process

    proc = server_process(tiny_artifact).wait_serving()
    try:
        with Client(proc.target) as client:
            full = [b.items[0].item_id for b in client.recommend("organic", max_bundles=50)]
            reasons, late = [], 0
            for _ in range(10):
                stream = client.recommend("organic", max_bundles=50, timeout=0.015)
                got = []
                try:
                    for b in stream:
                        got.append(b.items[0].item_id)
                except BundleRecError as err:
                    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
                    assert got == full[: len(got)]
                    late += 1
                    continue
                s = stream.summary
                assert s is not None and s.bundles_sent == len(got)
                assert got == full[: len(got)]
                reasons.append(s.stop_reason)
                if s.stop_reason == pb.STOP_REASON_DEADLINE:
                    assert len(got) <= len(full)
                else:
                    assert s.stop_reason == pb.STOP_REASON_COMPLETE and got == full
            assert len(reasons) > late, f"{late} of 10 calls ended DEADLINE_EXCEEDED instead of OK"
    finally:
        proc.stop()


def test_deadline_inside_the_margin_returns_ok_with_no_bundles(tiny_artifact):
    """A deadline already inside the server's margin: OK at once, no bundle, stop reason deadline. The margin
    is made large (500 ms) so the outcome does not depend on how busy the machine is."""
    from conftest import ServerThread, server_settings

    srv = ServerThread(server_settings(tiny_artifact, deadline_margin_ms=500.0)).start()
    try:
        with Client(srv.target) as c:
            stream = c.recommend("organic", max_bundles=50, timeout=0.3)
            assert list(stream) == []
            assert stream.summary.stop_reason == pb.STOP_REASON_DEADLINE and stream.summary.bundles_sent == 0
            full = c.recommend("organic", max_bundles=5, timeout=5)  # a longer deadline is served in full
            assert len(list(full)) == 5 and full.summary.stop_reason == pb.STOP_REASON_COMPLETE
    finally:
        srv.stop()


async def test_async_client(server):
    async with AsyncClient(server.target) as c:
        stream = c.recommend("soda", max_bundles=2)
        bundles = [b async for b in stream]
        assert len(bundles) == 2 and stream.summary.bundles_sent == 2
        assert (await c.info()).item_count > 0
        assert await c.health() == "SERVING"
        with pytest.raises(BundleRecError):
            await c.search("", 5)


def test_cli_recommend_search_info(server, capsys):
    assert cli_main(["--target", server.target, "recommend", "soda", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "#2" in out and "anchor" in out and "stopped: complete" in out
    assert cli_main(["--target", server.target, "--json", "search", "cantaloupe", "-k", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all("itemId" in x for x in lines)
    assert cli_main(["--target", server.target, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["executionProvider"] == "CPUExecutionProvider"
    assert cli_main(["--target", server.target, "recommend", ""]) == 1
    assert "query" in capsys.readouterr().err


def test_cli_stops_quietly_when_its_reader_leaves(server):
    """`bundlerec recommend ... | head`: the reader is gone before the CLI writes (``true`` exits at once); no
    traceback, exit 141 like other Unix tools killed by SIGPIPE."""
    import subprocess
    import sys

    cmd = f"{sys.executable} -m bundlerec.cli --target {server.target} recommend soda -n 20 | true"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 141


def test_cli_unreachable_server_is_a_clean_error(capsys):
    assert cli_main(["--target", "127.0.0.1:1", "--timeout", "1", "info"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def test_not_serving_until_loaded(tiny_artifact):
    import asyncio

    from conftest import server_settings

    from bundlerec_server.app import create_server

    async def scenario():
        app = await create_server(server_settings(tiny_artifact))
        await app.server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{app.port}", timeout=5) as c:
                assert await c.health() == "NOT_SERVING"
                with pytest.raises(BundleRecError) as info:
                    await c.search("soda")
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
                await app.load()
                assert await c.health() == "SERVING"
                assert await c.search("soda", 3)
        finally:
            await app.stop(0)

    asyncio.run(scenario())




def test_relevance_floor_means_no_match(tiny_artifact):
    """Below the cosine floor nothing matched: OK with stop reason NO_MATCH, never junk anchors."""
    from conftest import ServerThread, server_settings

    srv = ServerThread(server_settings(tiny_artifact, min_relevance=0.999)).start()
    try:
        with Client(srv.target) as c:
            stream = c.recommend("买一双好穿的鞋子")
            assert list(stream) == [] and stream.summary.stop_reason == pb.STOP_REASON_NO_MATCH
            assert len(c.search("买一双好穿的鞋子", 5)) == 5  # Search ranks without the floor
    finally:
        srv.stop()


def test_query_over_the_token_limit_is_invalid(client, server):
    limit = server.settings.max_query_tokens
    long_query = "买" * (limit + 5)  # CJK: one token a character; under the character limit, over the token limit
    assert len(long_query) <= server.settings.max_query_chars
    with pytest.raises(BundleRecError) as info:
        list(client.recommend(long_query))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.value.field_violations] == ["query"]
    assert "tokens" in info.value.field_violations[0].description
    assert client.search("买" * limit, 3)  # at the limit: served


def test_a_recommend_call_holds_its_admission_slot_until_its_stream_is_sent(server):
    """The slot spans the whole call, streaming included, so the limit bounds all work in progress and the
    adaptive limit sees the latency callers see (server_ms), not only the compute before the first message."""
    from bundlerec_server.service import BundleRecommenderServicer

    class Context:  # what the servicer asks of a call that ends well
        def time_remaining(self):
            return 10.0

    async def stream():
        adm = server.app.runtime.admission
        before = adm.in_flight
        gen = BundleRecommenderServicer(server.app.runtime).Recommend(pb.RecommendRequest(query="milk", max_bundles=3), Context())
        first = await gen.__anext__()
        during = adm.in_flight
        rest = [m async for m in gen]
        return before, first, during, rest, adm.in_flight

    before, first, during, rest, after = server.call(stream())
    assert first.HasField("bundle") and rest[-1].HasField("summary")
    assert during == before + 1  # suspended after its first bundle, the call still holds its slot
    assert after == before

"""The optional cross-encoder re-ranking stage: trained and shipped by the export (a tiny random BERT as the base
model), served by a real gRPC server over the top N hits only, deterministically, skipped (and reported) when the
deadline is too short, refused at start where the artifact has no model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings, write_judgments

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server.artifact import ArtifactError, read_manifest
from bundlerec_server.cross_encoder import (
    CROSS_ENCODER_FILES,
    CROSS_ENCODER_TOKENIZER,
    CrossEncoder,
    reorder,
    rerank_order,
)
from bundlerec_server.domain import Hit

DEPTH = 5


def _config(tiny_bert: Path):
    from bundlerec_export.cross_encoder import CrossEncoderConfig

    return CrossEncoderConfig(base_model=tiny_bert, depth=8, max_train_queries=48, group=4, batch_groups=4,
                              checkpoints=2, dev_select_queries=16, threads=1, progress=False)


@pytest.fixture(scope="module")
def shipped(artifact_root, tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """(plain artifact, the same with a cross-encoder, judgments, the export's manifest entry)."""
    from bundlerec_export.cross_encoder import add_cross_encoder

    plain = build_tiny_artifact(artifact_root, name="tiny-xenc-plain")
    items = [json.loads(line) for line in (plain / "items.jsonl").read_text().splitlines()]
    work = tmp_path_factory.mktemp("xenc")
    judgments = write_judgments(items, work / "judgments.csv")
    art = work / "tiny-xenc"
    shutil.copytree(plain, art)
    entry = add_cross_encoder(art, judgments, _config(artifact_root / "tiny-bert"), cache=work / "cache")
    return plain, art, judgments, entry


def _stub(target: str):
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.BundleRecommenderStub(channel)


def _queries(judgments: Path) -> list[str]:
    with open(judgments, newline="") as fh:
        return sorted({row["query"] for row in csv.DictReader(fh) if row["query"][:1].isalpha()})[:30]


def _search(stub, q: str, rerank: int, k: int = 15, timeout: float | None = 10.0) -> pb.SearchResponse:
    return stub.Search(pb.SearchRequest(query=q, k=k, retrieval_mode=pb.RETRIEVAL_MODE_HYBRID, rerank=rerank),
                       timeout=timeout)


def _hits(resp: pb.SearchResponse) -> list[tuple[str, float]]:
    return [(h.item_id, h.score) for h in resp.hits]


def test_export_ships_a_checksummed_batch_exact_model_with_dev_figures(shipped, artifact_root):
    from bundlerec_export.cross_encoder import add_cross_encoder

    _, art, judgments, entry = shipped
    m = read_manifest(art, verify=True)
    for path in (*CROSS_ENCODER_FILES.values(), CROSS_ENCODER_TOKENIZER):
        assert path in m["files"]
    ce = m["cross_encoder"]
    assert ce["depth"] == 8 and ce["batch_exact"] and ce["training"]["split"] == "train"
    assert ce["dev"]["queries"] > 0 and 0.0 <= ce["dev"]["reranked"]["ndcg"] <= 1.0
    assert ce["blend"] in [float(b) for b in ce["dev"]["ndcg_by_blend"]]
    assert m["serving"]["rerank"] is ce["wins_on_dev"]
    assert not ce["training"]["reused_from_cache"]
    enc = CrossEncoder(art / CROSS_ENCODER_FILES["int8_pertoken"], art / CROSS_ENCODER_TOKENIZER)
    assert enc.probe_batch_exact()
    again = add_cross_encoder(art, judgments, _config(artifact_root / "tiny-bert"), cache=art.parent / "cache")
    assert again["training"]["reused_from_cache"] and again["training"]["cache_key"] == ce["training"]["cache_key"]
    assert again["dev"] == ce["dev"]  # the cached model, exported again, scores the same


def test_rerank_reorders_only_the_top_n_in_the_models_order(shipped):
    _, art, judgments, _ = shipped
    model = CrossEncoder(art / CROSS_ENCODER_FILES["int8_pertoken"], art / CROSS_ENCODER_TOKENIZER)
    blend = read_manifest(art, verify=False)["cross_encoder"]["blend"]
    titles = {json.loads(line)["id"]: json.loads(line)["title"] for line in (art / "items.jsonl").read_text().splitlines()}
    srv = ServerThread(server_settings(art, rerank="on", rerank_depth=DEPTH, retrieval_mode="hybrid")).start()
    channel, stub = _stub(srv.target)
    try:
        changed = 0
        for q in _queries(judgments):
            off, on = _search(stub, q, pb.RERANK_OFF), _search(stub, q, pb.RERANK_ON)
            assert off.rerank == pb.RERANK_OUTCOME_NOT_USED and on.rerank == pb.RERANK_OUTCOME_APPLIED
            assert _search(stub, q, pb.RERANK_UNSPECIFIED).hits == on.hits  # --rerank on: the default
            before, after = _hits(off), _hits(on)
            assert after[DEPTH:] == before[DEPTH:]  # below the top N nothing moves
            assert sorted(after[:DEPTH]) != [] and {i for i, _ in after[:DEPTH]} == {i for i, _ in before[:DEPTH]}
            assert [s for _, s in after] == [s for _, s in before]  # the scale is kept: scores handed out in order
            top = before[:DEPTH]
            logits = model.logits(q, [titles[i] for i, _ in top])
            order = rerank_order(logits, np.array([s for _, s in top]), blend)
            expected = reorder([Hit(n, s) for n, (_, s) in enumerate(top)], order)
            assert [i for i, _ in after[:DEPTH]] == [top[h.row][0] for h in expected]
            changed += [i for i, _ in after] != [i for i, _ in before]
        assert changed > 0  # the random model does reorder
    finally:
        channel.close()
        srv.stop()


def test_rerank_is_deterministic_under_concurrency(shipped):
    from concurrent.futures import ThreadPoolExecutor

    _, art, judgments, _ = shipped
    srv = ServerThread(server_settings(art, rerank="on", rerank_depth=DEPTH, retrieval_mode="hybrid")).start()
    channel, stub = _stub(srv.target)
    try:
        queries = _queries(judgments)
        first = {q: _hits(_search(stub, q, pb.RERANK_ON)) for q in queries}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                got = dict(zip(queries, pool.map(lambda q: _hits(_search(stub, q, pb.RERANK_ON)), queries)))
                assert got == first
    finally:
        channel.close()
        srv.stop()


def test_deadline_too_short_skips_the_stage_and_says_so(shipped):
    _, art, judgments, _ = shipped
    # a reserve of 100 s: any deadline is too short, no deadline is not
    # with the reply caches on: a re-ranked call's outcome depends on its deadline, so it never uses them
    srv = ServerThread(server_settings(art, rerank="on", rerank_depth=DEPTH, retrieval_mode="hybrid",
                                       rerank_reserve_ms=100_000.0, query_cache_size=16)).start()
    channel, stub = _stub(srv.target)
    try:
        q = _queries(judgments)[0]
        skipped = _search(stub, q, pb.RERANK_ON, timeout=20.0)
        assert skipped.rerank == pb.RERANK_OUTCOME_SKIPPED_DEADLINE
        assert _hits(skipped) == _hits(_search(stub, q, pb.RERANK_OFF))  # retrieval order
        assert _search(stub, q, pb.RERANK_ON, timeout=None).rerank == pb.RERANK_OUTCOME_APPLIED
        req = pb.RecommendRequest(query=q, max_bundles=3, retrieval_mode=pb.RETRIEVAL_MODE_HYBRID)
        summary = list(stub.Recommend(req, timeout=20.0))[-1].summary
        assert summary.rerank == pb.RERANK_OUTCOME_SKIPPED_DEADLINE and summary.bundles_sent > 0
        summary = list(stub.Recommend(req))[-1].summary
        assert summary.rerank == pb.RERANK_OUTCOME_APPLIED and summary.bundles_sent > 0
        serving = srv.app.runtime.serving()
        searches, replies = serving.searches, serving.replies
        assert (searches.hits, searches.misses, len(searches)) == (0, 1, 1)  # the RERANK_OFF call alone
        assert (replies.hits, replies.misses, len(replies)) == (0, 0, 0)
    finally:
        channel.close()
        srv.stop()


def test_refused_at_start_without_a_model_and_per_request_without_one(shipped):
    plain, art, judgments, _ = shipped
    with pytest.raises(ArtifactError, match="no cross-encoder"):
        ServerThread(server_settings(plain, rerank="on")).start()
    srv = ServerThread(server_settings(art, rerank="off", retrieval_mode="hybrid")).start()  # not loaded
    channel, stub = _stub(srv.target)
    try:
        q = _queries(judgments)[0]
        assert _search(stub, q, pb.RERANK_UNSPECIFIED).rerank == pb.RERANK_OUTCOME_NOT_USED
        with pytest.raises(grpc.RpcError) as err:
            _search(stub, q, pb.RERANK_ON)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            _search(stub, q, 7)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        srv.stop()


def test_the_build_stage_trains_after_tune_and_reuses_its_cache(shipped, artifact_root):
    _, _, judgments, _ = shipped
    opts = dict(depth=8, max_train_queries=48, group=4, batch_groups=4, checkpoints=1, dev_select_queries=16,
                threads=1, base_model=artifact_root / "tiny-bert")
    built = build_tiny_artifact(artifact_root, name="tiny-xenc-built", ranker=False, ranker_judgments=judgments,
                                cross_encoder=True, cross_encoder_options=opts)
    m = read_manifest(built, verify=True)
    assert {"tune", "cross_encoder"} <= set(m["timings_s"])
    assert CROSS_ENCODER_FILES["int8_pertoken"] in m["files"] and m["cross_encoder"]["training"]["queries"] > 0
    assert m["serving"]["rerank"] is m["cross_encoder"]["wins_on_dev"] and m["serving"]["default_retrieval_mode"]
    assert not m["cross_encoder"]["training"]["reused_from_cache"]
    assert list((artifact_root / "tiny-xenc-built.work").glob("cross-encoder-*"))
    rebuilt = read_manifest(build_tiny_artifact(artifact_root, name="tiny-xenc-built", ranker=False,
                                                ranker_judgments=judgments, cross_encoder=True,
                                                cross_encoder_options=opts), verify=True)
    assert rebuilt["cross_encoder"]["training"]["reused_from_cache"]
    assert rebuilt["cross_encoder"]["dev"] == m["cross_encoder"]["dev"]

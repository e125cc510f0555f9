"""Serving configuration tuned on the dev split and applied by the server."""

from __future__ import annotations

import csv
import json

from conftest import ServerThread, build_tiny_artifact, server_settings

from bundlerec import Client
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_export.evaluation import split_of
from bundlerec_export.tune import EF_GRID, EF_TOLERANCE, choose_ef, engine_for, tune_serving


def test_tune_writes_serving_choice_used_by_the_server(artifact_root, tmp_path):
    art = build_tiny_artifact(artifact_root, name="tiny-tune")
    items = [json.loads(line) for line in (art / "items.jsonl").read_text().splitlines()]
    judgments = tmp_path / "judgments.csv"
    with open(judgments, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "product_id", "relevance"])
        for it in items:  # queries = the first words of titles: BM25 can find them, a random BERT cannot
            w.writerow([" ".join(it["title"].lower().split()[:2]), it["id"], 3.0])
    n_dev = len({" ".join(it["title"].lower().split()[:2]) for it in items} & {q for q in _queries(judgments) if split_of(q) == "dev"})
    assert n_dev > 0
    serving = tune_serving(art, judgments, progress=False)
    assert serving["tuned_on"]["split"] == "dev" and serving["tuned_on"]["queries"] == n_dev
    scores = serving["tuned_on"]["ndcg"]
    assert scores[serving["tuned_on"]["best"]] == max(scores.values())
    assert scores["lexical"] > scores["dense"]  # the random encoder knows nothing
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["serving"] == serving
    srv = ServerThread(server_settings(art)).start()  # checksums still verify after the manifest rewrite
    try:
        with Client(srv.target) as c:
            info = c.info()
        expected = {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL, "hybrid": pb.RETRIEVAL_MODE_HYBRID}
        assert info.default_retrieval_mode == expected[serving["default_retrieval_mode"]]
        assert srv.app.runtime.engine().fusion.method == serving["fusion"]["method"]
        if serving["default_retrieval_mode"] != "lexical":  # ef tuned on the served ranking, and served
            assert srv.app.runtime.engine().ef == serving["ef_search"] <= manifest["index"]["ef_search"]
        else:
            assert "ef_search" not in serving
    finally:
        srv.stop()


def test_choose_ef_takes_the_cheapest_beam_within_tolerance_and_restores_the_index(artifact_root, tmp_path):
    from bundlerec_server.domain import Filters, Mode
    from bundlerec_server.fusion import Fusion

    art = build_tiny_artifact(artifact_root, name="tiny-ef")
    engine = engine_for(art)
    engine.manifest["index"]["ef_search"] = 150  # as if recall had needed a wide beam: 64, 96, 128 and 150 tried
    items = [json.loads(line) for line in (art / "items.jsonl").read_text().splitlines()]
    queries = sorted({" ".join(it["title"].lower().split()[:2]) for it in items})[:12]
    judged = {q: {it["id"]: 3.0 for it in items if it["title"].lower().startswith(q)} for q in queries}
    lists = {}
    for q in queries:
        vec = engine.encoder.encode([q])[0]
        lists[q] = (vec, engine.dense(vec, 100, Filters()), engine.lexical_hits(q, 100, Filters()))
    before = [h.row for h in engine.dense(lists[queries[0]][0], 64, Filters())]
    beam, pool = engine.vectors.index.ef, engine.vectors.anchor_pool
    ef, table = choose_ef(engine, judged, lists, Mode.HYBRID, Fusion("scores", alpha=0.5, coverage=0.5))
    assert (engine.vectors.index.ef, engine.vectors.anchor_pool) == (beam, pool)  # the tuning engine as it was
    tried = [int(e) for e in table["ndcg"]]
    assert tried == [e for e in EF_GRID if e < 150] + [150] and table["index_ef"] == 150
    ok = [e for e in tried if table["ndcg"][str(e)] >= table["ndcg"]["150"] * (1 - EF_TOLERANCE)]
    assert ef == min(ok)
    assert [h.row for h in engine.dense(lists[queries[0]][0], 64, Filters())] == before


def _queries(path):
    with open(path, newline="") as fh:
        return {row["query"] for row in csv.DictReader(fh)}


def test_tuned_ef_serves_hybrid_candidates_and_dense_mode_keeps_the_recall_beam(artifact_root, monkeypatch):
    from bundlerec_server import artifact as A
    from bundlerec_server.domain import Filters, Mode
    from bundlerec_server.engine import Engine

    art = build_tiny_artifact(artifact_root, name="tiny-ef-serve")
    manifest = A.read_manifest(art)
    recall_ef = manifest["index"]["ef_search"]
    manifest["serving"] = {**manifest.get("serving", {}), "ef_search": recall_ef // 4}
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    A.write_manifest(art, manifest)
    engine = Engine(art, server_settings(art))
    assert (engine.ef, engine.dense_beam) == (recall_ef // 4, recall_ef)
    beams = []
    search = engine.vectors.search
    monkeypatch.setattr(engine.vectors, "search", lambda *a, **kw: beams.append(a[4] if len(a) > 4 else kw.get("beam", 0)) or search(*a, **kw))
    vec = engine.encoder.encode(["tiny query"])[0]
    allowed = engine.allow(Filters())
    engine.retrieve("tiny query", vec, 5, allowed, Mode.DENSE)
    engine.retrieve("tiny query", vec, 5, allowed, Mode.HYBRID)
    assert beams == [recall_ef, 0]  # dense: the recall-tuned beam; hybrid candidates: the tuned ef
    explicit = Engine(art, server_settings(art, ef_search=recall_ef))  # --ef-search wins over both
    assert (explicit.ef, explicit.dense_beam) == (recall_ef, 0)

"""The learned hybrid ranker: trained by the build on judgments, shipped in the artifact, served by a real server
with fusion ``learned`` in the model's order, deterministically."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_settings, write_judgments

from bundlerec import Client
from bundlerec_server.artifact import ArtifactError, read_manifest
from bundlerec_server.domain import Filters, Hit
from bundlerec_server.engine import Engine
from bundlerec_server.fusion import Candidates, Fusion, fused_scores
from bundlerec_server.learned_ranker import RANKER_MODEL, SCORED_CANDIDATES, LearnedRanker, compiled, probe_rows
from bundlerec_server.ranking_features import FEATURES


@pytest.fixture(scope="module")
def ranked(artifact_root, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact built with a ranker stage, its judgments)."""
    plain = build_tiny_artifact(artifact_root, name="tiny-ltr-plain", lexical=True)
    items = [json.loads(line) for line in (plain / "items.jsonl").read_text().splitlines()]
    judgments = write_judgments(items, tmp_path_factory.mktemp("ltr") / "judgments.csv")
    return build_tiny_artifact(artifact_root, name="tiny-ltr", ranker_judgments=judgments), judgments


def _search(target: str, queries: list[str], k: int = 8) -> list[list[tuple[str, float]]]:
    with Client(target) as c:
        return [[(h.item_id, h.score) for h in c.search(q, k=k, retrieval_mode="hybrid")] for q in queries]


def _queries(judgments: Path) -> list[str]:
    with open(judgments, newline="") as fh:
        return sorted({row["query"] for row in csv.DictReader(fh) if row["query"][:1].isalpha()})[:40]


def test_build_ships_a_checksummed_ranker_chosen_on_dev(ranked):
    art, judgments = ranked
    m = read_manifest(art, verify=True)
    r = m["ranker"]
    assert r["file"] == RANKER_MODEL and RANKER_MODEL in m["files"]
    assert r["features"] == list(FEATURES)
    assert r["trained_on"]["split"] == "train" and r["trained_on"]["early_stopped_on"] == "dev"
    assert r["dev"]["queries"] > 0 and 0.0 <= r["dev"]["learned"]["ndcg"] <= 1.0
    assert "learned" in m["serving"]["tuned_on"]["ndcg"]  # tune compares it with the linear fusions on dev
    assert sum(r["feature_gain"].values()) > 0
    (art / RANKER_MODEL).write_text((art / RANKER_MODEL).read_text() + "\n")  # a changed model fails the checksum
    try:
        with pytest.raises(ArtifactError):
            read_manifest(art, verify=True)
    finally:
        (art / RANKER_MODEL).write_text((art / RANKER_MODEL).read_text()[:-1])


def test_server_serves_the_models_order(ranked):
    import lightgbm as lgb

    art, judgments = ranked
    queries = _queries(judgments)
    srv = ServerThread(server_settings(art, fusion="learned", retrieval_mode="hybrid")).start()
    try:
        assert srv.app.runtime.engine().fusion.method == "learned"
        served = _search(srv.target, queries)
        again = _search(srv.target, queries)
    finally:
        srv.stop()
    assert served == again  # deterministic
    # expected: the model file scored directly (not through LearnedRanker.scores), ties by row
    engine = Engine(art, server_settings(art))
    booster = lgb.Booster(model_file=str(art / RANKER_MODEL))
    assert engine.ranker is not None and engine.lexical is not None
    differs = 0
    for q, hits in zip(queries, served, strict=True):
        vec = engine.encoder.encode([q])[0]
        pool = engine.settings.anchor_pool
        dense, lexical = engine.dense(vec, pool, Filters()), engine.lexical_hits(q, pool, Filters())
        c = engine.candidates(vec, q, dense, lexical)
        s = booster.predict(engine.ranker.features(engine.lexical, q, c, dense, lexical))
        # the model ranks the scores fusion's best SCORED_CANDIDATES (its features computed among all candidates)
        pre = Fusion("scores", alpha=engine.fusion.alpha, coverage=engine.fusion.coverage)
        scored = np.argsort(-fused_scores(c, pre), kind="stable")[:SCORED_CANDIDATES]
        s[np.setdiff1d(np.arange(len(s)), scored)] = -np.inf
        order = np.lexsort((c.rows, -s))[:8]
        assert [h[0] for h in hits] == [engine.catalog.ids[c.rows[i]] for i in order], q
        np.testing.assert_allclose([h[1] for h in hits], 1 / (1 + np.exp(-s[order])), rtol=1e-5)
        assert all(0 < h[1] < 1 for h in hits)  # bundling multiplies anchor scores: never negative
        scores_order = [engine.catalog.ids[h.row] for h in engine.fuse(vec, q, dense, lexical, engine.fusion.__class__("scores"), 8)]
        differs += scores_order != [h[0] for h in hits]
    assert differs > 0  # the learned order is not the linear fusion's


def test_ties_are_broken_by_row(ranked):
    art, _ = ranked
    engine = Engine(art, server_settings(art))
    assert engine.ranker is not None and engine.lexical is not None

    engine.ranker._predict = lambda x: np.zeros(len(x))
    rows = np.array([2, 5, 9, 11], dtype=np.int64)
    c = Candidates(rows, np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32))
    hits = engine.ranker.rank(engine.lexical, "x", c, [Hit(11, 1.0), Hit(2, 0.5)], [], 3)
    assert [h.row for h in hits] == [2, 5, 9]


def test_the_compiled_engine_gives_lightgbm_scores(ranked):
    """lleaves' machine code and LightGBM's predictor agree on real feature rows and at every split threshold."""
    import lightgbm as lgb

    art, judgments = ranked
    fast = Engine(art, server_settings(art))
    slow = Engine(art, server_settings(art, ranker_engine="lightgbm"))
    assert fast.ranker is not None and slow.ranker is not None and fast.lexical is not None
    assert (fast.ranker.engine, slow.ranker.engine) == ("compiled", "lightgbm")
    rows = []
    for q in _queries(judgments):
        vec = fast.encoder.encode([q])[0]
        dense, lexical = fast.dense(vec, 64, Filters()), fast.lexical_hits(q, 64, Filters())
        rows.append(fast.ranker.features(fast.lexical, q, fast.candidates(vec, q, dense, lexical), dense, lexical))
    probe = probe_rows(lgb.Booster(model_file=str(art / RANKER_MODEL)))
    for x in (np.concatenate(rows), probe):
        np.testing.assert_allclose(fast.ranker.scores(x), slow.ranker.scores(x), rtol=0, atol=1e-9)
    assert len(np.unique(fast.ranker.scores(probe))) > 1  # the probe reaches different leaves


def test_the_compiled_engine_is_refused_when_it_disagrees_or_is_missing(ranked, monkeypatch):
    import sys

    import lightgbm as lgb

    art, _ = ranked
    booster = lgb.Booster(model_file=str(art / RANKER_MODEL))
    with pytest.raises(ArtifactError, match="differs from LightGBM"):
        compiled(art / RANKER_MODEL, booster, lambda x: booster.predict(x) + 1e-6)
    m = read_manifest(art)
    catalog = Engine(art, server_settings(art, ranker_engine="lightgbm")).catalog
    monkeypatch.setitem(sys.modules, "lleaves", None)  # not installed
    with pytest.raises(ArtifactError, match="--ranker-engine lightgbm"):
        LearnedRanker(art, m["ranker"], catalog, "compiled")
    assert LearnedRanker(art, m["ranker"], catalog, "lightgbm").engine == "lightgbm"
    with pytest.raises(ValueError, match="ranker_engine"):
        server_settings(art, ranker_engine="xgboost").check()


def test_learned_fusion_needs_a_ranker(tiny_artifact, ranked):
    with pytest.raises(ArtifactError, match="ranker"):
        Engine(tiny_artifact, server_settings(tiny_artifact, fusion="learned"))
    art, _ = ranked
    m = json.loads((art / "manifest.json").read_text())
    catalog = Engine(art, server_settings(art)).catalog
    with pytest.raises(ArtifactError, match="does not compute \\['colour_matched'\\]"):
        LearnedRanker(art, {**m["ranker"], "features": [*FEATURES, "colour_matched"]}, catalog)
    with pytest.raises(ArtifactError, match="features"):  # the model file has len(FEATURES) features
        LearnedRanker(art, {**m["ranker"], "features": list(FEATURES)[:-1]}, catalog)


def test_a_model_over_fewer_features_scores_its_own_columns(ranked, tmp_path):
    """A ranker trained before features were added (any subset of FEATURES, in its own order) keeps serving: it is
    given exactly its columns of the full matrix."""
    import lightgbm as lgb

    art, _ = ranked
    catalog = Engine(art, server_settings(art)).catalog
    subset = ["trigram_recall", *FEATURES[:24]]
    cols = [FEATURES.index(f) for f in subset]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, len(FEATURES)))
    y = x[:, FEATURES.index("trigram_recall")] - x[:, 0] + rng.normal(scale=0.1, size=200)
    booster = lgb.train({"objective": "regression", "num_leaves": 4, "verbose": -1, "seed": 0},
                        lgb.Dataset(x[:, cols], y), 10)
    (tmp_path / "ranker").mkdir()
    booster.save_model(str(tmp_path / "ranker" / "model.txt"))
    ranker = LearnedRanker(tmp_path, {"file": "ranker/model.txt", "features": subset}, catalog)
    np.testing.assert_allclose(ranker.scores(x), booster.predict(x[:, cols]), rtol=1e-9)
    assert not np.allclose(ranker.scores(x), booster.predict(x[:, : len(subset)]))  # not simply the first columns


def test_standalone_adds_a_ranker_to_an_existing_artifact(artifact_root, ranked):
    from bundlerec_export.train_ranker import add_ranker

    _, judgments = ranked
    art = build_tiny_artifact(artifact_root, name="tiny-ltr-add")
    assert "ranker" not in read_manifest(art)
    entry = add_ranker(art, judgments)
    m = read_manifest(art, verify=True)
    assert m["ranker"] == entry and (art / RANKER_MODEL).is_file()
    assert "learned" in m["serving"]["tuned_on"]["ndcg"]
    Engine(art, server_settings(art, fusion="learned"))


def test_prefilter_scores_only_the_best_by_the_scores_fusion(ranked, monkeypatch):
    """With a prefilter, the model sees only the scores fusion's best max(SCORED_CANDIDATES, k) candidates, and
    ranks them exactly as it ranks them among all."""
    import bundlerec_server.learned_ranker as lr

    art, _ = ranked
    engine = Engine(art, server_settings(art))
    assert engine.ranker is not None and engine.lexical is not None
    seen: list[int] = []
    predict = engine.ranker._predict

    def counting(x):
        seen.append(len(x))
        return predict(x)

    engine.ranker._predict = counting
    monkeypatch.setattr(lr, "SCORED_CANDIDATES", 3)
    q = "husky socket"
    vec = engine.encoder.encode([q])[0]
    dense, lexical = engine.dense(vec, 8, engine.allow(Filters())), engine.lexical_hits(q, 8, engine.allow(Filters()))
    c = engine.candidates(vec, q, dense, lexical)
    assert len(c.rows) > 3
    pre = Fusion("scores", alpha=0.5, coverage=1.0)
    hits = engine.ranker.rank(engine.lexical, q, c, dense, lexical, 2, prefilter=pre)
    assert seen == [3]
    best = set(np.argsort(-fused_scores(c, pre), kind="stable")[:3].tolist())
    full = engine.ranker.scores(engine.ranker.features(engine.lexical, q, c, dense, lexical))
    expected = sorted(best, key=lambda i: (-full[i], i))[:2]
    assert [h.row for h in hits] == [int(c.rows[i]) for i in expected]
    seen.clear()
    assert len(engine.ranker.rank(engine.lexical, q, c, dense, lexical, 5, prefilter=pre)) == 5 and seen == [5]


def test_the_rankers_heavy_parts_can_be_built_in_a_child_process(ranked, tmp_path):
    """A hot reload builds the title evidence and the compiled trees in a spawned child process: the engine it gives
    holds the same evidence and scores as one loaded in process (and the compiled model is still checked here)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bundlerec_server.engine import Offload

    art, judgments = ranked
    here = Engine(art, server_settings(art))
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = Engine(art, server_settings(art), Offload(pool, tmp_path))
    assert (tmp_path / "ranker.o").is_file()  # the child compiled the trees; this process loaded its object code
    a, b = here.ranker, there.ranker
    assert a is not None and b is not None and here.lexical is not None
    # token ids follow set iteration order, which string hashing makes differ between processes: same tokens
    assert a.titles.words.keys() == b.titles.words.keys() and a.titles.trigrams.ids.keys() == b.titles.trigrams.ids.keys()
    assert all(np.array_equal(a.titles.words[w], b.titles.words[w]) for w in a.titles.words)
    assert a.titles.text == b.titles.text and np.array_equal(a.titles.brand, b.titles.brand)
    s1, s2 = here.lexical.speller, there.lexical.speller  # the spelling corrector, also built in the child
    assert s1 is not None and s2 is not None and s1.df == s2.df and s1._choices == s2._choices
    typo = next(w for w in s1._choices if len(w) >= 6)[:-1] + "q"
    assert s2.correct(typo) == s1.correct(typo)
    for q in _queries(judgments)[:10]:
        vec = here.encoder.encode([q])[0]
        dense, lexical = here.dense(vec, 64, Filters()), here.lexical_hits(q, 64, Filters())
        x = a.features(here.lexical, q, here.candidates(vec, q, dense, lexical), dense, lexical)
        np.testing.assert_array_equal(x, b.features(here.lexical, q, here.candidates(vec, q, dense, lexical), dense, lexical))
        np.testing.assert_allclose(a.scores(x), b.scores(x), rtol=0, atol=1e-12)


def test_a_hot_reload_of_a_ranker_artifact_serves_the_same_ranking(ranked):
    art, judgments = ranked
    queries = _queries(judgments)[:12]
    srv = ServerThread(server_settings(art, fusion="learned", retrieval_mode="hybrid")).start()
    try:
        before = _search(srv.target, queries)
        interval = sys.getswitchinterval()
        assert srv.call(srv.app.runtime.reload(art)) is True  # reload_offload (the default): the child process path
        assert sys.getswitchinterval() == interval  # the reload's shorter switch interval is given back
        assert srv.app.runtime.engine().ranker is not None
        assert _search(srv.target, queries) == before
    finally:
        srv.stop()

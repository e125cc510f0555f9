"""Cold start for a catalog without orders whose encoder is not the base MiniLM: base-space embeddings in the build
and in ``bundlerec_export.recomplement`` (an existing artifact's complements recomputed, checksums rewritten, served)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerThread, server_settings

from bundlerec_server.artifact import COMPLEMENTS, EMBEDDINGS, Complements, read_manifest, sha256_file

N = 40


def _patch(mp: pytest.MonkeyPatch, base: Path, dim: int) -> None:
    """A second tiny BERT plays the packaged base MiniLM, a random 32-d model the shipped cold-start model; the tiny
    encoders embed every title alike, so the near-duplicate rule is off and the clusters small."""
    from bundlerec_export import cold_start as cs
    from bundlerec_export import onnx_export as ox

    rng = np.random.default_rng(0)
    model = cs.ColdStartModel(rng.normal(size=(dim, 8)).astype(np.float32), rng.normal(size=(dim, 8)).astype(np.float32),
                              rng.normal(size=dim).astype(np.float32))
    mp.setattr(cs, "load_default_model", lambda: model)
    mp.setattr(ox, "default_base_model", lambda: base)
    mp.setattr(cs, "cold_start_complements",
               functools.partial(cs.cold_start_complements, dup_cosine=1.01, dup_jaccard=1.01, cluster_size=10))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from bundlerec_export.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("recomplement-models")
    return make_tiny_bert(root / "served", seed=0), make_tiny_bert(root / "base", seed=1)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    words = ["drill", "hammer", "paint", "brush", "saw", "nails", "glue", "tape"]
    path = tmp_path_factory.mktemp("recomplement-data") / "catalog.csv"
    path.write_text("id,title,price\n" + "".join(f"{i},{words[i % 8]} model {i},{i + 1}\n" for i in range(N)))
    return path


def _build(out: Path, catalog: Path, served: Path, **extra):
    from bundlerec_export.build import BuildConfig, build

    return build(BuildConfig(dataset="csv", catalog=catalog, out=out, base_model=served, min_int8_cosine=0.0,
                             agreement_sample=10, progress=False, lexical=False, **extra))


def test_fine_tuned_encoder_gets_base_space_cold_start_lists_and_a_cache(tmp_path, models, catalog, monkeypatch):
    from bundlerec_server.encoder import Encoder

    served, base = models
    _patch(monkeypatch, base, 32)
    res = _build(tmp_path / "a", catalog, served)
    info = res.manifest["complements"]
    space = info["embedding_space"]
    assert info["method"] == "cold_start_two_tower" and info["from_orders"] is False and info["anchors"] == N
    assert space["space"] == "base" and "embedded again" in space["source"] and space["reused_from_cache"] is False
    assert info["hub_correction"]["csls_k"] > 0 and info["extra_embed_seconds"] >= 0
    cache = Path(space["cache"])
    assert cache.parent == tmp_path / "a.work" and cache.is_file()
    titles = [line.split(",")[1] for line in catalog.read_text().splitlines()[1:]]
    graph = next((tmp_path / "a.work").glob("base-fp32-*")) / "model"
    expected = Encoder(graph / "fp32.onnx", graph / "tokenizer.json", max_length=128, provider="cpu").encode_many(titles)
    cached = np.load(cache)
    assert np.allclose(cached, expected, atol=1e-5)
    assert not np.allclose(cached, np.load(res.path / EMBEDDINGS), atol=1e-2)  # another space than the served one
    comp = Complements.read(res.path / COMPLEMENTS)
    assert np.all(comp.support == 0) and all(row not in comp.of(row)[0].tolist() for row in range(N))
    again = _build(tmp_path / "a", catalog, served)  # a rebuild reuses the base-space embeddings
    assert again.manifest["complements"]["embedding_space"]["reused_from_cache"] is True
    assert np.array_equal(Complements.read(again.path / COMPLEMENTS).indices, comp.indices)


def test_a_space_that_cannot_be_honoured_is_refused(tmp_path):
    from bundlerec_export.build import BuildConfig
    from bundlerec_export.recomplement import RecomplementError, catalog_cold_start

    emb = np.eye(N, 32, dtype=np.float32)
    with pytest.raises(RecomplementError, match="384-d"):  # the shipped model reads 384-d embeddings
        catalog_cold_start(emb, [f"t{i}" for i in range(N)], None, served_is_base=False, work=tmp_path, space="served")
    with pytest.raises(ValueError, match="cold_start_space"):
        BuildConfig(dataset="csv", out=tmp_path / "x", cold_start_space="fine-tuned")


def test_recompute_rewrites_checksums_and_the_server_serves_predicted_complements(tmp_path, models, catalog,
                                                                                     monkeypatch):
    from bundlerec import Client
    from bundlerec_export import recomplement

    served, base = models
    art = _build(tmp_path / "hd", catalog, served, cold_start=False).path  # what Home Depot served: content band
    before = read_manifest(art)
    assert before["complements"]["method"] == "content_band"
    old_sum = sha256_file(art / COMPLEMENTS)
    _patch(monkeypatch, base, 32)
    assert recomplement.main(["--artifact", str(art)]) == 0
    after = read_manifest(art, verify=True)  # every checksum matches the files
    info = after["complements"]
    assert info["method"] == "cold_start_two_tower" and info["embedding_space"]["space"] == "base"
    assert info["recomputed"]["previous_method"] == "content_band" and info["recomputed"]["from"] == before["artifact_version"]
    assert after["artifact_version"] != before["artifact_version"] and sha256_file(art / COMPLEMENTS) != old_sum
    assert after["files"][COMPLEMENTS] == sha256_file(art / COMPLEMENTS)
    assert after["encoder"] == before["encoder"] and after["files"][EMBEDDINGS] == before["files"][EMBEDDINGS]
    assert not list(tmp_path.glob(".hd.*"))  # no temporary folder left behind
    srv = ServerThread(server_settings(art)).start()
    try:
        with Client(srv.target, timeout=15.0) as client:
            bundles = list(client.recommend("drill model", max_bundles=3))
    finally:
        srv.stop()
    assert bundles and all(len(b.items) >= 2 for b in bundles)
    assert all(b.reason.startswith("predicted complements") for b in bundles)


def test_recompute_refuses_a_catalog_with_orders(tiny_artifact, tmp_path):
    from bundlerec_export.recomplement import RecomplementError, recomplement

    with pytest.raises(RecomplementError, match="has orders"):
        recomplement(tiny_artifact, tmp_path / "out")
    assert json.loads((tiny_artifact / "manifest.json").read_text())["complements"]["method"] != "cold_start_two_tower"

"""End to end: a tiny random BERT exported and built into an artifact from the Instacart test slice."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from bundlerec_server.artifact import (
    COMPLEMENTS,
    EMBEDDINGS,
    INDEX,
    ITEMS,
    LEXICAL_DIR,
    MODEL_FILES,
    TOKENIZER,
    Complements,
    ItemTable,
    read_manifest,
    sha256_file,
)

SLICE = Path(__file__).parent / "data" / "instacart_slice"
# int8 agreement of the random tiny BERT on the slice measured 0.99998 mean: the default threshold applies.
TINY_MIN_INT8 = 0.98


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from bundlerec_export.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model) -> Path:
    from bundlerec_export.build import BuildConfig, build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "slice"
    cfg = BuildConfig(dataset="instacart", data_dir=SLICE, out=out, base_model=tiny_model,
                      min_int8_cosine=TINY_MIN_INT8, agreement_sample=100, progress=False)
    return build_artifact(cfg)


def test_tiny_bert_is_deterministic(tmp_path, tiny_model):
    from bundlerec_export.tiny import make_tiny_bert

    again = make_tiny_bert(tmp_path / "again")
    assert sha256_file(again / "model.safetensors") == sha256_file(tiny_model / "model.safetensors")
    cfg = json.loads((again / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (32, 2, 2)
    assert (again / "tokenizer.json").is_file()


def test_manifest_checksums_and_agreement(artifact):
    m = read_manifest(artifact, verify=True)  # raises on any checksum mismatch
    for rel in (*MODEL_FILES.values(), TOKENIZER, ITEMS, EMBEDDINGS, INDEX, COMPLEMENTS):
        assert m["files"][rel] == sha256_file(artifact / rel)
    assert any(rel.startswith(LEXICAL_DIR + "/") for rel in m["files"])
    assert m["format_version"] == 1
    assert m["dataset"] == "instacart" and m["artifact_version"].startswith("instacart-")
    assert m["item_count"] == len(ItemTable.read(artifact / ITEMS)) == 300
    assert m["embedding_dim"] == 32
    ef = m["index"]["ef_recall"]
    assert m["index"]["ef_search"] >= 64 and all(0.0 <= row["recall"] <= 1.0 for row in ef["table"])
    assert any(row["ef"] == m["index"]["ef_search"] for row in ef["table"]) or m["index"]["ef_search"] == 64
    assert [Path(s["path"]).name for s in m["sources"]] == ["products.csv", "orders.csv", "order_items.csv"]
    assert all(len(s["sha256"]) == 64 and s["rows"] > 0 for s in m["sources"])
    int8 = m["models"]["int8"]["cosine_to_fp32"]
    assert int8["n"] == 100 and TINY_MIN_INT8 <= int8["mean"] <= 1.0 and int8["min"] <= int8["mean"]
    assert set(m["models"]) == {"fp32", "int8", "int8_pertoken", "fp16"}
    pertoken = m["models"]["int8_pertoken"]["cosine_to_fp32"]
    assert TINY_MIN_INT8 <= pertoken["mean"] <= 1.0
    assert pertoken["batch_max_abs_diff"] == 0.0  # batch-exact: safe to micro-batch
    assert m["encoder"]["query_variant"] == "int8_pertoken"
    assert m["agreement"]["sample"] == 100 and m["agreement"]["min_int8_cosine"] == TINY_MIN_INT8
    fp16 = m["models"]["fp16"]
    assert fp16["cosine_to_fp32"] is not None or fp16["reason"]
    enc = m["encoder"]
    assert (enc["pooling"], enc["normalize"], enc["query_truncate_tokens"], enc["max_item_tokens"]) == ("mean", True, 64, 128)
    assert enc["fine_tuned"] is False and enc["item_variant"] == "fp32"
    assert m["index"]["space"] == "cosine" and m["index"]["M"] == 16 and m["index"]["ef_search"] == 64
    comp = m["complements"]
    assert comp["from_orders"] is True and comp["method"] == "lambdarank" and comp["model_file"] == "complements_model.txt"
    assert comp["model_file"] in m["files"] and comp["features"] and comp["validation"]["holdout_recall"]["ranker"]
    assert m["lexical"]["tokenize"]["stemmer"]["algorithm"] == "english"
    assert set(m["timings_s"]) >= {"load", "export_fp32", "quantize_int8", "embed", "index", "complements", "total"}
    assert artifact.stat().st_mode & 0o055 == 0o055  # readable by the server's user, not 0700 like mkdtemp
    # no half-built sibling left behind
    assert not [p for p in artifact.parent.iterdir() if ".building-" in p.name]


def test_embeddings_normalised_and_index_self_match(artifact):
    import hnswlib

    emb = np.load(artifact / EMBEDDINGS)
    assert emb.dtype == np.float32 and emb.shape == (300, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    index = hnswlib.Index(space="cosine", dim=emb.shape[1])
    index.load_index(str(artifact / INDEX))
    index.set_ef(64)
    labels, dist = index.knn_query(emb, k=1)
    # titles are unique in the slice, but a random tiny BERT can map two to (nearly) the same vector
    self_hit = labels[:, 0] == np.arange(len(emb))
    assert self_hit.mean() >= 0.98
    assert np.all(dist[:, 0] < 1e-4)


def test_embeddings_match_serving_encoder(artifact):
    from bundlerec_server.encoder import Encoder

    items = ItemTable.read(artifact / ITEMS)
    emb = np.load(artifact / EMBEDDINGS)
    enc = Encoder(artifact / MODEL_FILES["fp32"], artifact / TOKENIZER, max_length=128)
    np.testing.assert_allclose(enc.encode(items.titles[:5]), emb[:5], atol=1e-5)


def test_items_and_complements_round_trip(artifact, tmp_path):
    items = ItemTable.read(artifact / ITEMS)
    comp = Complements.read(artifact / COMPLEMENTS)
    assert len(comp.indptr) == len(items) + 1 and comp.indptr[-1] == len(comp.indices) > 0
    assert np.all((comp.strength >= 0) & (comp.strength <= 1)) and comp.strength.max() == pytest.approx(1.0)
    assert np.all(comp.support >= 0)  # learned lists: aisle-backoff candidates may have no shared basket
    for row in range(len(items)):
        idx, strength, _ = comp.of(row)
        assert row not in idx.tolist()
        assert np.all(np.diff(strength) <= 1e-7)  # best first
        assert all(items.categories[j] != items.categories[row] for j in idx)
    assert np.all((items.quality >= 0.6) & (items.quality <= 1.0)) and items.quality.max() == pytest.approx(1.0)
    assert items.orders.max() > 0 and np.all(np.isnan(items.prices))
    items.write(tmp_path / ITEMS)
    comp.write(tmp_path / COMPLEMENTS)
    assert (tmp_path / ITEMS).read_bytes() == (artifact / ITEMS).read_bytes()
    again = Complements.read(tmp_path / COMPLEMENTS)
    for name in ("indptr", "indices", "strength", "support"):
        np.testing.assert_array_equal(getattr(again, name), getattr(comp, name))


def test_lexical_index_loads_and_finds_title(artifact):
    import bm25s
    import Stemmer

    items = ItemTable.read(artifact / ITEMS)
    retriever = bm25s.BM25.load(str(artifact / LEXICAL_DIR))
    q = bm25s.tokenize([items.titles[10]], stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)
    docs, scores = retriever.retrieve(q, k=3, show_progress=False)
    assert 10 in docs[0].tolist()


def test_failed_build_leaves_no_artifact(tmp_path, tiny_model):
    from bundlerec_export.build import BuildConfig, BuildError, build_artifact

    out = tmp_path / "never"
    cfg = BuildConfig(dataset="instacart", data_dir=SLICE, out=out, base_model=tiny_model,
                      min_int8_cosine=1.01, agreement_sample=20, limit=40, progress=False)
    with pytest.raises(BuildError, match="min_int8_cosine"):
        build_artifact(cfg)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # an existing folder that is not an artifact is never replaced
    (out / "keep").mkdir(parents=True)
    with pytest.raises(BuildError, match="not an artifact folder"):
        build_artifact(cfg)
    assert (out / "keep").is_dir()


def test_fallback_without_baskets(tmp_path, tiny_model):
    from bundlerec_export.build import BuildConfig, build

    cat = tmp_path / "catalog.csv"
    lines = ["id,title,price"] + [f"{i},item number {i} organic snack,{i + 0.5}" for i in range(40)]
    cat.write_text("\n".join(lines) + "\n")
    res = build(BuildConfig(dataset="csv", catalog=cat, out=tmp_path / "a", base_model=tiny_model,
                            min_int8_cosine=0.0, agreement_sample=10, progress=False, lexical=False,
                            related_band=(-1.0, 0.99999), cold_start=False))
    m = res.manifest
    assert m["complements"]["from_orders"] is False and m["complements"]["method"] == "content_band"
    assert m["quality"]["method"] == "neutral" and m["lexical"] is None
    comp = Complements.read(res.path / COMPLEMENTS)
    assert len(comp.indices) > 0 and np.all(comp.support == 0)
    items = ItemTable.read(res.path / ITEMS)
    assert items.prices[3] == pytest.approx(3.5) and np.all(items.quality == 1.0)


@pytest.mark.slow
def test_real_minilm_on_slice(tmp_path):
    """The packaged all-MiniLM-L6-v2: int8 per-channel agrees with fp32 above the default 0.98."""
    from bundlerec_export.build import BuildConfig, build

    res = build(BuildConfig(dataset="instacart", data_dir=SLICE, out=tmp_path / "real", progress=False))
    m = res.manifest
    assert m["embedding_dim"] == 384 and m["encoder"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    int8 = m["models"]["int8"]["cosine_to_fp32"]
    assert int8["mean"] >= 0.98 and int8["n"] == 200
    assert read_manifest(res.path)["item_count"] == 300


def _slice_judgments(path: Path) -> Path:
    """Queries = the first two words of each slice title (BM25 finds them), every title's product relevant."""
    import csv

    with open(SLICE / "products.csv", newline="") as src, open(path, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["query", "product_id", "relevance"])
        for row in csv.DictReader(src):
            w.writerow([" ".join(row["product_name"].lower().split()[:2]), row["product_id"], 3.0])
    return path


def test_each_stage_returns_its_part_and_the_manifest_is_written_once_with_tuning(tmp_path, tiny_model, monkeypatch):
    from bundlerec_export import build as B
    from bundlerec_server import artifact as A

    parts: dict[str, dict] = {}
    done = B._Stages.done

    def record(self, name, part=None):
        parts[name] = part or {}
        done(self, name, part)

    writes: list[dict] = []
    write_manifest = A.write_manifest

    def record_write(root, manifest):
        writes.append(json.loads(json.dumps(manifest)))
        return write_manifest(root, manifest)

    monkeypatch.setattr(B._Stages, "done", record)
    monkeypatch.setattr(B, "write_manifest", record_write)
    monkeypatch.setattr(A, "write_manifest", record_write)  # what tune.tune_serving would rewrite with
    judgments = _slice_judgments(tmp_path / "judgments.csv")
    # base_model set: fine-tuning is skipped, tuning on the judgments' dev split still runs
    res = B.build(B.BuildConfig(dataset="instacart", data_dir=SLICE, out=tmp_path / "a", base_model=tiny_model,
                                min_int8_cosine=0.9, agreement_sample=20, limit=80, progress=False,
                                finetune_judgments=judgments))
    m = read_manifest(res.path, verify=True)
    assert len(writes) == 1 and writes[0]["serving"] == m["serving"] == res.manifest["serving"]
    assert m["serving"]["tuned_on"]["split"] == "dev" and m["serving"]["tuned_on"]["queries"] > 0

    assert list(parts) == ["load", "export_fp32", "quantize_int8", "quantize_int8_pertoken", "convert_fp16",
                           "agreement", "embed", "index", "ef_recall", "complements", "lexical", "write", "ranker", "tune"]
    assert set(m["timings_s"]) == set(parts) | {"total"}
    for name in ("load", "embed", "complements", "lexical", "tune"):
        assert parts[name] and all(m[key] == value for key, value in parts[name].items()), name
    assert parts["write"] == {}
    assert {**parts["index"]["index"], **parts["ef_recall"]["index"]} == m["index"]
    for variant, stage in (("fp32", "export_fp32"), ("int8", "quantize_int8"), ("int8_pertoken", "quantize_int8_pertoken"),
                           ("fp16", "convert_fp16")):
        assert set(parts[stage]) == {"models"} and list(parts[stage]["models"]) == [variant]
        assert {**parts[stage]["models"][variant], **parts["agreement"]["models"][variant]} == m["models"][variant]
    assert parts["agreement"]["agreement"] == m["agreement"]
    staged = {key for part in parts.values() for key in part}
    untimed = {"encoder", "artifact_version", "created_at", "build_config"}
    assert set(m) == staged | untimed | {"timings_s", "files", "format_version"}
    assert m["encoder"]["query_truncate_tokens"] == 64 and "max_query_tokens" not in m["encoder"]


def test_cli_defaults_are_build_config_defaults():
    from dataclasses import fields

    from bundlerec_export.build import BuildConfig
    from bundlerec_export.cli import _parser, config_from_args

    args = _parser().parse_args(["--dataset", "instacart", "--data-dir", "d", "--out", "o"])
    cfg = config_from_args(args, None)
    assert cfg == BuildConfig(dataset="instacart", data_dir=Path("d"), out=Path("o"))
    args = _parser().parse_args(["--dataset", "csv", "--catalog", "c.csv", "--out", "o", "--batch-size", "8",
                                 "--no-lexical", "--hnsw-m", "32", "--related-band", "0.1", "0.9", "-q"])
    cfg = config_from_args(args, Path("j.csv"))
    assert (cfg.embed_batch_size, cfg.lexical, cfg.hnsw_m, cfg.related_band, cfg.progress) == (8, False, 32, (0.1, 0.9), False)
    assert cfg.finetune_judgments == Path("j.csv") and cfg.catalog == Path("c.csv")
    assert {f.name for f in fields(BuildConfig)} >= {"min_int8_cosine", "ef_search", "finetune_epochs"}
    args = _parser().parse_args(["--dataset", "instacart", "--data-dir", "d", "--out", "o", "--student-layers", "0,2,4",
                                 "--student-texts", "q.txt", "--student-epochs", "5", "--student-finetune-epochs", "0"])
    cfg = config_from_args(args, None)
    assert (cfg.student_layers, cfg.student_texts, cfg.student_options, cfg.student_finetune_epochs) == \
        ((0, 2, 4), Path("q.txt"), {"epochs": 5}, 0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dataset", "instacart", "--data-dir", "d", "--out", "o", "--student-layers", "a,b"])
    with pytest.raises(ValueError, match="student_layers"):
        BuildConfig(dataset="instacart", out=Path("o"), student_layers=(1, 1))


def test_catalog_without_orders_gets_cold_start_complements_without_substitutes(tmp_path, tiny_model, monkeypatch):
    """With the base encoder (the cold-start model's embedding space), a catalog without orders gets the cold-start
    model's lists: never an item of the anchor's own category, support 0 (so bundles say they are predicted)."""
    from bundlerec_export import cold_start as cs
    from bundlerec_export import onnx_export as ox
    from bundlerec_export.build import BuildConfig, build

    dim = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    rng = np.random.default_rng(0)
    model = cs.ColdStartModel(rng.normal(size=(dim, 8)).astype(np.float32), rng.normal(size=(dim, 8)).astype(np.float32),
                              np.zeros(dim, dtype=np.float32))
    monkeypatch.setattr(cs, "load_default_model", lambda: model)
    monkeypatch.setattr(ox, "default_base_model", lambda: tiny_model)  # "no --base-model" = the base encoder
    # the random tiny BERT embeds all titles alike (cosine > 0.8): only the category rule may exclude here
    monkeypatch.setattr(cs, "cold_start_complements", functools.partial(cs.cold_start_complements, dup_cosine=1.01))
    cats = ["pasta", "sauce", "cheese", "wine"]
    cat = tmp_path / "catalog.csv"
    cat.write_text("id,title,category\n" + "".join(f"{i},{cats[i % 4]} product {i},{cats[i % 4]}\n" for i in range(40)))
    res = build(BuildConfig(dataset="csv", catalog=cat, out=tmp_path / "a", min_int8_cosine=0.0, agreement_sample=10,
                            progress=False, lexical=False))
    info = res.manifest["complements"]
    assert info["method"] == "cold_start_two_tower" and info["from_orders"] is False and info["anchors"] == 40
    comp = Complements.read(res.path / COMPLEMENTS)
    assert len(comp.indices) > 0 and np.all(comp.support == 0) and np.all((comp.strength > 0) & (comp.strength <= 1))
    for row in range(40):
        assert all(int(j) % 4 != row % 4 and int(j) != row for j in comp.of(row)[0])


def test_never_ordered_items_get_the_aisle_context_list(tmp_path, tiny_model, monkeypatch):
    """A catalog with orders: items no basket holds get popularity + aisle-context lists (cold_start.context_complements),
    replacing the learned ranker's shared per-aisle list; substitutes (same aisle) excluded, support 0 (predicted)."""
    import shutil

    from bundlerec_export import cold_start as cs
    from bundlerec_export.build import BuildConfig, build
    from bundlerec_export.datasets import load_dataset

    # the random tiny BERT embeds all titles alike (cosine > 0.8): only the aisle rule may exclude here
    monkeypatch.setattr(cs, "cold_start_complements", functools.partial(cs.cold_start_complements, dup_cosine=1.01))
    data = tmp_path / "data"
    shutil.copytree(SLICE, data)
    new = [("900001", "Brand New Cantaloupe Cubes", "fresh fruits"), ("900002", "New Sharp Cheddar", "packaged cheese"),
           ("900003", "New Cola Zero", "soft drinks"), ("900004", "Moon Rocks", "an aisle nobody ordered from")]
    with open(data / "products.csv", "a", encoding="utf-8") as fh:
        fh.write("".join(f"{pid},{name},{aisle},test\n" for pid, name, aisle in new))
    res = build(BuildConfig(dataset="instacart", data_dir=data, out=tmp_path / "a", base_model=tiny_model,
                            min_int8_cosine=TINY_MIN_INT8, agreement_sample=10, progress=False, lexical=False))
    info = res.manifest["complements"]
    assert info["method"] == "lambdarank"
    cold = info["cold_start"]
    assert cold["method"] == cs.AISLE_CONTEXT_METHOD and cold["rows_replaced"] == len(new)
    assert cold["config"]["beta"] == cs.ContextConfig().beta and cold["validation"]["test_r5_x_popularity"]
    items = ItemTable.read(res.path / ITEMS)
    comp = Complements.read(res.path / COMPLEMENTS)
    ds = load_dataset("instacart", data)
    assert [it.id for it in ds.items] == items.ids
    rows_of = {it.id: r for r, it in enumerate(ds.items)}
    baskets = [[rows_of[i] for i in b.items] for b in ds.baskets]
    expected, _ = cs.context_complements(np.load(res.path / EMBEDDINGS), items.categories, items.titles, baskets,
                                         top_k=20)
    for pid, _, aisle in new:
        row = rows_of[pid]
        idx, strength, support = comp.of(row)
        assert len(idx) > 0 and idx.tolist() == expected.of(row)[0].tolist()
        assert np.all(support == 0) and np.all((strength > 0) & (strength <= 1))
        assert all(items.orders[j] > 0 and items.categories[j] != aisle for j in idx.tolist())
    # an ordered item keeps its learned list (support = baskets holding both)
    ordered = int(np.argmax(items.orders))
    assert comp.of(ordered)[2].max() > 0


def test_a_cached_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    from bundlerec_export import folders

    folder = tmp_path / "cache" / "model-abc"
    with folders.filled(folder, ".model-") as work:
        (work / "weights").write_text("v1")
    assert (folder / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), folders.filled(folder, ".model-") as work:
        (work / "weights").write_text("half")
        raise RuntimeError("training failed")
    assert (folder / "weights").read_text() == "v1"  # the failed run left no trace
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model-abc"]
    with folders.filled(folder, ".model-") as work:
        (work / "weights").write_text("v2")
    assert (folder / "weights").read_text() == "v2"

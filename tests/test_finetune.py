"""Fine-tuning (bundlerec_export.finetune) on a toy judgment set with a tiny random BERT: fast, no timing asserts."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from bundlerec_export.evaluation import split_of as bench_split_of

WORDS = ["drill", "hammer", "paint", "brush", "ladder", "faucet", "valve", "pipe", "lamp", "bulb", "screw", "nail",
         "saw", "glue", "tape", "hose", "mower", "rake", "shovel", "tile", "grout", "caulk", "fan", "vent"]
COLORS = ["white", "black", "red", "blue", "green", "steel", "brass", "oak"]


def _toy_data(root: Path) -> tuple[Path, Path]:
    """~240 products and ~60 queries (each: 2 relevant, 1 medium, 2 low-relevance judged products)."""
    rng = random.Random(3)
    products = root / "products.csv"
    judgments = root / "judgments.csv"
    titles = {}
    pid = 100000
    for w in WORDS:
        for c in COLORS:
            pid += 1
            titles[str(pid)] = f"{c.title()} {w} {rng.choice(['pro', 'max', 'lite', 'xl'])} {pid % 97}"
    with products.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["product_id", "title"])
        for p, t in titles.items():
            wr.writerow([p, t])
    by_word = {w: [p for p, t in titles.items() if f" {w} " in t] for w in WORDS}
    rows = []
    for w in WORDS:
        for c in COLORS[:3]:
            q = f"{c} {w}"
            good = [p for p in by_word[w] if titles[p].lower().startswith(c)]
            others = [p for p in by_word[w] if p not in good]
            far = rng.sample([p for p in titles if p not in by_word[w]], 2)
            for p in good:
                rows.append((q, p, 3.0))
            rows.append((q, others[0], 2.67))
            rows.append((q, others[1], 2.0))
            rows.append((q, far[0], 1.0))
            rows.append((q, far[1], 1.33))
    with judgments.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["query", "product_id", "relevance"])
        wr.writerows(rows)
    return judgments, products


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-toy")
    j, p = _toy_data(root)
    from bundlerec_export.tiny import make_tiny_bert

    model = make_tiny_bert(root / "tiny-bert")
    return j, p, model


def _cfg(toy, out: Path, **kw):
    from bundlerec_export.finetune import FinetuneConfig

    j, p, model = toy
    base = dict(judgments=j, products=p, out=out, base_model=model, batch_size=8, epochs=1, lr=1e-3,
                hard_negatives=2, eval_random_products=50, progress=False, threads=1, seed=1, typo_prob=0.3)
    base.update(kw)
    return FinetuneConfig(**base)


def test_split_is_the_benchmarks_split(toy):
    from bundlerec_export import finetune as ft

    j, _, _ = toy
    qs = list(ft.read_judgments(j)) + ["  Angle   Bracket ", "l bracket", "x" * 40]
    assert all(ft.split_of(q) == bench_split_of(q) for q in qs)
    sp = ft.split_judgments(ft.read_judgments(j))
    assert all(bench_split_of(q) == "train" for q in sp.train)
    assert all(bench_split_of(q) == "dev" for q in sp.dev)
    assert all(bench_split_of(q) == "test" for q in sp.test)


def test_training_pairs_only_from_train_queries_and_negatives_never_relevant(toy):
    from bundlerec_export import finetune as ft

    j, p, _ = toy
    cfg = _cfg(toy, Path("/nonexistent"))
    judg = ft.read_judgments(j)
    titles = ft.read_titles(p)
    sp = ft.split_judgments(judg)
    assert sp.dev or sp.test  # the toy set exercises the split
    qdata = ft.build_training_queries(sp.train, titles, cfg)
    ft.mine_bm25_negatives(qdata, titles, cfg.bm25_k)
    assert qdata and all(bench_split_of(q.query) == "train" for q in qdata)
    assert any(q.bm25_negatives for q in qdata) and any(q.judged_negatives for q in qdata)
    rng = random.Random(0)
    for _ in range(3):
        for ex in ft.sample_epoch(qdata, cfg, rng):
            q = qdata[ex.qidx]
            assert bench_split_of(q.query) == "train"
            rel = judg[q.query]
            assert rel[ex.positive] >= cfg.pos_min_rel
            for n in ex.negatives:
                assert rel.get(n, 1.0) <= cfg.neg_max_rel  # judged-relevant products are never negatives
                assert ft._norm_title(titles[n]) not in q.forbidden_titles
    # the loss mask hides every in-batch candidate judged relevant to the query (except its own positive)
    batch = ft.sample_epoch(qdata, cfg, random.Random(1))[:8]
    docs, labels, mask = ft.batch_tensors(batch, qdata, titles)
    for i, ex in enumerate(batch):
        rel = judg[qdata[ex.qidx].query]
        for k, d in enumerate(docs):
            if k != i and rel.get(d, 1.0) > cfg.neg_max_rel:
                assert mask[i, k]
        assert not mask[i, labels[i]]


def test_typo_keeps_first_letter_and_short_words():
    from bundlerec_export.finetune import add_typo

    rng = random.Random(0)
    changed = 0
    for _ in range(50):
        out = add_typo("cordless drill 18v", rng)
        words = out.split(" ")
        assert len(words) == 3 and words[2] == "18v"  # digits/short words untouched
        assert words[0][0] == "c" and words[1][0] == "d"  # first letters kept
        assert abs(len(out) - len("cordless drill 18v")) <= 1
        changed += out != "cordless drill 18v"
    assert changed >= 40  # a replace by the same letter may leave it unchanged, rarely
    assert add_typo("a b 12", rng) == "a b 12"


def test_loss_decreases_on_toy_set(toy):
    import torch

    from bundlerec_export import finetune as ft

    j, p, model_dir = toy
    cfg = _cfg(toy, Path("/nonexistent"), hard_negatives=1)
    titles = ft.read_titles(p)
    qdata = ft.build_training_queries(ft.split_judgments(ft.read_judgments(j)).train, titles, cfg)
    ft.mine_bm25_negatives(qdata, titles, cfg.bm25_k)
    torch.manual_seed(0)
    tok, model = ft.load_model(model_dir)
    model.train()
    batch = ft.sample_epoch(qdata, cfg, random.Random(0))[:16]
    docs, labels, mask = ft.batch_tensors(batch, qdata, titles)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        q = ft.embed(model, tok, [ex.query for ex in batch], 32)
        d = ft.embed(model, tok, [titles[x] for x in docs], 48)
        loss = ft.contrastive_loss(q, d, labels, mask, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    from bundlerec_export.finetune import finetune

    return finetune(_cfg(toy, tmp_path_factory.mktemp("ft") / "a", epochs=2, eval_before=True))


def test_outputs_and_log(trained):
    from bundlerec_export.finetune import LOG_FILE, PLOT_FILE, summary

    for name in ("config.json", "model.safetensors", "tokenizer.json", LOG_FILE, PLOT_FILE):
        assert (trained / name).is_file(), name
    log = json.loads((trained / LOG_FILE).read_text())
    assert log["steps"] == len(log["loss"]) > 0
    assert [e["epoch"] for e in log["epochs"]] == [0, 1, 2]
    assert all(e["dev"]["ndcg"] is not None for e in log["epochs"])
    assert set(log["split_sizes"]) == {"train", "dev", "test"}
    s = summary(log)
    assert len(s["dev_per_epoch"]) == 3 and s["seconds"]["total"] > 0


def test_deterministic_with_fixed_seed(toy, trained, tmp_path):
    from bundlerec_export.finetune import finetune
    from bundlerec_server.artifact import sha256_file

    again = finetune(_cfg(toy, tmp_path / "b", epochs=2, eval_before=True, plot=False))
    assert sha256_file(again / "model.safetensors") == sha256_file(trained / "model.safetensors")
    other = finetune(_cfg(toy, tmp_path / "c", epochs=2, seed=2, eval_dev=False, plot=False))
    assert sha256_file(other / "model.safetensors") != sha256_file(trained / "model.safetensors")


def test_output_folder_loads_and_exports(trained, tmp_path):
    import numpy as np

    from bundlerec_export import finetune as ft
    from bundlerec_export import onnx_export as ox
    from bundlerec_server.artifact import MODEL_FILES, TOKENIZER
    from bundlerec_server.encoder import Encoder

    tok, model = ft.load_model(trained)
    fp32 = ox.export_fp32(trained, tmp_path / Path(MODEL_FILES["fp32"]).parent)
    texts = ["white drill", "Oak ladder pro 12", "brass faucet valve"]
    enc = Encoder(fp32, tmp_path / TOKENIZER, max_length=48)
    a = enc.encode(texts)
    b = ft.embed_many(model, tok, texts, 48, 8)
    assert np.allclose(a, b, atol=1e-4)


def test_build_with_finetune_caches_and_reports(toy, tmp_path):
    from bundlerec_export.build import BuildConfig, build
    from bundlerec_server.artifact import read_manifest

    j, p, model = toy
    cfg = BuildConfig(dataset="homedepot", data_dir=p.parent, out=tmp_path / "art", finetune_judgments=j, finetune_epochs=1,
                      finetune_options={"base_model": model, "batch_size": 8, "eval_random_products": 50,
                                        "threads": 1},
                      agreement_sample=32, min_int8_cosine=0.9, progress=False)
    m = build(cfg).manifest
    enc = m["encoder"]
    assert enc["fine_tuned"] is True and enc["training"]["reused_from_cache"] is False
    assert enc["training"]["dev_per_epoch"][0]["epoch"] == 1
    assert (tmp_path / "art" / "training.png").is_file() and (tmp_path / "art" / "train_log.json").is_file()
    read_manifest(tmp_path / "art", verify=True)
    assert list((tmp_path / "art.work").glob("finetuned-*"))
    m2 = build(cfg).manifest
    assert m2["encoder"]["training"]["reused_from_cache"] is True
    assert m2["timings_s"]["finetune"] < m["timings_s"]["finetune"]


def test_build_with_a_student_serves_the_fine_tuned_student_and_caches_it(toy, tmp_path):
    """student_layers: the teacher (fine-tuned here) is distilled into a one-layer student, which is fine-tuned
    on the same judgments and served: the artifact's vectors are that model's, the manifest says so, a rebuild
    reuses the student, and layers the teacher lacks are refused."""
    import numpy as np

    from bundlerec_export import finetune as ft
    from bundlerec_export.build import BuildConfig, BuildError, build
    from bundlerec_export.recomplement import served_is_base
    from bundlerec_server.artifact import read_manifest

    j, p, model = toy
    cfg = BuildConfig(dataset="homedepot", data_dir=p.parent, out=tmp_path / "art", finetune_judgments=j, finetune_epochs=1,
                      finetune_options={"base_model": model, "batch_size": 8, "eval_random_products": 50, "threads": 1},
                      student_layers=(1,), student_options={"epochs": 2, "batch_size": 8, "lr": 1e-3, "threads": 1},
                      agreement_sample=32, min_int8_cosine=0.9, progress=False, ranker=False)
    m = build(cfg).manifest
    enc, st = m["encoder"], m["encoder"]["student"]
    assert st["layers"] == [1] and st["reused_from_cache"] is False and len(st["val_cosine"]) == 2
    student = Path(st["path"])
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1
    assert Path(st["teacher"]).name.startswith("finetuned-")  # the fine-tuned teacher, not the tiny base
    assert st["other_texts"] == sum(ft.split_of(q) == "train" for q in ft.read_judgments(j))
    assert enc["fine_tuned"] is True and enc["fine_tuned_from"] == str(student)
    served = Path(enc["base_model_path"])
    assert json.loads((served / "config.json").read_text())["num_hidden_layers"] == 1
    assert not served_is_base(m)
    # the artifact's catalog vectors are the served (fine-tuned student) model's
    items = [json.loads(line) for line in (tmp_path / "art" / "items.jsonl").open()]
    tok, net = ft.load_model(served)
    emb = np.load(tmp_path / "art" / "embeddings.npy")
    assert np.allclose(ft.embed_many(net, tok, [it["title"] for it in items[:8]], 128, 8), emb[:8], atol=1e-4)
    read_manifest(tmp_path / "art", verify=True)
    m2 = build(cfg).manifest
    assert m2["encoder"]["student"]["reused_from_cache"] is True
    assert m2["encoder"]["training"]["reused_from_cache"] is True
    assert np.array_equal(np.load(tmp_path / "art" / "embeddings.npy"), emb)
    # refused before anything is trained or loaded: a fresh cache would otherwise fine-tune the teacher first
    fresh = {**cfg.__dict__, "out": tmp_path / "bad", "finetune_cache": tmp_path / "empty-cache"}
    with pytest.raises(BuildError, match="student_layers"):
        build(BuildConfig(**{**fresh, "student_layers": (2,)}))
    with pytest.raises(BuildError, match="not found"):
        build(BuildConfig(**{**fresh, "student_texts": tmp_path / "missing.txt"}))
    with pytest.raises(BuildError, match="student_options"):
        build(BuildConfig(**{**fresh, "student_options": {"epochz": 2}}))
    assert not (tmp_path / "empty-cache").exists() and not (tmp_path / "bad").exists()


def test_cli_finetune_flags(tmp_path):
    from bundlerec_export.cli import _finetune_judgments, _parser

    hd = tmp_path / "hd"
    assert _finetune_judgments(_parser().parse_args(["--dataset", "homedepot", "--data-dir", str(hd), "--out", "x"])) \
        == hd / "judgments.csv"
    assert _finetune_judgments(_parser().parse_args(
        ["--dataset", "homedepot", "--data-dir", str(hd), "--out", "x", "--no-finetune"])) is None
    assert _finetune_judgments(_parser().parse_args(
        ["--dataset", "icecat", "--data-dir", str(hd), "--out", "x"])) is None
    assert _finetune_judgments(_parser().parse_args(
        ["--dataset", "icecat", "--data-dir", str(hd), "--out", "x", "--finetune"])) == hd / "judgments.csv"
    assert _finetune_judgments(_parser().parse_args(
        ["--dataset", "csv", "--catalog", "c.csv", "--out", "x", "--finetune", "j.csv"])) == Path("j.csv")


def test_train_query_tokens_rename_keeps_old_caches_and_logs(tmp_path):
    """``max_query_tokens`` became ``train_query_tokens``: the cache key is the one computed before the rename
    (so a cached model is reused), and an old ``train_log.json`` still yields the manifest's settings."""
    from bundlerec_export.finetune import FinetuneConfig, summary, upgrade_settings

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    cfg = FinetuneConfig(judgments=Path("j.csv"), out=Path("."), base_model=model)
    assert cfg.train_query_tokens == 32
    assert cfg.cache_key("data") == "7bf2686488e5677a"  # computed by the code before the rename
    assert FinetuneConfig(judgments=Path("j.csv"), out=Path("."), base_model=model, train_query_tokens=24) \
        .cache_key("data") != cfg.cache_key("data")
    assert upgrade_settings({"max_query_tokens": 24, "epochs": 1}) == {"train_query_tokens": 24, "epochs": 1}
    old_log = {"config": {"epochs": 1, "max_query_tokens": 32}, "split_sizes": {}, "train_queries_used": 1,
               "steps": 1, "seconds": {"total": 1.0}, "loss": [1.0], "epochs": []}
    assert summary(old_log)["settings"] == {"epochs": 1, "train_query_tokens": 32}


def test_split_and_metrics_come_from_the_export_package():
    import bundlerec_export.finetune as ft
    from bundlerec_export import evaluation

    assert ft.split_of is evaluation.split_of and ft.read_judgments is evaluation.read_judgments
    assert not hasattr(ft, "REPO_ROOT") and not hasattr(ft, "_metrics_module")


def test_student_texts_leave_out_titles_train_queries_twice_and_blank_lines(toy, tmp_path, monkeypatch):
    """The student's other texts: the judgments' TRAIN queries (never dev or test), then the texts file's lines in
    order, without blanks, repeats or catalog titles (a held-out validation title must stay unseen)."""
    from bundlerec_export import build as B
    from bundlerec_export import finetune as ft
    from bundlerec_export import shrink
    from bundlerec_export.datasets import load_dataset

    j, p, model = toy
    ds = load_dataset("homedepot", p.parent, None, None)
    train = sorted(q for q in ft.read_judgments(j) if ft.split_of(q) == "train")
    held = [q for q in ft.read_judgments(j) if ft.split_of(q) != "train"]
    title = ds.items[0].title
    texts = tmp_path / "texts.txt"
    texts.write_text(f"new query one\n\n{title}\n  new query one \n{train[0]}\nnew query two\n", encoding="utf-8")
    seen = {}

    def fake(teacher, layers, titles, queries, settings, cache, item_tokens, progress=True):
        seen.update(titles=titles, queries=queries, settings=settings, layers=layers)
        return shrink.Student(tmp_path, teacher, {}, cached=False)

    monkeypatch.setattr(shrink, "student_for_build", fake)
    cfg = B.BuildConfig(dataset="homedepot", data_dir=p.parent, out=tmp_path / "a", finetune_judgments=j,
                        student_layers=(0,), student_texts=texts, student_options={"epochs": 2})
    B.student_stage(cfg, model, ds, B._check_student(cfg, model))
    assert seen["queries"] == [*train, "new query one", "new query two"]
    assert not set(held) & set(seen["queries"]) and title not in seen["queries"]
    assert seen["titles"] == [item.title for item in ds.items] and seen["layers"] == (0,)
    assert seen["settings"].epochs == 2 and seen["settings"].seed == cfg.seed

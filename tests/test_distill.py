"""Distilling the served hybrid ranking into the bi-encoder: teacher lists mined by the artifact's engine (train
queries only), the listwise KL loss, judged labels overriding the teacher, and a deterministic fine-tune with it
(a tiny random BERT, toy judgments)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import write_judgments
from test_finetune import _cfg, _toy_data

from bundlerec_export.evaluation import read_judgments, split_of


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from bundlerec_export.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("distill-toy")
    j, p = _toy_data(root)
    return j, p, make_tiny_bert(root / "tiny-bert")


def _teacher_file(toy, path: Path, seed: int = 0) -> Path:
    """Teacher lists for every train query of the toy set: its BM25 top 12 with random descending scores."""
    from bundlerec_export import finetune as ft
    from bundlerec_export.distill import FORMAT, TeacherLists, write_teacher

    j, p, _ = toy
    titles = ft.read_titles(p)
    train = sorted(q for q in read_judgments(j) if split_of(q) == "train")
    ids = sorted(titles)
    ranked = ft.bm25_rank(train, ids, [titles[i] for i in ids], 12)
    rng = np.random.default_rng(seed)
    lists = {q: (r, np.sort(rng.normal(size=len(r)))[::-1]) for q, r in zip(train, ranked)}
    return write_teacher(TeacherLists({"format": FORMAT, "depth": 12}, lists), path)


def test_distill_loss_follows_the_teacher_order():
    import torch

    from bundlerec_export.finetune import distill_loss

    torch.manual_seed(0)
    q = torch.nn.Parameter(torch.randn(3, 16))
    d = torch.nn.Parameter(torch.randn(9, 16))
    index = torch.tensor([[0, 3, 4, 5], [1, 6, 7, -1], [2, 8, -1, -1]])
    targets = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    opt = torch.optim.Adam([q, d], lr=0.05)
    losses = []
    for _ in range(150):
        qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
        loss = distill_loss(qn, dn, index, targets, 0.05, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.01, (losses[0], losses[-1])
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    for i in range(3):
        rows = index[i][index[i] >= 0]
        cos = (dn[rows] @ qn[i]).detach().numpy()
        t = targets[i][: len(rows)].numpy()
        assert list(np.argsort(-cos, kind="stable")) == list(np.argsort(-t, kind="stable"))
    # padding never counts; a list of one product carries no order (zero loss, no NaN)
    assert distill_loss(qn, dn, torch.tensor([[0, -1]]), torch.tensor([[1.0, 0.0]]), 0.05, 1.0).item() == 0.0


def test_judged_labels_override_the_teacher_and_own_unjudged_candidates_are_not_negatives(toy, tmp_path):
    from bundlerec_export import finetune as ft
    from bundlerec_export.distill import read_teacher

    j, p, _ = toy
    cfg = _cfg(toy, Path("/nonexistent"), hard_negatives=1, distill=_teacher_file(toy, tmp_path / "t.json"),
               distill_candidates=4)
    titles = ft.read_titles(p)
    train = ft.split_judgments(read_judgments(j)).train
    qdata = ft.build_training_queries(train, titles, cfg)
    teacher = read_teacher(cfg.distill)
    assert ft.attach_teacher(qdata, teacher.lists, train, titles) == len(qdata)
    for q in qdata:
        ids, scores = teacher.lists[q.query]
        lo, hi = float(min(scores)), float(max(scores))
        rel = train[q.query]
        assert q.teacher_ids == list(ids)
        for pid, t, s in zip(q.teacher_ids, q.teacher_scores, scores):
            assert t == pytest.approx(ft.label_target(rel[pid], lo, hi) if pid in rel else s)
        assert all(t == pytest.approx(ft.label_target(rel[pid], lo, hi)) for pid, t in zip(q.positives, q.positive_targets))
    assert ft.label_target(3.0, -1.0, 2.0) == 2.0 and ft.label_target(1.0, -1.0, 2.0) == -1.0
    batch = ft.sample_epoch(qdata, cfg, random.Random(0))[:8]
    for ex in batch:
        q = qdata[ex.qidx]
        assert len(ex.distill) == 4 and ex.positive not in ex.distill and set(ex.distill) <= set(q.teacher_ids)
        assert ex.targets[0] == q.positive_targets[q.positives.index(ex.positive)]
    docs, labels, mask = ft.batch_tensors(batch, qdata, titles)
    n_plain = len(batch) + sum(len(ex.negatives) for ex in batch)
    index, targets = ft.distill_tensors(batch, n_plain)
    for i, ex in enumerate(batch):
        q = qdata[ex.qidx]
        rows = index[i][index[i] >= 0].tolist()
        assert [docs[r] for r in rows] == [ex.positive, *ex.distill]
        assert targets[i][: len(rows)].tolist() == pytest.approx(ex.targets)
        for r in rows[1:]:  # own teacher-list products: InfoNCE negatives only where judged low
            assert bool(mask[i, r]) == (docs[r] not in q.judged_negatives)
        assert not mask[i, labels[i]]


def test_distilled_finetune_is_deterministic_and_logged(toy, tmp_path):
    from bundlerec_export.finetune import LOG_FILE, FinetuneConfig, finetune, summary
    from bundlerec_server.artifact import sha256_file

    teacher = _teacher_file(toy, tmp_path / "t.json")
    kw = dict(distill=teacher, hard_negatives=0, eval_dev=False, plot=False, max_steps=4)
    a = finetune(_cfg(toy, tmp_path / "a", **kw))
    b = finetune(_cfg(toy, tmp_path / "b", **kw))
    assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")
    plain = finetune(_cfg(toy, tmp_path / "c", **{**kw, "distill": None}))
    assert sha256_file(plain / "model.safetensors") != sha256_file(a / "model.safetensors")
    log = json.loads((a / LOG_FILE).read_text())
    assert len(log["kl_loss"]) == log["steps"] == 4 and all(np.isfinite(log["kl_loss"]))
    assert log["teacher"]["train_queries_with_list"] > 0
    assert "listwise KL" in summary(log)["loss"] and summary(log)["distill"]["distill_candidates"] == 3
    # the cache key follows the teacher file's content; without --distill it is the key of before the option
    j, p, model = toy
    cfg = FinetuneConfig(judgments=j, out=Path("."), base_model=model, distill=teacher)
    other = _teacher_file(toy, tmp_path / "t2.json", seed=1)
    assert cfg.cache_key("x") != FinetuneConfig(judgments=j, out=Path("."), base_model=model, distill=other).cache_key("x")
    assert cfg.cache_key("x") != FinetuneConfig(judgments=j, out=Path("."), base_model=model).cache_key("x")
    with pytest.raises(ValueError):
        FinetuneConfig(judgments=j, out=Path("."), distill=teacher, distill_temperature=0)


def test_mining_reads_only_train_queries_and_is_cached(tiny_artifact, tmp_path):
    from bundlerec_export.distill import mine_to_file, read_teacher
    from bundlerec_server.artifact import read_manifest

    items = [json.loads(line) for line in (tiny_artifact / "items.jsonl").read_text().splitlines()]
    judgments = write_judgments(items, tmp_path / "judgments.csv")
    out = mine_to_file(tiny_artifact, judgments, tmp_path / "teacher.json", depth=8, progress=False, max_queries=25)
    t = read_teacher(out)
    train = sorted(q for q in read_judgments(judgments) if split_of(q) == "train")
    assert sorted(t.lists) == train[:25] and t.meta["queries"] == 25 and t.meta["depth"] == 8
    ids = {it["id"] for it in items}
    fusion = read_manifest(tiny_artifact).get("serving", {}).get("fusion", {}).get("method")
    assert t.meta["fusion"] == (fusion or t.meta["fusion"])
    for pids, scores in t.lists.values():
        assert 0 < len(pids) <= 8 and set(pids) <= ids and len(set(pids)) == len(pids)
        assert np.all(np.diff(scores) <= 1e-9)  # the served order: best first
    mtime = out.stat().st_mtime_ns
    assert mine_to_file(tiny_artifact, judgments, out, depth=8, progress=False, max_queries=25) == out
    assert out.stat().st_mtime_ns == mtime  # reused
    mine_to_file(tiny_artifact, judgments, out, depth=6, progress=False, max_queries=25)
    assert read_teacher(out).meta["depth"] == 6  # other settings: mined again


def test_teacher_logits_invert_the_served_logistic():
    from bundlerec_export.distill import teacher_logits
    from bundlerec_server.learned_ranker import positive

    raw = np.array([-4.0, -0.3, 0.0, 2.5, 7.0])
    assert np.allclose(teacher_logits(positive(raw), learned=True), raw, atol=1e-9)
    assert np.array_equal(teacher_logits(np.array([0.3, 0.1]), learned=False), [0.3, 0.1])


def test_dense_exact_reuses_the_artifact_catalog_and_matches_torch(tiny_artifact, tmp_path):
    """benchmarks.dense_exact: the artifact's embeddings and a torch pass over the same encoder folder give the
    same figures (the catalog check passes), and they are the evaluation module's metrics."""
    from benchmarks import dense_exact

    items = [json.loads(line) for line in (tiny_artifact / "items.jsonl").read_text().splitlines()]
    judgments = write_judgments(items, tmp_path / "judgments.csv")
    folder = json.loads((tiny_artifact / "manifest.json").read_text())["encoder"]["base_model_path"]
    res = dense_exact.run(tiny_artifact, judgments, "all", [("npy", "artifact"), ("torch", folder)], threads=1,
                          check_rows=50)
    a, b = res["runs"]["npy"], res["runs"]["torch"]
    assert res["catalog"] == len(items) and res["queries"] > 0
    assert a["parity_min_cosine"] > 0.999
    assert a["aggregate"]["ndcg"] == pytest.approx(b["aggregate"]["ndcg"], abs=0.02)
    assert 0.0 < b["aggregate"]["ndcg"] <= 1.0


def test_eval_only_reproduces_the_logged_dev_check(toy, tmp_path):
    from bundlerec_export.finetune import LOG_FILE, evaluate_model, finetune

    out = finetune(_cfg(toy, tmp_path / "m", max_steps=2, plot=False))
    logged = json.loads((out / LOG_FILE).read_text())["epochs"][-1]["dev"]
    res = evaluate_model(_cfg(toy, tmp_path / "unused", base_model=out))
    assert res["dev"]["queries"] == logged["queries"] > 0
    assert res["dev"]["ndcg"] == pytest.approx(logged["ndcg"], abs=1e-9)

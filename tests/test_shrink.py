"""A shallower student encoder (bundlerec_export.shrink): the kept layers are the teacher's, a short distillation
brings the student's vectors closer to the teacher's, and the CLI trains on an artifact's titles and TRAIN queries
(tiny random BERT, the session's tiny artifact)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SLICE, write_judgments

from bundlerec_export.evaluation import read_judgments, split_of


@pytest.fixture(scope="module")
def teacher(artifact_root) -> Path:
    from bundlerec_export.tiny import make_tiny_bert

    return make_tiny_bert(artifact_root / "shrink-teacher", seed=3)


def _state(path: Path) -> dict:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True).state_dict()


def test_student_keeps_the_listed_layers(teacher, tmp_path):
    from bundlerec_export.shrink import make_student

    out = make_student(teacher, [1], tmp_path / "student")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert (out / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    t, s = _state(teacher), _state(out)
    assert not any(k.startswith("encoder.layer.1.") for k in s)
    layer_keys = [k for k in s if k.startswith("encoder.layer.0.")]
    assert layer_keys
    for k in layer_keys:  # student layer 0 is teacher layer 1, not teacher layer 0
        assert np.array_equal(s[k].numpy(), t[k.replace("layer.0.", "layer.1.")].numpy()), k
    assert not all(np.array_equal(s[k].numpy(), t[k].numpy()) for k in layer_keys)
    for k in s:
        if k.startswith("embeddings."):
            assert np.array_equal(s[k].numpy(), t[k].numpy()), k
    with pytest.raises(ValueError, match="layers"):
        make_student(teacher, [2], tmp_path / "bad")


def test_short_distillation_lowers_the_loss(teacher, tmp_path):
    from bundlerec_export.finetune import load_model
    from bundlerec_export.shrink import DistillSettings, cosine_to, distill, make_student

    texts = [f"{a} {b} widget {n}" for a in ("red", "blue", "steel", "oak") for b in ("door", "pipe", "lamp")
             for n in range(4)]
    # targets far from where the student starts (a random tiny BERT's two layers barely move its embeddings)
    targets = np.random.default_rng(0).normal(size=(len(texts), 32)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    tok, student = load_model(make_student(teacher, [1], tmp_path / "student"))
    before = cosine_to(student, tok, texts, targets, 32)
    settings = DistillSettings(epochs=8, batch_size=8, lr=3e-3, warmup=0.1, threads=1, freeze_word_embeddings=True)
    word = student.embeddings.word_embeddings.weight.detach().clone()
    log = distill(student, tok, texts, targets, settings, progress=False, val=(texts, targets))
    after = cosine_to(student, tok, texts, targets, 32)
    assert after > before + 0.1
    assert log["epochs"][-1]["loss"] < log["epochs"][0]["loss"]
    assert log["val_cosine_start"] == pytest.approx(before, abs=1e-6)
    assert log["epochs"][-1]["val_cosine"] == pytest.approx(after, abs=1e-6)
    assert (student.embeddings.word_embeddings.weight == word).all()  # frozen


def test_cli_trains_on_titles_and_train_queries_only(teacher, tmp_path):
    from bundlerec_export.build import BuildConfig, build_artifact
    from bundlerec_export.shrink import main
    from bundlerec_export.tiny import make_tiny_bert

    artifact = build_artifact(BuildConfig(dataset="instacart", data_dir=SLICE, out=tmp_path / "art", base_model=teacher,
                                          min_int8_cosine=0.5, agreement_sample=16, min_support=2, progress=False,
                                          cold_start=False, lexical=False))
    items = [json.loads(line) for line in (artifact / "items.jsonl").open()]
    judgments = write_judgments(items, tmp_path / "j.csv")
    train = [q for q in read_judgments(judgments) if split_of(q) == "train"]
    assert 0 < len(train) < len(read_judgments(judgments))
    out = tmp_path / "student"
    assert main(["--teacher", str(teacher), "--layers", "0", "--artifact", str(artifact), "--judgments",
                 str(judgments), "--out", str(out), "--epochs", "1", "--threads", "1", "--no-progress"]) == 0
    log = json.loads((out / "shrink_log.json").read_text())
    assert log["train_queries"] == len(train)
    assert log["titles"] + log["holdout_titles"] == len(items)
    assert log["teacher_check_cosine"] > 0.999
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    more = tmp_path / "student-more"  # more epochs from that student: its weights, not the teacher's layer 0
    assert main(["--teacher", str(teacher), "--init", str(out), "--artifact", str(artifact), "--out", str(more),
                 "--epochs", "1", "--threads", "1", "--no-progress"]) == 0
    more_log = json.loads((more / "shrink_log.json").read_text())
    assert more_log["init"] == str(out)
    assert more_log["val_cosine_start"] == pytest.approx(log["epochs"][-1]["val_cosine"], abs=1e-5)
    other = make_tiny_bert(tmp_path / "other", seed=7)
    with pytest.raises(SystemExit, match="not"):  # an artifact of another model is refused
        main(["--teacher", str(other), "--artifact", str(artifact), "--out", str(tmp_path / "x"), "--layers", "0"])


def test_encoder_agreement_of_an_artifact_with_itself_is_total(tiny_artifact, tmp_path):
    """benchmarks.encoder_agreement: an artifact against itself agrees everywhere (every mode it serves and the
    Recommend anchors); two empty lists count as agreement."""
    from benchmarks.encoder_agreement import _overlap, main

    assert _overlap([], []) == 1.0 and _overlap(["a", "b"], []) == 0.0 and _overlap(["a", "b"], ["b", "c"]) == 0.5
    items = [json.loads(line) for line in (tiny_artifact / "items.jsonl").open()]
    queries = tmp_path / "q.txt"
    queries.write_text("# a comment\n" + "\n".join(" ".join(it["title"].split()[:2]) for it in items[:12]) + "\nzzqx\n")
    out = tmp_path / "a.json"
    assert main(["--artifact", str(tiny_artifact), "--other", str(tiny_artifact), "--queries", str(queries),
                 "--k", "5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows["queries"] == 13 and "recommend anchors" in rows["modes"] and "dense" in rows["modes"]
    assert all(r["overlap"] == 1.0 and r["top1"] == 1.0 for r in rows["modes"].values())

"""benchmarks.query_adapter on the session's tiny artifact: an adapter starts as the served model (its epoch-0 dev
NDCG@10 is the served query vectors' exact-cosine NDCG, computed here independently, for both kinds) and training
lowers the full-catalog loss."""

from __future__ import annotations

import json

import numpy as np
from conftest import write_judgments

from bundlerec_export import evaluation as ev


def _served_dev_ndcg(artifact, judgments) -> float:
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    engine = Engine(artifact, Settings(artifact=artifact, provider="cpu"))
    ids, items = engine.catalog.ids, np.asarray(engine.embeddings)
    scores = []
    for norm, (written, judged) in ev.by_normalized_query(ev.read_judgments(judgments)).items():
        if ev.split_of(norm) != "dev":
            continue
        sims = items @ engine.encoder.encode([written])[0]
        top = sorted(range(len(ids)), key=lambda r: -sims[r])[:10]
        if (v := ev.ndcg_at_k([ids[r] for r in top], judged)) is not None:
            scores.append(v)
    assert scores, "the tiny judgments have dev queries"
    return float(np.mean(scores))


def test_adapter_starts_as_the_served_model_and_training_lowers_its_loss(tiny_artifact, tmp_path):
    from benchmarks.query_adapter import main

    items = [json.loads(line) for line in (tiny_artifact / "items.jsonl").open()]
    judgments = write_judgments(items, tmp_path / "j.csv")
    expected = round(_served_dev_ndcg(tiny_artifact, judgments), 4)
    for kind in ("linear", "mlp"):
        out = tmp_path / f"{kind}.json"
        assert main(["--artifact", str(tiny_artifact), "--judgments", str(judgments), "--kind", kind, "--hidden", "32",
                     "--epochs", "3", "--lr", "3e-3", "--json", str(out), "--plot", str(tmp_path / f"{kind}.png")]) == 0
        curve = json.loads(out.read_text())["curve"]
        assert curve[0]["dev_ndcg@10"] == expected, kind
        assert curve[-1]["loss"] < curve[1]["loss"], kind
        assert (tmp_path / f"{kind}.png").stat().st_size > 0

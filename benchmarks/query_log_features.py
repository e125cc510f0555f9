"""Query-log ("engagement") features for the learned ranker on Home Depot: measured, and rejected as a leak.

A deployed search has logs: products engaged with for earlier, similar queries. The Home Depot judgments of the
TRAIN split can play that log: for a query, its ``K`` most similar training queries (cosine of the served
encoder's query vectors; the query itself left out) and the products they judged, with their relevance. The
features per candidate: the best and the summed ``similarity x gain`` of those neighbours, and the query's best
neighbour similarity. This script measures what they do to the dev NDCG@10 of the ranker (same candidates, grid and
early stopping as ``bundlerec_export.train_ranker``), how the evidence relates to the labels, and the same model
with the evidence constrained to raise a score only (LightGBM ``monotone_constraints``).

    python -m benchmarks.query_log_features --artifact artifacts/homedepot \
        --judgments ../shared/data/homedepot/judgments.csv --json docs/results/query-log-features.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit

logger = logging.getLogger(__name__)

NAMES = ("log_max_sim_gain", "log_sum_sim_gain", "log_top_sim")


def neighbour_evidence(train_vecs: np.ndarray, memory: Any, vec: np.ndarray, rows: np.ndarray, k: int,
                       leave_out: int = -1) -> np.ndarray:
    """(len(rows), 3): max and sum over the ``k`` nearest training queries of similarity x gain / 2 of each row,
    and the best neighbour's similarity (a query-level column)."""
    sims = train_vecs @ vec
    if leave_out >= 0:
        sims[leave_out] = -np.inf
    nb = np.argpartition(-sims, k)[:k]
    s = np.maximum(sims[nb], 0.0)[:, None]
    gain = memory[nb][:, rows].toarray() / 2.0  # k x rows, the evaluation's gain relevance - 1, halved to [0, 1]
    out = np.zeros((len(rows), 3))
    out[:, 0] = (s * gain).max(0)
    out[:, 1] = (s * gain).sum(0)
    out[:, 2] = float(s.max())
    return out


def main(argv: list[str] | None = None) -> int:
    import lightgbm as lgb
    import scipy.sparse as sp

    from bundlerec_export.evaluation import aggregate, query_metrics, read_judgments, split_of
    from bundlerec_export.train_ranker import EARLY_STOP, GRID, LABEL_SCALE, MAX_ROUNDS, collect
    from bundlerec_export.tune import engine_for

    p = argparse.ArgumentParser(prog="python -m benchmarks.query_log_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--neighbours", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = engine_for(args.artifact)
    judged = read_judgments(args.judgments)
    split = {q: split_of(q) for q in judged}
    sets = {s: collect(engine, judged, sorted(q for q in judged if split[q] == s)) for s in ("train", "dev")}
    vecs = {s: np.stack([engine.encoder.encode([q])[0] for q in sets[s].queries]) for s in sets}
    row_of = {item: i for i, item in enumerate(engine.catalog.ids)}
    r, c, v = [], [], []
    for i, q in enumerate(sets["train"].queries):
        for item, rel in judged[q].items():
            r.append(i), c.append(row_of[item]), v.append(rel - 1.0)
    memory = sp.csr_matrix((v, (r, c)), shape=(len(sets["train"].queries), len(row_of)), dtype=np.float32)
    extra = {s: [neighbour_evidence(vecs["train"], memory, vecs[s][i], rows, args.neighbours,
                                    i if s == "train" else -1) for i, rows in enumerate(sets[s].rows)] for s in sets}

    def data(s: str, with_log: bool) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[int]]:
        xs = [np.hstack([x, e]) if with_log else x for x, e in zip(sets[s].x, extra[s], strict=True)]
        keep = [i for i, y in enumerate(sets[s].labels) if y.any()]
        return (xs, np.concatenate([xs[i] for i in keep]), np.concatenate([sets[s].labels[i] for i in keep]),
                [len(sets[s].labels[i]) for i in keep])

    def fit(with_log: bool, monotone: bool) -> dict[str, Any]:
        _, x_tr, y_tr, g_tr = data("train", with_log)
        xs_dev, x_dev, y_dev, g_dev = data("dev", with_log)
        best: dict[str, Any] = {}
        for leaves, lr, min_leaf in GRID:
            params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10],
                      "label_gain": [i / LABEL_SCALE for i in range(2 * LABEL_SCALE + 1)], "num_leaves": leaves,
                      "learning_rate": lr, "min_data_in_leaf": min_leaf, "feature_fraction": 0.9, "bagging_fraction": 0.8,
                      "bagging_freq": 1, "lambdarank_truncation_level": 20, "seed": 0, "deterministic": True,
                      "num_threads": 2, "verbose": -1}
            if monotone:  # the evidence may only raise a score; the query-level column is free
                params["monotone_constraints"] = [0] * (x_tr.shape[1] - 3) + [1, 1, 0]
                params["monotone_constraints_method"] = "advanced"
            b = lgb.train(params, lgb.Dataset(x_tr, y_tr, group=g_tr), MAX_ROUNDS,
                          valid_sets=[lgb.Dataset(x_dev, y_dev, group=g_dev)],
                          callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)])
            per = []
            for q, x, rows in zip(sets["dev"].queries, xs_dev, sets["dev"].rows, strict=True):
                order = np.argsort(-b.predict(x, num_iteration=b.best_iteration), kind="stable")[:10]
                per.append(query_metrics([engine.catalog.ids[rows[j]] for j in order], judged[q], 10))
            m = {key: round(val, 4) for key, val in aggregate(per).items() if key in ("ndcg", "recall", "mrr")}
            if not best or m["ndcg"] > best["ndcg"]:
                best = {**m, "num_leaves": leaves, "rounds": b.best_iteration}
        return best

    label = {s: np.concatenate(sets[s].labels) > 0 for s in sets}
    evidence = {s: np.concatenate(extra[s])[:, 0] > 0 for s in sets}
    report: dict[str, Any] = {
        "neighbours": args.neighbours,
        "evidence_vs_label": {s: {
            "p_evidence_given_relevant": round(float(evidence[s][label[s]].mean()), 4),
            "p_evidence_given_other_candidate": round(float(evidence[s][~label[s]].mean()), 4),
            "p_relevant_given_evidence": round(float(label[s][evidence[s]].mean()), 4),
            "p_relevant_given_no_evidence": round(float(label[s][~evidence[s]].mean()), 4)} for s in sets},
        "dev": {"ranker": fit(False, False), "ranker + log features": fit(True, False),
                "ranker + log features, monotone": fit(True, True)},
    }
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

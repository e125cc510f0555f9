"""Trains the learned hybrid ranker (LightGBM LambdaRank) of an artifact on relevance judgments.

Candidates are generated exactly as served: the artifact's own engine (encoder graph, HNSW, BM25) retrieves the
dense and lexical top-``pool`` of each query, and :mod:`bundlerec_server.ranking_features` computes the features
of their union. Labels: graded relevance (``label = round((relevance - 1) x 12)``, LightGBM gain ``label / 12``,
i.e. the evaluation's gain relevance - 1; unjudged candidates gain 0). Trained on the TRAIN split of
``evaluation.split_of``, early-stopped and chosen on DEV (a small grid), never looking at TEST. The model is
written to ``ranker/model.txt``; ``manifest["ranker"]`` records the feature list, the parameters and the dev
figures (NDCG/Recall/MRR@10 of the model and of the artifact's ``scores`` fusion on the same candidates).

The build runs it as a stage when judgments exist (``--no-ranker`` skips it); this command adds a ranker to an
existing artifact and re-tunes its serving choice on dev (the ranker becomes the hybrid default only if it wins):

    python -m bundlerec_export.train_ranker --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .evaluation import aggregate, query_metrics, read_judgments, split_of
from .offline import ensure_offline

if TYPE_CHECKING:
    from bundlerec_server.engine import Engine

logger = logging.getLogger(__name__)

LABEL_SCALE = 12  # thirds and quarters of Home Depot's 1-3 scale map to integers
POOL = 64  # the server's default anchor_pool: Search(k <= 64) retrieves 64 candidates per list
GRID = (  # (num_leaves, learning_rate, min_data_in_leaf); chosen on dev; small trees keep serving cheap
    (15, 0.1, 50),
    (31, 0.1, 100),
)
MAX_ROUNDS = 300
EARLY_STOP = 30


@dataclass
class QuerySet:
    """Feature matrices, labels and candidate rows of one split's queries."""

    queries: list[str] = field(default_factory=list)
    x: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    baseline: list[list[int]] = field(default_factory=list)  # the scores fusion's top 10 rows

    def stacked(self, only_judged: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
        keep = [i for i, y in enumerate(self.labels) if not only_judged or y.any()]
        return (np.concatenate([self.x[i] for i in keep]), np.concatenate([self.labels[i] for i in keep]),
                [len(self.labels[i]) for i in keep])


def label_of(relevance: float) -> int:
    return max(0, round((float(relevance) - 1.0) * LABEL_SCALE))


def collect(engine: Engine, judged: dict[str, dict[str, float]], queries: Iterable[str], pool: int = POOL,
            k: int = 10) -> QuerySet:
    """Candidates of each query through ``engine`` (as served), their features and labels."""
    from bundlerec_server.domain import Filters
    from bundlerec_server.fusion import Fusion
    from bundlerec_server.ranking_features import TitleFeatures, feature_matrix

    if engine.lexical is None:
        raise ValueError(f"{engine.root}: no lexical index, no hybrid candidates to rank")
    titles = engine.ranker.titles if engine.ranker is not None else TitleFeatures(engine.catalog.titles)
    ids = engine.catalog.ids
    scores = engine.fusion if engine.fusion.method == "scores" else Fusion("scores", alpha=0.6, coverage=0.5)
    out = QuerySet()
    for i, q in enumerate(queries):
        if i and i % 1000 == 0:
            logger.info("ranker candidates: %d queries", i)
        vec = engine.encoder.encode([q])[0]
        dense, lexical = engine.dense(vec, pool, Filters()), engine.lexical_hits(q, pool, Filters())
        cands = engine.candidates(vec, q, dense, lexical)
        x = feature_matrix(titles, engine.lexical, q, cands, _rows(dense), _rows(lexical))
        out.queries.append(q)
        out.x.append(x)
        out.labels.append(np.array([label_of(judged[q].get(ids[r], 1.0)) for r in cands.rows.tolist()], dtype=np.int32))
        out.rows.append(cands.rows)
        out.baseline.append([h.row for h in engine.fuse(vec, q, dense, lexical, scores, k)])
    return out


def _rows(hits: list[Any]) -> np.ndarray:
    return np.fromiter((h.row for h in hits), dtype=np.int64, count=len(hits))


def evaluate(engine: Engine, qs: QuerySet, judged: dict[str, dict[str, float]], predict: Any, k: int = 10) -> dict[str, Any]:
    """NDCG/Recall/MRR@k (evaluation conventions) of the model's order of each query's candidates."""
    from bundlerec_server.fusion import top_hits

    ids = engine.catalog.ids
    per_query = []
    for q, x, rows in zip(qs.queries, qs.x, qs.rows, strict=True):
        hits = top_hits(rows, np.asarray(predict(x), dtype=np.float64), k) if len(rows) else []
        per_query.append(query_metrics([ids[h.row] for h in hits], judged[q], k))
    return aggregate(per_query)


def _baseline(engine: Engine, qs: QuerySet, judged: dict[str, dict[str, float]], k: int = 10) -> dict[str, Any]:
    ids = engine.catalog.ids
    return aggregate(query_metrics([ids[r] for r in top], judged[q], k) for q, top in zip(qs.queries, qs.baseline, strict=True))


def _hash(query: str) -> str:
    import hashlib

    return hashlib.blake2b(query.encode("utf-8"), digest_size=8).hexdigest()


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in d.items()}


def train(engine: Engine, judgments: Path, pool: int = POOL, seed: int = 0,
          max_train_queries: int = 0) -> tuple[str, dict[str, Any]]:
    """(model text, the manifest's ``ranker`` entry without ``file``) trained on ``engine``'s artifact; with
    ``max_train_queries``, on that many training queries (a deterministic sample: the first by hash)."""
    import lightgbm as lgb

    from bundlerec_server.ranking_features import FEATURES

    t0 = time.perf_counter()
    judged = read_judgments(judgments)
    split = {q: split_of(q) for q in judged}
    train_queries = sorted(q for q in judged if split[q] == "train")
    if max_train_queries:
        train_queries = sorted(train_queries, key=_hash)[:max_train_queries]
    train_set = collect(engine, judged, train_queries, pool)
    dev_set = collect(engine, judged, sorted(q for q in judged if split[q] == "dev"), pool)
    t_collect = time.perf_counter() - t0
    x_tr, y_tr, g_tr = train_set.stacked(only_judged=True)
    x_dev, y_dev, g_dev = dev_set.stacked(only_judged=True)
    gains = [i / LABEL_SCALE for i in range(2 * LABEL_SCALE + 1)]
    best: tuple[float, str, dict[str, Any], dict[str, Any]] | None = None
    tried = []
    for leaves, lr, min_leaf in GRID:
        params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "label_gain": gains,
                  "num_leaves": leaves, "learning_rate": lr, "min_data_in_leaf": min_leaf, "feature_fraction": 0.9,
                  "bagging_fraction": 0.8, "bagging_freq": 1, "lambdarank_truncation_level": 20, "seed": seed,
                  "deterministic": True, "num_threads": 2, "verbose": -1}
        booster = lgb.train(params, lgb.Dataset(x_tr, y_tr, group=g_tr, feature_name=list(FEATURES)), MAX_ROUNDS,
                            valid_sets=[lgb.Dataset(x_dev, y_dev, group=g_dev)],
                            callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)])
        it = booster.best_iteration or MAX_ROUNDS
        dev = evaluate(engine, dev_set, judged, lambda x, b=booster, n=it: b.predict(x, num_iteration=n, num_threads=1))
        tried.append({"num_leaves": leaves, "learning_rate": lr, "min_data_in_leaf": min_leaf, "best_iteration": it,
                      "dev_ndcg": round(dev["ndcg"] or 0.0, 4)})
        logger.info("ranker num_leaves=%d lr=%.2f: %d rounds, dev NDCG@10 %.4f", leaves, lr, it, dev["ndcg"] or 0.0)
        if best is None or (dev["ndcg"] or 0.0) > best[0]:
            best = (dev["ndcg"] or 0.0, booster.model_to_string(num_iteration=it), dev, {**params, "best_iteration": it})
    assert best is not None
    _, text, dev, params = best
    booster = lgb.Booster(model_str=text)
    importance = dict(zip(FEATURES, booster.feature_importance("gain").round(1).tolist(), strict=True))
    entry: dict[str, Any] = {
        "features": list(FEATURES),
        "objective": "lambdarank",
        "pool": pool,
        "labels": f"round((relevance - 1) x {LABEL_SCALE}), gain label / {LABEL_SCALE}",
        "params": {key: params[key] for key in ("num_leaves", "learning_rate", "min_data_in_leaf", "best_iteration")},
        "grid": tried,
        "trained_on": {"judgments": str(judgments), "split": "train", "queries": len(train_set.queries),
                       "queries_with_judged_candidates": len(g_tr), "pairs": int(len(y_tr)), "early_stopped_on": "dev"},
        "dev": {"queries": len(dev_set.queries), "learned": _round(dev), "scores_fusion": _round(_baseline(engine, dev_set, judged))},
        "feature_gain": importance,
        "seconds": {"candidates": round(t_collect, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    logger.info("ranker: dev NDCG@10 %.4f (scores fusion %.4f) on %d queries", dev["ndcg"] or 0.0,
                entry["dev"]["scores_fusion"]["ndcg"] or 0.0, len(dev_set.queries))
    return text, entry


def ranker_part(root: Path, engine: Engine, judgments: Path, pool: int = POOL,
                max_train_queries: int = 0) -> dict[str, Any]:
    """Trains on ``engine`` and writes ``root/ranker/model.txt``; returns the manifest part ``{"ranker": ...}``."""
    from bundlerec_server.learned_ranker import RANKER_MODEL

    text, entry = train(engine, judgments, pool, max_train_queries=max_train_queries)
    path = Path(root) / RANKER_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"ranker": {"file": RANKER_MODEL, **entry}}


def add_ranker(artifact: Path, judgments: Path, pool: int = POOL, retune: bool = True,
               max_train_queries: int = 0) -> dict[str, Any]:
    """Trains a ranker for an existing artifact, rewrites its manifest (checksums included) and, with
    ``retune``, re-chooses the serving configuration on dev with the learned fusion among the candidates."""
    from bundlerec_server import artifact as A

    from .tune import engine_for, tune_serving

    manifest = A.read_manifest(artifact, verify=False)
    part = ranker_part(artifact, engine_for(artifact), judgments, pool, max_train_queries)
    manifest.update(part)
    _write(artifact, manifest)
    if retune:
        tune_serving(artifact, judgments)
    return part["ranker"]


def _write(artifact: Path, manifest: dict[str, Any]) -> None:
    from bundlerec_server import artifact as A

    manifest = dict(manifest)
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    A.write_manifest(artifact, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.train_ranker", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--pool", type=int, default=POOL, help="candidates per list (the server's anchor_pool)")
    p.add_argument("--max-train-queries", type=int, default=0, help="train on this many training queries (0: all)")
    p.add_argument("--no-retune", action="store_true", help="keep the artifact's serving choice as it is")
    args = p.parse_args(argv)
    ensure_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    entry = add_ranker(args.artifact, args.judgments, args.pool, retune=not args.no_retune,
                       max_train_queries=args.max_train_queries)
    print(json.dumps({k: entry[k] for k in ("params", "trained_on", "dev", "feature_gain")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving cost of the learned hybrid ranker: features + model over one query's candidates, in-process.

    python -m benchmarks.ranker_cost --artifact runs/hd-zeroshot --judgments ../shared/data/homedepot/judgments.csv \
        [--queries 300] [--repeat 3] [--json runs/ranker_cost.json]

For dev queries (``evaluation.split_of``), the dense and lexical lists are retrieved once (the server's
``anchor_pool``); then, timed, per query: the ``scores`` fusion (exact cosine + BM25 + coverage of the union),
the ``learned`` fusion as served (the same candidates, the features, the LightGBM model over the scores fusion's
best ``SCORED_CANDIDATES``), and the model over every candidate (the previous serving path). Reports the
median / p90 / p99 milliseconds of each and of their difference, the candidates per query, and the load average
(the machine is shared: compare figures taken under similar load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import emit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ranker_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from bundlerec_export.evaluation import read_judgments, split_of
    from bundlerec_server.domain import Filters
    from bundlerec_server.engine import Engine
    from bundlerec_server.fusion import Fusion
    from bundlerec_server.learned_ranker import SCORED_CANDIDATES
    from bundlerec_server.settings import Settings

    engine = Engine(args.artifact, Settings(artifact=args.artifact, provider="cpu", intra_op_threads=1))
    if engine.ranker is None:
        print(f"{args.artifact}: no learned ranker", file=sys.stderr)
        return 2
    queries = sorted(q for q in read_judgments(args.judgments) if split_of(q) == "dev")[: args.queries]
    pool = engine.settings.anchor_pool
    lists = []
    for q in queries:
        vec = engine.encoder.encode([q])[0]
        lists.append((q, vec, engine.dense(vec, pool, Filters()), engine.lexical_hits(q, pool, Filters())))
    learned = Fusion("learned", alpha=engine.fusion.alpha, coverage=engine.fusion.coverage)
    scores = Fusion("scores", alpha=engine.fusion.alpha, coverage=engine.fusion.coverage)
    ranker, lex = engine.ranker, engine.lexical
    for q, vec, dense, lexical in lists[:20]:  # warm caches (query parsing is cached per query, as in the server)
        engine.fuse(vec, q, dense, lexical, learned, 10)
    t_scores, t_learned, t_all, n_cands = [], [], [], []
    for _ in range(args.repeat):
        for q, vec, dense, lexical in lists:
            t0 = time.perf_counter()
            engine.fuse(vec, q, dense, lexical, scores, 10)
            t1 = time.perf_counter()
            engine.fuse(vec, q, dense, lexical, learned, 10)
            t2 = time.perf_counter()
            ranker.rank(lex, q, engine.candidates(vec, q, dense, lexical), dense, lexical, 10)  # no prefilter
            t3 = time.perf_counter()
            t_scores.append((t1 - t0) * 1e3)
            t_learned.append((t2 - t1) * 1e3)
            t_all.append((t3 - t2) * 1e3)
            n_cands.append(len({h.row for h in (*dense, *lexical)}))
    a, b, every = np.array(t_scores), np.array(t_learned), np.array(t_all)
    diff = b - a

    def pct(x: np.ndarray) -> dict[str, float]:
        return {f"p{q}": round(float(np.percentile(x, q)), 4) for q in (50, 90, 99)} | {"mean": round(float(x.mean()), 4)}

    out = {"artifact": str(args.artifact), "queries": len(lists), "repeat": args.repeat, "pool": pool,
           "candidates": {"mean": round(float(np.mean(n_cands)), 1), "max": int(np.max(n_cands))},
           "scores_fusion_ms": pct(a), "learned_fusion_ms": pct(b), "learned_extra_ms": pct(diff),
           "learned_all_candidates_ms": pct(every), "learned_all_candidates_extra_ms": pct(every - a),
           "scored_candidates": SCORED_CANDIDATES,
           "learned_extra_ms_per_100_candidates": round(float(np.median(diff / np.array(n_cands) * 100)), 4),
           "loadavg": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

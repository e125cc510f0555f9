"""Paired comparison of two artifacts' served Search rankings: per-query NDCG@10 in process (the server's own
engine with its default settings), the difference and the ratio with 95 % paired-bootstrap intervals.

    python -m benchmarks.paired_ndcg --new artifacts/homedepot --old runs/hd-old \
        --judgments ../shared/data/homedepot/judgments.csv --split test --json docs/results/ranker-idf-trigram-paired.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.report import emit

BM25_TEST = 0.3553  # plain BM25 on the Home Depot test split (the reference)


def per_query(artifact: Path, queries: list[str], judged: dict[str, dict[str, float]]) -> list[float | None]:
    from bundlerec_export.evaluation import ndcg_at_k
    from bundlerec_server.domain import SearchQuery
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    engine = Engine(artifact, Settings(artifact=artifact, provider="cpu"))
    out = []
    for q in queries:
        hits = engine.search(SearchQuery(q, 10), engine.encoder.encode([q])[0])
        out.append(ndcg_at_k([engine.catalog.ids[h.row] for h in hits], judged[q], 10))
    return out


def main(argv: list[str] | None = None) -> int:
    from bundlerec_export.evaluation import read_judgments, split_of

    p = argparse.ArgumentParser(prog="python -m benchmarks.paired_ndcg", description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    judged = read_judgments(args.judgments)
    queries = sorted(q for q in judged if split_of(q) == args.split)
    new, old = per_query(args.new, queries, judged), per_query(args.old, queries, judged)
    keep = [i for i, v in enumerate(new) if v is not None]  # queries with a relevant product (as make eval)
    n, o = (np.array([float(x[i] or 0.0) for i in keep]) for x in (new, old))
    idx = np.random.default_rng(0).integers(0, len(n), (10_000, len(n)))

    def ci(v: np.ndarray) -> list[float]:
        return [round(float(x), 4) for x in np.percentile(v, [2.5, 97.5])]

    report = {"split": args.split, "queries": len(n), "new": str(args.new), "old": str(args.old),
              "ndcg_new": round(float(n.mean()), 4), "ndcg_old": round(float(o.mean()), 4),
              "difference": round(float(n.mean() - o.mean()), 4), "difference_95ci": ci(n[idx].mean(1) - o[idx].mean(1)),
              "ratio": round(float(n.mean() / o.mean()), 4), "ratio_95ci": ci(n[idx].mean(1) / o[idx].mean(1)),
              "bootstrap": "10,000 paired resamples of the queries, seed 0"}
    if args.split == "test":
        report |= {"new_x_bm25": round(float(n.mean()) / BM25_TEST, 4), "new_x_bm25_95ci": ci(n[idx].mean(1) / BM25_TEST)}
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

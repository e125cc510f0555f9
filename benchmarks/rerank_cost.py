"""Serving cost of the cross-encoder re-ranking stage, in-process: one re-rank of a query's served top N.

    python -m benchmarks.rerank_cost --artifact artifacts/hd0 --judgments ../shared/data/homedepot/judgments.csv \
        [--queries 200] [--depth 20 --depth 30 --depth 50] [--threads 1] [--json runs/rerank_cost.json]

For dev queries (``evaluation.split_of``), the served top ``max(depth)`` is retrieved once (timed too: the
retrieval a Search does before the stage); then, per depth and query, the re-rank of the top ``depth`` (pair
tokenisation + the int8 per-token ONNX graph + the reorder) is timed in wall-clock and in thread CPU time, the
depths interleaved query by query. Reports median / p90 / p99 milliseconds and the load average (the machine is
shared: CPU time is the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import emit


def pct(x: list[float]) -> dict[str, float]:
    a = np.asarray(x)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)} | {"mean": round(float(a.mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerank_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--depth", type=int, action="append")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (the server's --intra-op-threads)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    depths = sorted(set(args.depth or [20, 30, 50]))

    from bundlerec_export.evaluation import read_judgments, split_of
    from bundlerec_server.domain import SearchQuery
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    engine = Engine(args.artifact, Settings(artifact=args.artifact, provider="cpu", intra_op_threads=args.threads,
                                            rerank="on"))
    reranker = engine.reranker
    assert reranker is not None
    reranker.warmup()
    queries = sorted(q for q in read_judgments(args.judgments) if split_of(q) == "dev")[: args.queries]
    load_before = os.getloadavg()
    lists, t_retrieve = [], []
    for q in queries:
        t0 = time.perf_counter()
        vec = engine.encoder.encode([q])[0]
        lists.append((q, engine.search(SearchQuery(q, k=max(depths)), vec)))
        t_retrieve.append((time.perf_counter() - t0) * 1e3)
    wall: dict[int, list[float]] = {d: [] for d in depths}
    cpu: dict[int, list[float]] = {d: [] for d in depths}
    tokens: list[int] = []
    for q, hits in lists:
        for d in depths:
            reranker.depth = d
            w0, c0 = time.perf_counter(), time.thread_time()
            reranker.rerank(q, hits)
            cpu[d].append((time.thread_time() - c0) * 1e3)
            wall[d].append((time.perf_counter() - w0) * 1e3)
        tokens.append(int(reranker.model.tokenize(q, [engine.catalog.titles[h.row] for h in hits[:30]])["attention_mask"].sum(1).mean()))
    out = {"artifact": str(args.artifact), "queries": len(lists), "threads": args.threads,
           "max_length": reranker.model.max_length, "graph": reranker.model.model_path.name,
           "tokens_per_pair_mean": round(float(np.mean(tokens)), 1),
           "retrieval_ms (encode + served search)": pct(t_retrieve),
           "rerank_wall_ms": {str(d): pct(wall[d]) for d in depths},
           "rerank_cpu_ms": {str(d): pct(cpu[d]) for d in depths},
           "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "cpus": os.cpu_count()}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

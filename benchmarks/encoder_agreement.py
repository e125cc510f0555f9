"""How much a different encoder (e.g. a shallower student) changes what is served, on a catalog without judgments.

    python -m benchmarks.encoder_agreement --artifact artifacts/demo --other runs/demo-l3 \\
        [--queries benchmarks/queries/instacart.txt] [--k 10] [--json OUT.json]

Both artifacts must hold the same catalog (item ids in the same rows). For every query, in process, each
artifact's own engine (its encoder, index and served settings) gives its top ``k`` in every retrieval mode it
serves, and its Recommend anchors; printed per mode: the mean share of the first artifact's top ``k`` that the
second also returns (overlap@k; two empty lists agree) and how often the top 1 agrees, with 95 % bootstrap intervals over queries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bundlerec_server.domain import Filters, RecommendQuery, SearchQuery
from bundlerec_server.engine import Engine
from bundlerec_server.settings import Settings


def _ci(values: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _overlap(x: list[str], y: list[str]) -> float:
    """Shared share of two top-k lists (1.0 when both are empty: a query neither artifact matches)."""
    return len(set(x) & set(y)) / max(len(x), len(y)) if x or y else 1.0


def _lists(e: Engine, queries: list[str], k: int) -> dict[str, list[list[str]]]:
    ids = e.catalog.ids
    vecs = [e.encoder.encode([q])[0] for q in queries]
    out: dict[str, list[list[str]]] = {}
    for mode in e.modes:
        out[mode.value] = [[ids[h.row] for h in e.search(SearchQuery(query=q, k=k, filters=Filters(), mode=mode), v)]
                           for q, v in zip(queries, vecs, strict=True)]
    rq = [RecommendQuery(query=q, user_id="", recent_item_ids=(), max_bundles=k, items_per_bundle=1,
                         filters=Filters(), mode=None) for q in queries]
    out["recommend anchors"] = [[ids[h.row] for h in e.anchors(r, v, e.allow(r.filters))][:k]
                                for r, v in zip(rq, vecs, strict=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True, help="the reference (e.g. the 6-layer encoder)")
    p.add_argument("--other", type=Path, required=True, help="the artifact compared with it")
    p.add_argument("--queries", type=Path, default=Path("benchmarks/queries/instacart.txt"))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    queries = [line.strip() for line in args.queries.open() if line.strip() and not line.startswith("#")]
    engines = [Engine(a.resolve(), Settings(artifact=a)) for a in (args.artifact, args.other)]
    if engines[0].catalog.ids != engines[1].catalog.ids:
        raise SystemExit("the two artifacts do not hold the same catalog in the same order")
    a, b = (_lists(e, queries, args.k) for e in engines)
    rows = {}
    print(f"{len(queries)} queries, k={args.k}: {args.other} against {args.artifact}")
    for name in a:
        if name not in b:
            continue
        pairs = list(zip(a[name], b[name], strict=True))
        overlap = np.array([_overlap(x, y) for x, y in pairs])
        top1 = np.array([float(x[:1] == y[:1]) for x, y in pairs])  # two empty lists agree
        rows[name] = {"overlap": float(overlap.mean()), "overlap_ci95": _ci(overlap),
                      "top1": float(top1.mean()), "top1_ci95": _ci(top1)}
        lo, hi = rows[name]["overlap_ci95"]
        print(f"  {name:18s} overlap@{args.k} {overlap.mean():.3f} [{lo:.3f}, {hi:.3f}]   top-1 same {top1.mean():.3f}")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "other": str(args.other), "k": args.k,
                                         "queries": len(queries), "modes": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much of NDCG@10 on Home Depot is lost to products nobody judged: each served ranking scored as usual
(unjudged = gain 0) and on condensed lists (the unjudged products of its top 50 removed before cutting at 10;
Sakai 2007), with the number of unjudged products in its top 10 and an oracle order of the hybrid candidates.
In process, the artifact's engine with the server's defaults; 95 % paired-bootstrap intervals of each ratio
to BM25 as served (the lexical channel: spelling-corrected, so stronger than the issue's plain-BM25 reference).
Descriptive only: nothing is chosen from it.

    python -m benchmarks.judged_only --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv \
        --split test --json docs/results/judged-only-test.json --plot docs/img/judged-only-test.png
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from benchmarks.report import emit

if TYPE_CHECKING:
    from bundlerec_server.engine import Engine

DEPTH = 50  # the learned ranker's scored candidates: every run is cut there


def condensed(ranked: list[str], judged: dict[str, float]) -> list[str]:
    """``ranked`` without the products that were not judged for the query."""
    return [p for p in ranked if p in judged]


def runs(engine: Engine) -> dict[str, Callable[[str, np.ndarray], list[int]]]:
    """Each ranking's top ``DEPTH`` rows for (query, vector), as served: BM25, dense, the ``scores`` fusion, the
    served hybrid."""
    from bundlerec_server.domain import Filters, Hit
    from bundlerec_server.fusion import Fusion

    e = engine
    pool = max(DEPTH, e.settings.anchor_pool)
    scores = Fusion("scores", alpha=e.fusion.alpha, coverage=e.fusion.coverage)

    def rows(hits: list[Hit]) -> list[int]:
        return [h.row for h in hits]

    def fused(q: str, v: np.ndarray, fusion: Fusion) -> list[int]:
        dense, lexical = e.dense(v, pool, Filters()), e.lexical_hits(q, pool, Filters())
        return rows(e.fuse(v, q, dense, lexical, fusion, DEPTH))

    return {
        "bm25": lambda q, v: rows(e.lexical_hits(q, DEPTH, Filters())),  # spelling-corrected, as served
        "dense": lambda q, v: rows(e.dense(v, DEPTH, Filters(), beam=e.dense_beam)),  # dense mode's beam, as served
        "scores_fusion": lambda q, v: fused(q, v, scores),
        f"served_{e.fusion.method}": lambda q, v: fused(q, v, e.fusion),
    }


def main(argv: list[str] | None = None) -> int:
    from bundlerec_export.evaluation import ndcg_at_k, read_judgments, split_of
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    p = argparse.ArgumentParser(prog="python -m benchmarks.judged_only", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--split", default="dev", choices=("dev", "test"))
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    judged = read_judgments(args.judgments)
    engine = Engine(args.artifact, Settings(artifact=args.artifact, provider="cpu"))
    ids = engine.catalog.ids
    todo = runs(engine)
    queries = sorted(q for q in judged if split_of(q) == args.split)
    std: dict[str, list[float]] = {name: [] for name in todo}
    cond: dict[str, list[float]] = {name: [] for name in todo}
    unjudged: dict[str, list[int]] = {name: [] for name in todo}
    for q in tqdm(queries, desc=f"{args.split} queries"):
        if ndcg_at_k(list(judged[q]), judged[q], 10) is None:
            continue  # no relevant product: NDCG undefined (as in make eval)
        vec = engine.encoder.encode([q])[0]
        for name, run in todo.items():
            ranked = [ids[r] for r in run(q, vec)]
            std[name].append(ndcg_at_k(ranked[:10], judged[q], 10) or 0.0)
            cond[name].append(ndcg_at_k(condensed(ranked, judged[q])[:10], judged[q], 10) or 0.0)
            unjudged[name].append(sum(p not in judged[q] for p in ranked[:10]))
    n = len(std["bm25"])
    idx = np.random.default_rng(0).integers(0, n, (10_000, n))

    def ratio(values: dict[str, list[float]], name: str) -> dict[str, object]:
        a, b = np.array(values[name]), np.array(values["bm25"])
        boot = a[idx].mean(1) / b[idx].mean(1)
        return {"mean": round(float(a.mean()), 4), "x_bm25": round(float(a.mean() / b.mean()), 4),
                "x_bm25_95ci": [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])]}

    report = {
        "split": args.split, "queries": n, "depth": DEPTH, "artifact": str(args.artifact),
        "runs": {name: {"ndcg10": ratio(std, name), "condensed_ndcg10": ratio(cond, name),
                        "unjudged_in_top10": round(float(np.mean(unjudged[name])), 2)} for name in todo},
        "bootstrap": "10,000 paired resamples of the queries, seed 0",
    }
    emit(report, args.json)
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (metric, label) in enumerate((("ndcg10", "NDCG@10 (unjudged = 0)"), ("condensed_ndcg10", "condensed NDCG@10 (unjudged removed)"))):
        means = [report["runs"][m][metric]["mean"] for m in names]
        bm25 = report["runs"]["bm25"][metric]["mean"]
        err = np.array([[means[j] - bm25 * report["runs"][m][metric]["x_bm25_95ci"][0],
                         bm25 * report["runs"][m][metric]["x_bm25_95ci"][1] - means[j]] for j, m in enumerate(names)]).T
        ax.bar(np.arange(len(names)) + (i - 0.5) * 0.38, means, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("mean over queries")
    ax.set_title(f"Home Depot {report['split']} ({report['queries']} queries): what unjudged products cost")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())

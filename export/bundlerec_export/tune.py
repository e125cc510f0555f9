"""Chooses the served retrieval configuration on the DEV split of relevance judgments.

Runs the artifact's own serving engine in-process (the same encoder graph, HNSW index and BM25 index the
server will use) over the dev queries, scores dense, lexical, reciprocal rank fusion and a grid of linear
blends by NDCG@10, and records the winner in ``manifest["serving"]`` (``default_retrieval_mode`` and
``fusion``), which the server applies. The test split is never looked at here.

    python -m bundlerec_export.tune --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BLEND_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RRF_KS = (20, 60)
SCORE_ALPHAS = (0.5, 0.6, 0.7, 0.8)
COVERAGE_WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5)
POOL = 100


def tune_serving(artifact: Path, judgments: Path, split: str = "dev", k: int = 10, progress: bool = True) -> dict[str, Any]:
    from bundlerec_server import artifact as A
    from bundlerec_server.domain import Filters, Mode
    from bundlerec_server.engine import Engine, Fusion, fuse, fuse_scores
    from bundlerec_server.settings import Settings

    from .finetune import _metrics_module, read_judgments

    metrics = _metrics_module()
    settings = Settings(artifact=artifact, provider="cpu", verify_checksums=False, min_relevance=-1.0, anchor_pool=POOL)
    engine = Engine(artifact, settings)
    if engine.lexical is None:
        raise ValueError(f"{artifact}: no lexical index, nothing to tune")
    judged = {q: j for q, j in read_judgments(judgments).items() if metrics.split_of(q) == split}
    ids = engine.catalog.ids
    queries = sorted(judged)
    it = queries
    if progress:
        from tqdm import tqdm

        it = tqdm(queries, desc=f"tune on {split}", unit="query")
    lists = {}
    for q in it:
        vec = engine.encoder.encode([q])[0]
        dense, lexical = engine.dense(vec, POOL, Filters()), engine.lexical_hits(q, POOL, Filters())
        lists[q] = (dense, lexical, engine.candidates(vec, q, dense, lexical))
    configs: dict[str, tuple[Mode, Fusion | None]] = {"dense": (Mode.DENSE, None), "lexical": (Mode.LEXICAL, None)}
    for rk in RRF_KS:
        configs[f"rrf k={rk}"] = (Mode.HYBRID, Fusion("rrf", rrf_k=rk))
    for a in BLEND_ALPHAS:
        configs[f"blend alpha={a}"] = (Mode.HYBRID, Fusion("blend", alpha=a))
    for a in SCORE_ALPHAS:
        for g in COVERAGE_WEIGHTS:
            configs[f"scores alpha={a} coverage={g}"] = (Mode.HYBRID, Fusion("scores", alpha=a, coverage=g))
    scores: dict[str, float] = {}
    for name, (mode, fusion) in configs.items():
        per_query = []
        for q in queries:
            dense, lexical, cands = lists[q]
            if mode is not Mode.HYBRID:
                hits = dense[:k] if mode is Mode.DENSE else lexical[:k]
            else:
                hits = fuse_scores(cands, fusion, k) if fusion.method == "scores" else fuse(dense, lexical, fusion, k)
            per_query.append(metrics.query_metrics([ids[h.row] for h in hits], judged[q], k))
        scores[name] = metrics.aggregate(per_query)["ndcg"]
    best = max(scores, key=lambda n: scores[n])
    mode = configs[best][0]
    hybrid_best = max((n for n in scores if configs[n][0] is Mode.HYBRID), key=lambda n: scores[n])
    serving = {
        "default_retrieval_mode": mode.value,
        "fusion": vars(configs[hybrid_best][1]).copy(),
        "tuned_on": {"judgments": str(judgments), "split": split, "queries": len(queries), "metric": f"ndcg@{k}",
                     "pool": POOL, "ndcg": {n: round(v, 4) for n, v in scores.items()}, "best": best},
    }
    manifest = json.loads((artifact / A.MANIFEST).read_text())
    manifest["serving"] = serving
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    A.write_manifest(artifact, manifest)
    logger.info("tuned on %d %s queries: best %s (NDCG@%d %.4f); lexical %.4f, dense %.4f", len(queries), split, best, k,
                scores[best], scores["lexical"], scores["dense"])
    return serving


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--split", default="dev", choices=("dev", "train"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serving = tune_serving(args.artifact, args.judgments, args.split)
    print(json.dumps(serving, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

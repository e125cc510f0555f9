"""Chooses the served retrieval configuration on the DEV split of relevance judgments.

Runs the artifact's own serving engine in-process (the same encoder graph, HNSW index and BM25 index the
server will use) over the dev queries, scores dense, lexical, reciprocal rank fusion and a grid of linear
blends by NDCG@10; the winner is ``manifest["serving"]`` (``default_retrieval_mode`` and ``fusion``), which the
server applies. The build calls ``serving_for_build`` before it writes the manifest; ``tune_serving`` (and this
command) re-tunes an existing artifact and rewrites its manifest. The test split is never looked at here.

    python -m bundlerec_export.tune --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .evaluation import aggregate, query_metrics, read_judgments, split_of
from .offline import ensure_offline

if TYPE_CHECKING:
    from bundlerec_server.domain import Mode
    from bundlerec_server.engine import Engine, Fusion

logger = logging.getLogger(__name__)

BLEND_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RRF_KS = (20, 60)
SCORE_ALPHAS = (0.5, 0.6, 0.7, 0.8)
COVERAGE_WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5)
POOL = 100
# HNSW ef: the cheapest beam whose served ranking stays within EF_TOLERANCE (relative NDCG@k on dev) of the index's
# recall-tuned ef, which stays the ceiling (docs/ranking.md, "HNSW ef chosen by the served ranking")
EF_GRID = (64, 96, 128, 192, 256)
EF_TOLERANCE = 0.001


def tune_serving(artifact: Path, judgments: Path, split: str = "dev", k: int = 10, progress: bool = True) -> dict[str, Any]:
    """Tunes an existing artifact and rewrites its manifest with the ``serving`` choice; returns that choice."""
    from bundlerec_server import artifact as A

    serving = choose_serving(engine_for(artifact), judgments, split, k, progress)
    manifest = A.read_manifest(artifact, verify=False)
    manifest["serving"] = serving
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    A.write_manifest(artifact, manifest)
    return serving


def serving_for_build(root: Path, manifest: dict[str, Any], judgments: Path, split: str = "dev", k: int = 10,
                      progress: bool = True) -> dict[str, Any]:
    """The ``serving`` choice for an artifact being built in ``root`` whose manifest is not written yet.

    The engine loads from a scratch view of ``root`` (a symbolic link per entry plus ``manifest``), so the
    artifact's own manifest is written once, by the build, with this choice in it.
    """
    with engine_view(root, manifest) as engine:
        return choose_serving(engine, judgments, split, k, progress)


@contextlib.contextmanager
def engine_view(root: Path, manifest: dict[str, Any], load: Callable[[Path], Engine] | None = None) -> Iterator[Engine]:
    """The serving engine of an artifact being built in ``root`` whose manifest is not written yet: it loads
    (with ``load``, default :func:`engine_for`) from a scratch view of ``root`` (a symbolic link per entry plus
    ``manifest``)."""
    from bundlerec_server import artifact as A

    with tempfile.TemporaryDirectory(prefix="bundlerec-tune-") as tmp:
        view = Path(tmp)
        for entry in Path(root).resolve().iterdir():
            (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        (view / A.MANIFEST).write_text(json.dumps({**manifest, "format_version": A.FORMAT_VERSION}))
        yield (load or engine_for)(view)


def engine_for(artifact: Path) -> Engine:
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    settings = Settings(artifact=artifact, provider="cpu", verify_checksums=False, min_relevance=-1.0, anchor_pool=POOL)
    engine = Engine(artifact, settings)
    if engine.lexical is None:
        raise ValueError(f"{artifact}: no lexical index, nothing to tune")
    return engine


def _configs(learned: Fusion | None = None) -> dict[str, tuple[Mode, Fusion | None]]:
    from bundlerec_server.domain import Mode
    from bundlerec_server.engine import Fusion

    configs: dict[str, tuple[Mode, Fusion | None]] = {"dense": (Mode.DENSE, None), "lexical": (Mode.LEXICAL, None)}
    for rk in RRF_KS:
        configs[f"rrf k={rk}"] = (Mode.HYBRID, Fusion("rrf", rrf_k=rk))
    for a in BLEND_ALPHAS:
        configs[f"blend alpha={a}"] = (Mode.HYBRID, Fusion("blend", alpha=a))
    for a in SCORE_ALPHAS:
        for g in COVERAGE_WEIGHTS:
            configs[f"scores alpha={a} coverage={g}"] = (Mode.HYBRID, Fusion("scores", alpha=a, coverage=g))
    if learned is not None:
        configs["learned"] = (Mode.HYBRID, learned)
    return configs


def choose_serving(engine: Engine, judgments: Path, split: str = "dev", k: int = 10,
                   progress: bool = True) -> dict[str, Any]:
    """Scores every configuration of ``_configs`` by NDCG@k on the ``split`` queries; returns the manifest's
    ``serving`` (the best mode, the best hybrid fusion, every score)."""
    from bundlerec_server.domain import Filters, Mode
    from bundlerec_server.fusion import Fusion

    judged = {q: j for q, j in read_judgments(judgments).items() if split_of(q) == split}
    ids = engine.catalog.ids
    queries = sorted(judged)
    query_iter: Iterable[str] = queries
    if progress:
        from tqdm import tqdm

        query_iter = tqdm(queries, desc=f"tune on {split}", unit="query")
    lists = {}
    for q in query_iter:
        vec = engine.encoder.encode([q])[0]
        dense, lexical = engine.dense(vec, POOL, Filters()), engine.lexical_hits(q, POOL, Filters())
        lists[q] = (vec, dense, lexical)
    configs = _configs(Fusion("learned") if engine.ranker is not None else None)
    scores: dict[str, float] = {}
    for name, (mode, fusion) in configs.items():
        per_query = []
        for q in queries:
            vec, dense, lexical = lists[q]
            if fusion is None:
                hits = dense[:k] if mode is Mode.DENSE else lexical[:k]
            else:
                hits = engine.fuse(vec, q, dense, lexical, fusion, k)
            per_query.append(query_metrics([ids[h.row] for h in hits], judged[q], k))
        scores[name] = aggregate(per_query)["ndcg"] or 0.0
    best = max(scores, key=lambda n: scores[n])
    hybrid_best = max((n for n in scores if configs[n][0] is Mode.HYBRID), key=lambda n: scores[n])
    chosen = vars(configs[hybrid_best][1]).copy()
    if chosen["method"] == "learned":  # keep the best linear fusion's weights for --fusion scores
        best_scores = configs[max((n for n in scores if n.startswith("scores")), key=lambda n: scores[n])][1]
        assert best_scores is not None
        chosen.update(alpha=best_scores.alpha, coverage=best_scores.coverage)
    serving: dict[str, Any] = {
        "default_retrieval_mode": configs[best][0].value,
        "fusion": chosen,
        "tuned_on": {"judgments": str(judgments), "split": split, "queries": len(queries), "metric": f"ndcg@{k}",
                     "pool": POOL, "ndcg": {n: round(v, 4) for n, v in scores.items()}, "best": best},
    }
    if configs[best][0] is not Mode.LEXICAL:
        ef, table = choose_ef(engine, judged, lists, configs[best][0], Fusion.from_dict(chosen), k)
        if ef:
            serving["ef_search"] = ef
            serving["tuned_on"]["ef"] = table
    logger.info("tuned on %d %s queries: best %s (NDCG@%d %.4f); lexical %.4f, dense %.4f", len(queries), split, best, k,
                scores[best], scores["lexical"], scores["dense"])
    return serving


def choose_ef(engine: Engine, judged: dict[str, dict[str, float]], lists: dict[str, Any], mode: Mode, fusion: Fusion,
              k: int = 10) -> tuple[int, dict[str, Any]]:
    """(ef, table): the smallest ef of :data:`EF_GRID` (at most the index's recall-tuned ef, which is always tried)
    whose served ranking (``mode`` and ``fusion`` over the server's default anchor pool) has NDCG@k within
    :data:`EF_TOLERANCE` of the recall-tuned ef's; (0, {}) for a vector backend without a settable ef."""
    from bundlerec_server.domain import Filters, Mode
    from bundlerec_server.settings import Settings
    from bundlerec_server.vectors import HnswVectors

    if not isinstance(engine.vectors, HnswVectors):
        return 0, {}
    pool = Settings.anchor_pool  # the served candidate lists (the dataclass default)
    ceiling = int(engine.manifest.get("index", {}).get("ef_search", 0)) or engine.ef
    grid = sorted({e for e in EF_GRID if e < ceiling} | {ceiling})
    ids = engine.catalog.ids
    # as served: the lexical list retrieved at the served pool (ties at its end are cut as the server cuts them)
    lexical = {q: engine.lexical_hits(q, pool, Filters()) for q in lists} if mode is Mode.HYBRID else {}
    ndcg = {}
    vectors, tuning_pool = engine.vectors, engine.vectors.anchor_pool
    vectors.anchor_pool = pool  # the server's HNSW fetch (the tuning engine fetches POOL)
    try:
        for ef in grid:
            vectors.set_ef(ef)
            per_query = []
            for q, (vec, _, _) in lists.items():
                dense = engine.dense(vec, pool, Filters())
                hits = dense[:k] if mode is Mode.DENSE else engine.fuse(vec, q, dense, lexical[q], fusion, k)
                per_query.append(query_metrics([ids[h.row] for h in hits], judged[q], k))
            ndcg[ef] = aggregate(per_query)["ndcg"] or 0.0
    finally:
        vectors.anchor_pool = tuning_pool
        vectors.set_ef(max(engine.ef, tuning_pool))
    chosen = min(ef for ef in grid if ndcg[ef] >= ndcg[ceiling] * (1.0 - EF_TOLERANCE))
    logger.info("ef %d chosen (NDCG@%d %.4f; %.4f at the recall-tuned ef %d)", chosen, k, ndcg[chosen], ndcg[ceiling], ceiling)
    return chosen, {"pool": pool, "index_ef": ceiling, "tolerance": EF_TOLERANCE,
                    "ndcg": {str(ef): round(v, 4) for ef, v in ndcg.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--split", default="dev", choices=("dev", "train"))
    args = p.parse_args(argv)
    ensure_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serving = tune_serving(args.artifact, args.judgments, args.split)
    print(json.dumps(serving, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

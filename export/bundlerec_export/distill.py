"""Teacher lists for distilling the served hybrid ranking into the bi-encoder (``finetune --distill FILE``).

For every TRAIN query of :func:`bundlerec_export.evaluation.split_of` (dev and test are never read), the artifact's
own engine with the server's default settings (dense + lexical union, its served fusion: the learned ranker where it
won) returns its top ``depth``; the file keeps each list's product ids and the teacher's scores. With the learned
fusion the served score is the logistic of the LightGBM score, so the file stores the model's raw score (logit of
the served one); with a linear fusion the fused score as served. The method is described in ``docs/ranking.md``.

    python -m bundlerec_export.distill --artifact artifacts/homedepot \\
        --judgments ../shared/data/homedepot/judgments.csv --out runs/distill/teacher.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .evaluation import read_judgments, train_queries
from .offline import ensure_offline

if TYPE_CHECKING:
    from bundlerec_server.engine import Engine

__all__ = ["TeacherLists", "mine", "read_teacher", "teacher_logits"]

logger = logging.getLogger(__name__)

FORMAT = "bundlerec-distill-v1"
DEFAULT_DEPTH = 50  # the learned ranker scores the best 50 of the union (SCORED_CANDIDATES): its whole list


@dataclass
class TeacherLists:
    """Per train query (as written in the judgments): the served top ``depth`` product ids and teacher scores."""

    meta: dict[str, Any]
    lists: dict[str, tuple[list[str], np.ndarray]]


def teacher_logits(served: np.ndarray, learned: bool) -> np.ndarray:
    """Served scores -> teacher scores: the LightGBM raw score (inverse logistic) for the learned fusion."""
    s = np.asarray(served, dtype=np.float64)
    if not learned:
        return s
    s = np.clip(s, 1e-15, 1.0 - 1e-15)
    return np.asarray(np.log(s) - np.log1p(-s), dtype=np.float64)


def _artifact_key(root: Path) -> str:
    h = hashlib.sha256((Path(root) / "manifest.json").read_bytes())
    return h.hexdigest()[:16]


def mine(engine: Engine, root: Path, judgments: Path, depth: int = DEFAULT_DEPTH, progress: bool = True,
         max_queries: int = 0) -> TeacherLists:
    """The served top ``depth`` and teacher scores of every train query (``max_queries``: the first N, tests)."""
    from bundlerec_server.domain import SearchQuery

    judged = read_judgments(judgments)
    queries = train_queries(judged)
    if max_queries:
        queries = queries[:max_queries]
    learned = engine.fusion.method == "learned"
    t0 = time.perf_counter()
    it: Any = queries
    if progress:
        from tqdm import tqdm

        it = tqdm(queries, desc="teacher lists", unit="query")
    ids = engine.catalog.ids
    lists: dict[str, tuple[list[str], np.ndarray]] = {}
    for q in it:
        vec = engine.encoder.encode([q])[0]
        hits = engine.search(SearchQuery(q, k=depth), vec)
        lists[q] = ([ids[h.row] for h in hits], teacher_logits(np.array([h.score for h in hits]), learned))
    meta = {
        "format": FORMAT,
        "artifact": str(root),
        "artifact_manifest_sha": _artifact_key(root),
        "judgments_sha": hashlib.sha256(Path(judgments).read_bytes()).hexdigest()[:16],
        "fusion": engine.fusion.method,
        "teacher": "LightGBM raw score (logit of the served score)" if learned else "served fused score",
        "mode": engine.default_mode.value,
        "anchor_pool": engine.settings.anchor_pool,
        "depth": depth,
        "split": "train (bundlerec_export.evaluation.split_of)",
        "queries": len(lists),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return TeacherLists(meta, lists)


def write_teacher(t: TeacherLists, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": t.meta, "queries": {q: {"ids": ids, "scores": [round(float(s), 6) for s in sc]}
                                        for q, (ids, sc) in sorted(t.lists.items())}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
    return path


def read_teacher(path: Path) -> TeacherLists:
    body = json.loads(Path(path).read_text())
    meta = body.get("meta", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a teacher-list file ({FORMAT})")
    lists = {}
    for q, e in body["queries"].items():
        scores = np.asarray(e["scores"], dtype=np.float64)
        if len(scores) != len(e["ids"]) or not all(math.isfinite(s) for s in scores):
            raise ValueError(f"{path}: query {q!r}: ids and scores differ in length or a score is not finite")
        lists[q] = (list(e["ids"]), scores)
    return TeacherLists(meta, lists)


def mine_to_file(artifact: Path, judgments: Path, out: Path, depth: int = DEFAULT_DEPTH, progress: bool = True,
                 max_queries: int = 0) -> Path:
    """Mines with the artifact's served engine; reuses ``out`` when it was mined from the same artifact, judgments
    and depth."""
    ensure_offline()
    from .cross_encoder import served_engine

    out = Path(out)
    if out.is_file():
        try:
            meta = read_teacher(out).meta
        except (ValueError, KeyError, json.JSONDecodeError):
            meta = {}
        if (meta.get("artifact_manifest_sha") == _artifact_key(artifact) and meta.get("depth") == depth
                and meta.get("judgments_sha") == hashlib.sha256(Path(judgments).read_bytes()).hexdigest()[:16]
                and meta.get("max_queries", 0) == max_queries):
            logger.info("teacher lists cached in %s", out)
            return out
    t = mine(served_engine(Path(artifact)), Path(artifact), judgments, depth, progress, max_queries)
    t.meta["max_queries"] = max_queries
    return write_teacher(t, out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    p.add_argument("--max-queries", type=int, default=0, help="only the first N train queries (smoke runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bundlerec_export", "bundlerec_server"):
        logging.getLogger(name).setLevel(logging.INFO)
    out = mine_to_file(args.artifact, args.judgments, args.out, args.depth, not args.no_progress, args.max_queries)
    print(json.dumps(read_teacher(out).meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

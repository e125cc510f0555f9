"""Hybrid fusion math: merging dense and lexical candidate lists, and the stable top-k every ranking uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifact import ArtifactError
from .domain import Hit

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
FUSION_METHODS = ("rrf", "blend", "scores", "learned")


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval merges the dense and lexical lists.

    ``rrf``: reciprocal rank fusion, sum of 1 / (rrf_k + rank). ``blend``: alpha x dense + (1 - alpha) x lexical
    after min-max normalising each list's scores (an item missing from a list gets 0 for it). ``scores``: every
    candidate of either list gets its exact cosine and its exact BM25 score (not 0 when the other list missed
    it), each min-max normalised over the candidates, blended with alpha, plus ``coverage`` x the fraction of
    the query's words the title contains (:func:`fuse_scores`). ``learned``: the artifact's LambdaRank model over
    the same candidates' features (:mod:`learned_ranker`; ``alpha`` and ``coverage`` are kept for ``scores``).
    """

    method: str = "rrf"
    alpha: float = 0.5
    rrf_k: int = RRF_K
    coverage: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        f = cls(method=str(d.get("method", "rrf")), alpha=float(d.get("alpha", 0.5)), rrf_k=int(d.get("rrf_k", RRF_K)),
                coverage=float(d.get("coverage", 0.0)))
        if f.method not in FUSION_METHODS or not 0.0 <= f.alpha <= 1.0 or f.rrf_k < 1 or f.coverage < 0:
            raise ArtifactError(f"invalid fusion settings {d}")
        return f


@dataclass(frozen=True)
class Candidates:
    """The union of a query's dense and lexical candidates with exact per-candidate evidence."""

    rows: np.ndarray  # int64, ascending
    cosine: np.ndarray  # query-title cosine
    bm25: np.ndarray  # BM25 score (0 when no query word matches)
    coverage: np.ndarray  # fraction of the query's distinct words found in the title
    quality: np.ndarray  # catalog quality prior (multiplies the fused score)


def top_hits(rows: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
    """The ``k`` best of ``rows`` by ``scores``, best first; ties keep the input order (stable sort)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(int(rows[i]), float(scores[i])) for i in order]


def min_max(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to [0, 1]; all ones when every value is equal."""
    lo, span = float(x.min()), float(x.max() - x.min())
    return (x - lo) / span if span > 0 else np.ones_like(x)


def fused_scores(c: Candidates, fusion: Fusion) -> np.ndarray:
    """(alpha x scaled cosine + (1 - alpha) x scaled BM25 + coverage weight x coverage) x quality, per candidate
    (at least one candidate)."""
    fused = fusion.alpha * min_max(c.cosine.astype(np.float64)) + (1.0 - fusion.alpha) * min_max(c.bm25.astype(np.float64))
    out: np.ndarray = (fused + fusion.coverage * c.coverage) * c.quality
    return out


def fuse_scores(c: Candidates, fusion: Fusion, k: int) -> list[Hit]:
    """Top ``k`` candidates by :func:`fused_scores`; ties broken by row."""
    if len(c.rows) == 0:
        return []
    return top_hits(c.rows, fused_scores(c, fusion), k)


def _min_max_hits(hits: list[Hit]) -> dict[int, float]:
    if not hits:
        return {}
    scaled = min_max(np.array([h.score for h in hits], dtype=np.float64))
    return {h.row: float(v) for h, v in zip(hits, scaled, strict=True)}


def fuse(dense: list[Hit], lexical: list[Hit], fusion: Fusion, k: int) -> list[Hit]:
    """Merges two best-first candidate lists into the top ``k`` (ties broken by first appearance)."""
    fused: dict[int, float] = {}
    if fusion.method == "rrf":
        for hits in (dense, lexical):
            for rank, hit in enumerate(hits):
                fused[hit.row] = fused.get(hit.row, 0.0) + 1.0 / (fusion.rrf_k + rank + 1)
    else:
        d, lx = _min_max_hits(dense), _min_max_hits(lexical)
        for row in [*d, *lx]:
            fused[row] = fusion.alpha * d.get(row, 0.0) + (1.0 - fusion.alpha) * lx.get(row, 0.0)
    best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
    return [Hit(row, score) for row, score in best]

"""Retrieval-quality metrics, the deterministic train/dev/test split of queries, and the judgments reader.

Used by fine-tuning (dev metric per epoch), serving tuning (``tune``) and the quality benchmark.
Conventions (graded judgments such as Home Depot's 1.0–3.0 scale):

* NDCG@k: gain = relevance − 1 (clamped at 0), unjudged items gain 0, discount 1/log2(rank + 1);
  the ideal DCG is computed from ALL judged products of the query (not only the retrieved ones).
  A query whose ideal DCG is 0 (every judged product has relevance ≤ 1) has no defined NDCG:
  ``ndcg_at_k`` returns ``None`` and ``aggregate`` excludes and counts it.
* Recall@k and MRR@k: relevant = relevance ≥ 2.5 (``RELEVANT_AT``). Queries with no relevant product
  return ``None``; ``aggregate`` excludes them from the Recall and MRR means and counts them.
* A retrieved id that appears twice counts once (at its first position).

Judgments: a CSV ``query,product_id,relevance`` (graded; Home Depot 1.0-3.0), read by ``read_judgments``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

RELEVANT_AT = 2.5
SPLITS = ("train", "dev", "test")

__all__ = [
    "RELEVANT_AT", "SPLITS", "dcg", "ndcg_at_k", "recall_at_k", "mrr_at_k", "normalize_query", "split_of", "train_queries",
    "query_metrics", "aggregate", "read_judgments", "by_normalized_query",
]

Judgments = dict[str, dict[str, float]]  # query -> {product_id: relevance}


def _dedup(ranked: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in ranked:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _gain(relevance: float) -> float:
    return max(0.0, float(relevance) - 1.0)


def dcg(gains: Sequence[float]) -> float:
    """Sum of gain_i / log2(i + 1) over 1-based ranks i."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked: Sequence[str], judgments: Mapping[str, float], k: int = 10) -> float | None:
    """NDCG@k of ``ranked`` ids against ``judgments`` (id -> relevance); None when ideal DCG is 0."""
    ideal = dcg(sorted((_gain(r) for r in judgments.values()), reverse=True)[:k])
    if ideal <= 0.0:
        return None
    got = dcg([_gain(judgments.get(item, 1.0)) for item in _dedup(ranked)[:k]])
    return got / ideal


def _relevant(judgments: Mapping[str, float], threshold: float) -> set[str]:
    return {item for item, rel in judgments.items() if float(rel) >= threshold}


def recall_at_k(
    ranked: Sequence[str], judgments: Mapping[str, float], k: int = 10, threshold: float = RELEVANT_AT
) -> float | None:
    """Share of the query's relevant products found in the top k; None when it has none."""
    relevant = _relevant(judgments, threshold)
    return len(relevant.intersection(_dedup(ranked)[:k])) / len(relevant) if relevant else None


def mrr_at_k(
    ranked: Sequence[str], judgments: Mapping[str, float], k: int = 10, threshold: float = RELEVANT_AT
) -> float | None:
    """1 / rank of the first relevant product in the top k (0 if none there); None when it has none."""
    relevant = _relevant(judgments, threshold)
    if not relevant:
        return None
    for rank, item in enumerate(_dedup(ranked)[:k], start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


_WS = re.compile(r"\s+")


def normalize_query(query: str) -> str:
    """Lower-cased, surrounding whitespace stripped, inner whitespace runs collapsed to one space."""
    return _WS.sub(" ", query.strip().lower())


def split_of(query: str, dev: float = 0.1, test: float = 0.1) -> str:
    """'train' | 'dev' | 'test' from a stable hash (blake2b) of the normalised query; default 80/10/10.

    Independent of process, platform and PYTHONHASHSEED; the same normalised query always lands in
    the same split, so splits are disjoint by construction.
    """
    if not (0.0 <= dev and 0.0 <= test and dev + test <= 1.0):
        raise ValueError("dev and test fractions must be >= 0 and sum to <= 1")
    digest = hashlib.blake2b(normalize_query(query).encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    if u < test:
        return "test"
    if u < test + dev:
        return "dev"
    return "train"


def train_queries(queries: Iterable[str]) -> list[str]:
    """The TRAIN-split ones of ``queries`` (e.g. a judgments mapping), sorted: what offline training may read."""
    return sorted(q for q in queries if split_of(q) == "train")


def query_metrics(ranked: Sequence[str], judgments: Mapping[str, float], k: int = 10) -> dict[str, float | None]:
    """All three metrics of one query."""
    return {
        "ndcg": ndcg_at_k(ranked, judgments, k),
        "recall": recall_at_k(ranked, judgments, k),
        "mrr": mrr_at_k(ranked, judgments, k),
    }


def aggregate(per_query: Iterable[Mapping[str, float | None]]) -> dict[str, float | int | None]:
    """Means over the queries where each metric is defined, plus how many queries were excluded."""
    rows = list(per_query)
    out: dict[str, float | int | None] = {"queries": len(rows)}
    for name in ("ndcg", "recall", "mrr"):
        vals = [v for r in rows if (v := r.get(name)) is not None]
        out[name] = sum(vals) / len(vals) if vals else None
        out[f"{name}_excluded"] = len(rows) - len(vals)
    return out


def read_judgments(path: str | Path) -> Judgments:
    """query (as written, surrounding whitespace stripped) -> {product_id: relevance}.

    Rows with an empty query are skipped; a (query, product) pair listed twice keeps the higher relevance.
    Raises ValueError when a column is missing.
    """
    out: Judgments = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"query", "product_id", "relevance"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for row in reader:
            query = row["query"].strip()
            if not query:
                continue
            judged = out.setdefault(query, {})
            pid, rel = row["product_id"].strip(), float(row["relevance"])
            judged[pid] = max(rel, judged.get(pid, rel))
    return out


def by_normalized_query(judgments: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[str, dict[str, float]]]:
    """normalised query -> (its first written form, merged judgments); a product judged under two spellings
    keeps the higher relevance."""
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for query, judged in judgments.items():
        _, merged = out.setdefault(normalize_query(query), (query, {}))
        for pid, rel in judged.items():
            merged[pid] = max(rel, merged.get(pid, rel))
    return out

"""Choosing HNSW ``ef`` at query time by recall measured on the artifact's own embeddings.

Queries are short pseudo-queries made from catalog titles (their first two words) and embedded with the
serving graph, so their distribution is that of shopper queries rather than of titles. Recall@k is the
overlap of HNSW's top-k with the exact top-k (brute force over all embeddings). The chosen ef is the
smallest candidate whose recall@k reaches the target; the whole table goes into the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import hnswlib

logger = logging.getLogger(__name__)

EF_CANDIDATES = (64, 96, 128, 192, 256)


def pseudo_queries(titles: Sequence[str], n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(titles), size=min(n, len(titles)), replace=False)
    return [" ".join(titles[i].split()[:2]) or titles[i] for i in picks]


RecallRow = dict[str, Any]  # ef, k, recall, ms_per_query


def recall_table(index: hnswlib.Index, emb: np.ndarray, queries: np.ndarray, k: int,
                 candidates: Sequence[int] = EF_CANDIDATES) -> list[RecallRow]:
    k = min(k, len(emb))
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :k]
    rows = []
    for ef in candidates:
        index.set_ef(max(ef, k))
        t0 = time.perf_counter()
        labels, _ = index.knn_query(queries, k=k, num_threads=1)
        ms = (time.perf_counter() - t0) / len(queries) * 1000
        hit = np.mean([len(set(a) & set(b)) / k for a, b in zip(labels.tolist(), exact.tolist(), strict=True)])
        rows.append({"ef": int(ef), "k": k, "recall": round(float(hit), 4), "ms_per_query": round(ms, 4)})
    return rows


def choose_ef(table: list[RecallRow], target: float = 0.98) -> int:
    for row in table:
        if row["recall"] >= target:
            return int(row["ef"])
    return int(table[-1]["ef"])

"""Complements ("bought together" / "goes with") and item quality.

1. From baskets (instacart, or a generic orders file): **shrunk NPMI**
   Let N be the number of baskets (every basket counts, also single-item ones), c_a the baskets containing
   item a, c_ab the baskets containing both a and b (items are de-duplicated inside a basket). With
   p_a = c_a/N and p_ab = c_ab/N::

       npmi(a, b)  = log(p_ab / (p_a p_b)) / -log(p_ab)          in [-1, 1]; 0 = independent
       score(a, b) = npmi(a, b) * c_ab / (c_ab + shrinkage)      (shrinkage default 50)

   NPMI, unlike raw lift, is bounded and does not explode for rare items (lift of two items seen once,
   together, is N). Rare pairs still reach npmi = 1 easily (two items seen 3 times, always together), so the
   factor c_ab/(c_ab+shrinkage) discounts evidence from few baskets: 3 co-occurrences keep 6 % of their
   NPMI, 450 keep 90 %. Defaults chosen on held-out Instacart baskets (``benchmarks/bundle_quality.py``,
   other-aisle bundle-completion Recall@5; popularity within department 0.0233): user-level evidence
   0.019; basket evidence with >= 2 shoppers a pair: shrinkage 5 -> 0.030, 20 -> 0.033, 50 -> 0.036;
   without the 2-shopper rule 0.057 (but one loyal shopper's reorders then make "complements").
   Pairs with c_ab < ``min_support`` (default 2) or score <= 0 are dropped; for
   c_ab = N (every basket) NPMI is defined as 1. Where both anchor and candidate have a category, only a
   candidate from a DIFFERENT category is a complement (milk -> cereal, not milk -> other milk; those are
   substitutes, which retrieval already finds). Each anchor keeps its best ``top_k`` (default 20), best
   first, ties broken by support then row index. ``strength`` = score / (largest score of all kept pairs),
   so it lies in (0, 1] and stays comparable across anchors; ``support`` = baskets containing both.

   Evidence unit. By default counts are taken over baskets, and a pair also needs ``min_users`` (2)
   distinct shoppers who bought it together, so one person's habit cannot make a complement. Optionally
   (``--user-level-evidence``) the counts are taken over **users** instead of baskets: N = users, c_a = users who bought a, c_ab = users who bought a and b in the same basket (each
   user counts at most once, however often they reorder), and ``min_support`` applies to c_ab in users.
   On Instacart one loyal shopper reorders the same items dozens of times, so basket counts turn one
   person's habit (banana + a frozen meal in 24 orders of one user) into a strong "complement"; user counts
   need the pair to recur across different people; but that also discards the repeat-purchase signal
   (held-out Recall@5 0.019 vs 0.054 for basket counts). Baskets without a user id each count as their own user.
   ``support`` still reports baskets containing both.

2. Without baskets (homedepot, icecat): **content-based related items** from the HNSW index. For each
   item, its nearest neighbours whose cosine lies inside a band (default 0.45 <= cos <= 0.85: related, but
   not the near-duplicates/variants above the band nor the unrelated below it), from a different category
   where both are known, best ``top_k`` by cosine. ``strength`` = (cos - lo) / (hi - lo) in [0, 1],
   ``support`` = 0 (no co-purchase evidence).

Item quality (``items.jsonl`` "quality", in (0, 1]): with baskets, a popularity prior
``0.6 + 0.4 * log1p(n) / log1p(max n)`` where n = baskets containing the item (never-ordered items get
0.6, the most ordered 1.0; the log keeps blockbusters from dominating). Without baskets every item gets a
neutral 1.0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bundlerec_server.artifact import Complements

logger = logging.getLogger(__name__)

NPMI_METHOD = "npmi_shrunk"
CONTENT_METHOD = "content_band"
POPULARITY_METHOD = "popularity_log"
NEUTRAL_METHOD = "neutral"


@dataclass
class MiningStats:
    method: str
    pairs: int
    anchors: int
    baskets: int
    candidate_pairs: int
    unit: str = "baskets"
    units: int = 0


def _unique_rows(baskets: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each basket as a sorted array of distinct item rows (duplicates inside a basket count once)."""
    return [np.unique(np.asarray(list(b), dtype=np.int64)) for b in baskets]


def item_counts(baskets: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """Number of baskets containing each item (int32)."""
    rows = _unique_rows(baskets)
    if not rows:
        return np.zeros(n_items, dtype=np.int32)
    return np.bincount(np.concatenate(rows), minlength=n_items).astype(np.int32)


def _pair_keys(rows: np.ndarray, n_items: int) -> np.ndarray:
    i, j = np.triu_indices(len(rows), k=1)
    return rows[i] * n_items + rows[j]


def pair_counts(
    baskets: Sequence[Sequence[int]], n_items: int, users: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Co-occurrence counts of unordered pairs (a < b): arrays a, b, count (the upper triangle of X^T X).

    With ``users``, a pair counts once per user (bought together in at least one of their baskets)."""
    groups: dict[str, list[np.ndarray]] = {}
    for k, rows in enumerate(_unique_rows(baskets)):
        if len(rows) < 2:
            continue
        key = f"u:{users[k]}" if users is not None and users[k] else f"b:{k}"
        groups.setdefault(key, []).append(_pair_keys(rows, n_items))
    keys = [np.unique(np.concatenate(g)) if len(g) > 1 else g[0] for g in groups.values()]
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
    return uniq // n_items, uniq % n_items, counts.astype(np.int64)


def user_item_counts(baskets: Sequence[Sequence[int]], n_items: int, users: Sequence[str]) -> tuple[np.ndarray, int]:
    """(distinct users who bought each item, number of distinct users); id-less baskets are their own user."""
    groups: dict[str, list[np.ndarray]] = {}
    for k, rows in enumerate(_unique_rows(baskets)):
        groups.setdefault(f"u:{users[k]}" if users[k] else f"b:{k}", []).append(rows)
    if not groups:
        return np.zeros(n_items, dtype=np.int32), 0
    per_user = [np.unique(np.concatenate(g)) for g in groups.values()]
    return np.bincount(np.concatenate(per_user), minlength=n_items).astype(np.int32), len(groups)


def npmi_scores(c_ab: np.ndarray, c_a: np.ndarray, c_b: np.ndarray, n: int, shrinkage: float) -> np.ndarray:
    """Shrunk NPMI for arrays of pair counts (see module docstring)."""
    c_ab = c_ab.astype(np.float64)
    p_ab = c_ab / n
    pmi = np.log(p_ab) - np.log(c_a / n) - np.log(c_b / n)
    denom = -np.log(p_ab)
    with np.errstate(divide="ignore", invalid="ignore"):
        npmi = np.where(denom > 0, pmi / np.where(denom > 0, denom, 1.0), 1.0)
    return npmi * c_ab / (c_ab + shrinkage)


def _top_k_csr(
    rows: np.ndarray, cols: np.ndarray, score: np.ndarray, support: np.ndarray, n_items: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keeps each row's best ``top_k`` (score desc, support desc, col asc) as CSR arrays."""
    order = np.lexsort((cols, -support, -score, rows))
    rows, cols, score, support = rows[order], cols[order], score[order], support[order]
    counts = np.bincount(rows, minlength=n_items)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, counts)
    keep = rank < top_k
    rows, cols, score, support = rows[keep], cols[keep], score[keep], support[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_items))]).astype(np.int64)
    return indptr, cols.astype(np.int32), score, support.astype(np.int32)


def _category_codes(categories: Sequence[str] | None, n_items: int) -> np.ndarray:
    """Integer code per item, -1 where unknown."""
    if categories is None:
        return np.full(n_items, -1, dtype=np.int64)
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(c, len(table)) if c else -1 for c in categories], dtype=np.int64)


def _cross_category(rows: np.ndarray, cols: np.ndarray, codes: np.ndarray) -> np.ndarray:
    a, b = codes[rows], codes[cols]
    return (a < 0) | (b < 0) | (a != b)


def empty_complements(n_items: int) -> Complements:
    return Complements(
        np.zeros(n_items + 1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32),
        np.zeros(0, dtype=np.int32),
    )


def mine_cooccurrence(
    baskets: Sequence[Sequence[int]],
    n_items: int,
    categories: Sequence[str] | None = None,
    *,
    users: Sequence[str] | None = None,
    min_support: int = 2,
    top_k: int = 20,
    shrinkage: float = 50.0,
    support_users: Sequence[str] | None = None,
    min_users: int = 2,
) -> tuple[Complements, MiningStats]:
    """Complements from baskets of item rows (see module docstring for the scoring).

    ``users`` (one id per basket, "" when unknown) switches the evidence unit from baskets to users.
    ``support_users`` (one id per basket) keeps basket-level evidence but drops pairs bought together by
    fewer than ``min_users`` distinct users (one loyal shopper's reorders cannot make a complement)."""
    if min_support < 1:
        raise ValueError("min_support must be >= 1")
    if users is not None and len(users) != len(baskets):
        raise ValueError("users must give one id per basket")
    if users is not None and not any(users):
        users = None
    if len(baskets) == 0:
        return empty_complements(n_items), MiningStats(NPMI_METHOD, 0, 0, 0, 0)
    a, b, basket_ab = pair_counts(baskets, n_items)
    if users is None:
        unit = "baskets"
        c, n = item_counts(baskets, n_items).astype(np.float64), len(baskets)
        ab = basket_ab
    else:
        unit = "users"
        c_users, n = user_item_counts(baskets, n_items, users)
        c = c_users.astype(np.float64)
        ua, ub, uab = pair_counts(baskets, n_items, users)
        # user-level pairs are a subset of basket-level pairs, both sorted by key: align them
        pos = np.searchsorted(a * n_items + b, ua * n_items + ub)
        a, b, ab, basket_ab = ua, ub, uab, basket_ab[pos]
    if users is None and support_users is not None and min_users > 1:
        ua, ub, uab = pair_counts(baskets, n_items, support_users)
        enough = np.isin(a * n_items + b, (ua * n_items + ub)[uab >= min_users])
        a, b, ab, basket_ab = a[enough], b[enough], ab[enough], basket_ab[enough]
    # both directions: (a -> b) and (b -> a)
    rows, cols, c_ab = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([ab, ab])
    sup = np.concatenate([basket_ab, basket_ab])
    mask = c_ab >= min_support
    candidates = int(mask.sum())
    mask &= _cross_category(rows, cols, _category_codes(categories, n_items))
    rows, cols, c_ab, sup = rows[mask], cols[mask], c_ab[mask], sup[mask]
    score = npmi_scores(c_ab, c[rows], c[cols], n, shrinkage)
    pos = score > 0
    rows, cols, sup, score = rows[pos], cols[pos], sup[pos], score[pos]
    indptr, idx, score, support = _top_k_csr(rows, cols, score, sup, n_items, top_k)
    top = float(score.max()) if len(score) else 1.0
    strength = np.clip(score / top, 0.0, 1.0).astype(np.float32)
    comp = Complements(indptr, idx, strength, support)
    stats = MiningStats(NPMI_METHOD, int(len(idx)), int(np.count_nonzero(np.diff(indptr))), len(baskets),
                        candidates, unit, n)
    logger.info("complements from %d baskets (%d %s): %d pairs for %d anchors", len(baskets), n, unit,
                stats.pairs, stats.anchors)
    return comp, stats


def related_from_index(
    index,
    embeddings: np.ndarray,
    categories: Sequence[str] | None = None,
    *,
    top_k: int = 20,
    band: tuple[float, float] = (0.45, 0.85),
    search_k: int | None = None,
    batch: int = 4096,
) -> tuple[Complements, MiningStats]:
    """Content-based fallback: in-band neighbours from an hnswlib cosine index (labels = rows)."""
    lo, hi = band
    if not (-1.0 <= lo < hi <= 1.0):
        raise ValueError(f"band must satisfy -1 <= lo < hi <= 1, got {band}")
    n_items = embeddings.shape[0]
    if n_items < 2:
        return empty_complements(n_items), MiningStats(CONTENT_METHOD, 0, 0, 0, 0)
    k = min(n_items, search_k or max(4 * top_k, 50))
    index.set_ef(max(k, 64))
    codes = _category_codes(categories, n_items)
    all_r, all_c, all_s = [], [], []
    candidates = 0
    for start in range(0, n_items, batch):
        q = embeddings[start : start + batch]
        labels, dist = index.knn_query(q, k=k)
        cos = 1.0 - dist
        rows = np.repeat(np.arange(start, start + len(q)), k)
        cols, cos = labels.ravel().astype(np.int64), cos.ravel()
        mask = (cols != rows) & (cos >= lo) & (cos <= hi)
        candidates += int(mask.sum())
        mask &= _cross_category(rows, cols, codes)
        all_r.append(rows[mask])
        all_c.append(cols[mask])
        all_s.append(cos[mask])
    rows, cols, cos = np.concatenate(all_r), np.concatenate(all_c), np.concatenate(all_s).astype(np.float64)
    indptr, idx, cos, _ = _top_k_csr(rows, cols, cos, np.zeros_like(rows), n_items, top_k)
    strength = np.clip((cos - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    comp = Complements(indptr, idx, strength, np.zeros(len(idx), dtype=np.int32))
    stats = MiningStats(CONTENT_METHOD, int(len(idx)), int(np.count_nonzero(np.diff(indptr))), 0, candidates)
    logger.info("content-based related items: %d pairs for %d anchors (band %.2f-%.2f)", stats.pairs, stats.anchors, lo, hi)
    return comp, stats


def popularity_quality(counts: np.ndarray) -> np.ndarray:
    """0.6 + 0.4 * log1p(n) / log1p(max n), float32 in [0.6, 1]; all 1.0 when nothing was ordered."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    if top <= 0:
        return np.ones(counts.shape, dtype=np.float32)
    return (0.6 + 0.4 * np.log1p(counts) / np.log1p(top)).astype(np.float32)


def neutral_quality(n_items: int) -> np.ndarray:
    return np.ones(n_items, dtype=np.float32)

"""Pair statistics, candidate scorers and pair features for complements (numpy / scipy only).

Everything starts from :func:`pair_stats` over baskets of item rows (duplicates inside a basket count once):

* ``C``  items x items, C[a, b] = baskets containing both (diagonal 0); ``counts`` = baskets containing each item;
* ``Cw`` the same with each basket weighted ``1 / log2(1 + |basket|)`` (a 40-item stock-up says less about
  any one pair than a 3-item basket); ``wcounts`` its item totals;
* ``S``  distinct shoppers who bought the pair in one basket (on the support of ``C``);
* ``user_counts`` distinct shoppers per item; ``aisle_pair`` / ``dept_pair`` = P(group of b | group of a)
  from the co-occurrence counts summed per group; ``aisle_share`` = P(item | its aisle).

Scorers (each an items x items CSR over its candidate support; a row is one anchor):

* :func:`cooccurrence_scores` — raw counts ``C`` (ties later broken by popularity);
* :func:`conditional_scores` — smoothed P(b | a) with backoff to the aisle pair, optional basket-size
  weighting and a popularity exponent::

      backoff(a, b) = P(aisle_b | aisle_a) * P(b | aisle_b)
      score(a, b)   = (C'[a, b] + alpha * backoff(a, b)) / (c'_a + alpha) / c_b ** beta

  with C' = Cw or C; candidates = support of C plus the top ``fill`` backoff items of the anchor's aisle
  (so an anchor seen once still gets a full list);
* :func:`ease_model` — EASE (Steck 2019), closed form ``P = (G + lambda I)^-1``, ``B = -P / diag(P)``,
  diag(B) = 0, over the ``max_items`` most frequent items (the inverse stays small); score(a, b) = B[a, b].

:func:`top_lists` cuts any scorer to per-anchor top-N (optionally other aisles only) and
:func:`pair_features` computes the re-ranker's features for arbitrary (anchor, candidate) arrays.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from bundlerec_export.complements import pair_counts


def group_codes(values: Sequence[str] | None, n: int) -> np.ndarray:
    """Integer code per item, -1 where unknown (or when ``values`` is None)."""
    if values is None:
        return np.full(n, -1, dtype=np.int64)
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(v, len(table)) if v else -1 for v in values], dtype=np.int64)


def basket_matrix(baskets: Sequence[Sequence[int]], n_items: int, weights: np.ndarray | None = None) -> sp.csr_matrix:
    """Baskets x items CSR, 1 (or the basket's weight) where the basket holds the item; duplicates count once."""
    rows = [np.unique(np.asarray(list(b), dtype=np.int64)) for b in baskets]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices)) if weights is None else np.repeat(np.asarray(weights, dtype=np.float64), np.diff(indptr))
    return sp.csr_matrix((data, indices, indptr), shape=(len(baskets), n_items))


def size_weights(baskets: Sequence[Sequence[int]]) -> np.ndarray:
    """1 / log2(1 + number of distinct items) per basket."""
    sizes = np.asarray([len(set(b)) for b in baskets], dtype=np.float64)
    return 1.0 / np.log2(1.0 + np.maximum(sizes, 1.0))


def _no_diag(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m)
    m.setdiag(0)
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _group_pair_probability(c: sp.csr_matrix, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(group_b | group_a) as a dense groups x groups matrix, group of every item with -1 -> extra group)."""
    g = np.where(codes < 0, codes.max(initial=-1) + 1, codes)
    n_groups = int(g.max(initial=-1)) + 1
    m = sp.csr_matrix((np.ones(len(g)), (np.arange(len(g)), g)), shape=(len(g), max(n_groups, 1)))
    pair = np.asarray((m.T @ c @ m).todense(), dtype=np.float64)
    rows = pair.sum(axis=1, keepdims=True)
    return np.divide(pair, rows, out=np.zeros_like(pair), where=rows > 0), g


@dataclass
class PairStats:
    n_items: int
    n_baskets: int
    C: sp.csr_matrix
    Cw: sp.csr_matrix
    S: sp.csr_matrix
    counts: np.ndarray
    wcounts: np.ndarray
    user_counts: np.ndarray
    n_users: int
    aisle: np.ndarray  # group index per item (unknown = its own extra group)
    aisle_code: np.ndarray  # -1 where the aisle is unknown (never "the same aisle")
    dept: np.ndarray
    aisle_pair: np.ndarray
    dept_pair: np.ndarray
    aisle_share: np.ndarray
    X: sp.csr_matrix  # baskets x items (1 = holds the item)
    Xw: sp.csr_matrix  # the same, weighted 1 / log2(1 + basket size)
    basket_users: list[str]  # one id per basket ("#basket<k>" where unknown)

    def lookup(self, m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Values of ``m`` at (rows, cols) (0 where absent), float64."""
        if len(rows) == 0:
            return np.zeros(0)
        return np.asarray(m[rows, cols], dtype=np.float64).ravel()

    def backoff(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """P(aisle_b | aisle_a) * P(b | aisle_b) for arrays of (anchor, candidate)."""
        out: np.ndarray = self.aisle_pair[self.aisle[rows], self.aisle[cols]] * self.aisle_share[cols]
        return out


def pair_stats(baskets: Sequence[Sequence[int]], n_items: int, users: Sequence[str] | None = None,
               aisles: Sequence[str] | None = None, departments: Sequence[str] | None = None) -> PairStats:
    """All pair and item counts the scorers and features need (see module docstring)."""
    x = basket_matrix(baskets, n_items)
    xw = basket_matrix(baskets, n_items, size_weights(baskets))
    c = _no_diag(x.T @ x)
    cw = _no_diag(xw.T @ x)
    counts = np.asarray(x.sum(axis=0)).ravel()
    wcounts = np.asarray(xw.sum(axis=0)).ravel()
    ids = [u if u else f"#basket{k}" for k, u in enumerate(users)] if users is not None else [
        f"#basket{k}" for k in range(len(baskets))]
    a, b, s = pair_counts(baskets, n_items, ids)
    s_m = sp.csr_matrix((np.concatenate([s, s]).astype(np.float64), (np.concatenate([a, b]), np.concatenate([b, a]))),
                        shape=(n_items, n_items))
    s_m.sort_indices()
    per_user: dict[str, set[int]] = {}
    for k, bk in enumerate(baskets):
        per_user.setdefault(ids[k], set()).update(int(i) for i in bk)
    flat = [i for items in per_user.values() for i in items]
    user_counts = np.bincount(np.asarray(flat, dtype=np.int64), minlength=n_items).astype(np.float64)
    n_users = len(per_user)
    aisle_code = group_codes(aisles, n_items)
    aisle_pair, aisle = _group_pair_probability(c, aisle_code)
    dept_pair, dept = _group_pair_probability(c, group_codes(departments, n_items))
    aisle_tot = np.bincount(aisle, weights=counts, minlength=aisle_pair.shape[0])
    share = np.divide(counts, aisle_tot[aisle], out=np.zeros(n_items), where=aisle_tot[aisle] > 0)
    return PairStats(n_items, len(baskets), c, cw, s_m, counts, wcounts, user_counts, n_users, aisle, aisle_code,
                     dept, aisle_pair, dept_pair, share, x, xw, ids)


# ------------------------------------------------------------------------------------------------ scorers


def cooccurrence_scores(st: PairStats, min_users: int = 1) -> sp.csr_matrix:
    """Raw co-occurrence counts; with ``min_users`` > 1 only pairs bought together by that many shoppers."""
    if min_users <= 1:
        return st.C
    keep = st.S.copy()
    keep.data = (keep.data >= min_users).astype(np.float64)
    out = st.C.multiply(keep).tocsr()
    out.eliminate_zeros()
    return out


def aisle_fill(st: PairStats, fill: int, cross_aisle: bool = True) -> sp.csr_matrix:
    """Per anchor, the ``fill`` items with the highest backoff P(aisle_b | aisle_a) P(b | aisle_b) (> 0),
    other aisles only with ``cross_aisle``; values = the backoff. Same list for all anchors of an aisle."""
    n = st.n_items
    scores = st.aisle_pair[:, st.aisle] * st.aisle_share[None, :]  # aisles x items
    if cross_aisle:
        known = st.aisle_code >= 0
        scores[st.aisle[known], np.flatnonzero(known)] = 0.0
    fill = min(fill, n)
    if fill <= 0 or n == 0:
        return sp.csr_matrix((n, n))
    top = np.argpartition(-scores, fill - 1, axis=1)[:, :fill]
    vals = np.take_along_axis(scores, top, axis=1)
    rows = np.repeat(np.arange(n), fill)
    cols = top[st.aisle].ravel()
    data = vals[st.aisle].ravel()
    keep = (data > 0) & (cols != rows)
    m = sp.csr_matrix((data[keep], (rows[keep], cols[keep])), shape=(n, n))
    m.sort_indices()
    return m


def conditional_scores(st: PairStats, alpha: float = 1.0, beta: float = 0.0, weighted: bool = False,
                       fill: int = 50, cross_aisle: bool = True) -> sp.csr_matrix:
    """Smoothed P(b | a) with aisle-pair backoff and popularity exponent (module docstring)."""
    cnt = st.Cw if weighted else st.C
    tot = st.wcounts if weighted else st.counts
    support = (abs(cnt) + aisle_fill(st, fill, cross_aisle)).tocoo()
    rows, cols = support.row, support.col
    num = st.lookup(cnt, rows, cols) + alpha * st.backoff(rows, cols)
    den = tot[rows] + alpha
    score = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    score = score / np.power(np.maximum(st.counts[cols], 1.0), beta)
    m = sp.csr_matrix((score + 1e-300, (rows, cols)), shape=cnt.shape)
    m.sort_indices()
    return m


@dataclass
class EaseModel:
    items: np.ndarray  # catalog rows kept (most frequent)
    pos: np.ndarray  # catalog row -> position in ``items`` or -1
    B: np.ndarray  # float32 len(items) x len(items), diag 0
    lam: float

    def scores(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """B[a, b] where both are kept, NaN elsewhere."""
        pa, pb = self.pos[rows], self.pos[cols]
        ok = (pa >= 0) & (pb >= 0)
        out = np.full(len(rows), np.nan)
        out[ok] = self.B[pa[ok], pb[ok]]
        return out

    def matrix(self, n_items: int, top: int) -> sp.csr_matrix:
        """items x items CSR with each kept anchor's ``top`` highest positive scores."""
        top = min(top, len(self.items) - 1)
        if top <= 0:
            return sp.csr_matrix((n_items, n_items))
        idx = np.argpartition(-self.B, top - 1, axis=1)[:, :top]
        vals = np.take_along_axis(self.B, idx, axis=1)
        rows = np.repeat(self.items, top)
        cols = self.items[idx].ravel()
        data = vals.ravel().astype(np.float64)
        keep = data > 0
        m = sp.csr_matrix((data[keep], (rows[keep], cols[keep])), shape=(n_items, n_items))
        m.sort_indices()
        return m


def ease_model(baskets: Sequence[Sequence[int]], n_items: int, lam: float, max_items: int = 3000,
               min_count: int = 2, gram: tuple[np.ndarray, np.ndarray] | None = None) -> EaseModel:
    """EASE over the ``max_items`` most frequent items with >= ``min_count`` baskets.

    ``gram`` = (items, G) from :func:`ease_gram` lets a lambda grid reuse one Gram matrix."""
    items, g = gram if gram is not None else ease_gram(baskets, n_items, max_items, min_count)
    pos = np.full(n_items, -1, dtype=np.int64)
    pos[items] = np.arange(len(items))
    if len(items) == 0:
        return EaseModel(items, pos, np.zeros((0, 0), dtype=np.float32), lam)
    g = g.copy()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return EaseModel(items, pos, b.astype(np.float32), lam)


def ease_gram(baskets: Sequence[Sequence[int]], n_items: int, max_items: int = 3000,
              min_count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(kept items, dense Gram matrix X^T X over them) for :func:`ease_model`."""
    x = basket_matrix(baskets, n_items)
    counts = np.asarray(x.sum(axis=0)).ravel()
    order = np.lexsort((np.arange(n_items), -counts))
    items = np.sort(order[:max_items][counts[order[:max_items]] >= min_count])
    xs = x[:, items]
    return items, np.asarray((xs.T @ xs).todense(), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ top lists


def top_lists(scores: sp.csr_matrix, k: int, aisle: np.ndarray | None = None, popularity: np.ndarray | None = None,
              anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row best ``k`` of a score matrix (> 0 entries; ties: popularity desc, then column), as CSR
    (indptr over all rows, indices, scores). With ``aisle`` (codes, -1 unknown), a candidate in the anchor's
    (known) aisle is dropped.
    With ``anchors``, the other rows are left empty."""
    m = scores.tocoo()
    rows, cols, vals = m.row.astype(np.int64), m.col.astype(np.int64), m.data
    keep = (vals > 0) & (rows != cols)
    if aisle is not None:
        keep &= (aisle[rows] < 0) | (aisle[rows] != aisle[cols])
    if anchors is not None:
        want = np.zeros(scores.shape[0], dtype=bool)
        want[anchors] = True
        keep &= want[rows]
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    pop = popularity[cols] if popularity is not None else np.zeros(len(cols))
    order = np.lexsort((cols, -pop, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    n = scores.shape[0]
    per_row = np.bincount(rows, minlength=n)
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, per_row)
    keep = rank < k
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return indptr, cols.astype(np.int32), vals


def union_candidates(lists: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (anchor, candidate) pairs over several top lists, sorted by anchor then candidate."""
    keys = []
    for indptr, idx, _ in lists:
        rows = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(indptr))
        keys.append(rows * n_items + idx.astype(np.int64))
    u = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    return u // n_items, u % n_items


# ------------------------------------------------------------------------------------------------ features

_TOKEN = re.compile(r"[a-z0-9]+")

FEATURES = (
    "c_ab", "cw_ab", "c_a", "c_b", "p_b_given_a", "p_a_given_b", "lift", "npmi", "jaccard",
    "shoppers_ab", "two_shoppers", "aisle_pair", "dept_pair", "backoff", "cond_score",
    "b_popularity", "b_users", "b_repeat", "a_repeat", "a_degree", "ease", "same_aisle", "same_dept", "title_jaccard",
)


def title_tokens(titles: Sequence[str]) -> list[frozenset[str]]:
    return [frozenset(_TOKEN.findall((t or "").lower())) for t in titles]


def title_jaccard(tokens: Sequence[frozenset[str]], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rows))
    for k, (a, b) in enumerate(zip(rows.tolist(), cols.tolist())):
        ta, tb = tokens[a], tokens[b]
        if ta and tb:
            out[k] = len(ta & tb) / len(ta | tb)
    return out


def _col_sum(m: sp.spmatrix) -> np.ndarray:
    return np.asarray(m.sum(axis=0), dtype=np.float64).ravel()


def shopper_share(st: PairStats, baskets: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> dict[str, Any]:
    """What the baskets ``baskets`` (positions in ``st``; one shopper's) add to the pair and item counts at
    (rows, cols): subtracting it gives the statistics as if that shopper had never ordered."""
    x, xw = st.X[baskets], st.Xw[baskets]
    xa, xb = x[:, rows], x[:, cols]
    both = xa.multiply(xb)
    col_sum = _col_sum
    bought = col_sum(x) > 0
    return {"c_ab": col_sum(both), "cw_ab": col_sum(xw[:, rows].multiply(xb)), "c_a": col_sum(xa),
            "c_b": col_sum(xb), "cw_a": col_sum(xw[:, rows]), "s_ab": (col_sum(both) > 0).astype(np.float64),
            "u_a": bought[rows].astype(np.float64), "u_b": bought[cols].astype(np.float64), "n": float(len(baskets))}


def pair_features(st: PairStats, rows: np.ndarray, cols: np.ndarray, *, tokens: Sequence[frozenset[str]] | None = None,
                  ease: EaseModel | None = None, cond_params: tuple[float, float, bool] | None = None,
                  minus: dict[str, Any] | None = None) -> np.ndarray:
    """float32 matrix (len(rows) x len(FEATURES)) for (anchor, candidate) pairs, columns in FEATURES order.

    Probabilities are over baskets of ``st``; NPMI of a pair never seen together is -1; EASE is NaN
    outside the EASE item set; ``cond_params`` = (alpha, beta, weighted) of :func:`conditional_scores`
    gives ``cond_score``. ``minus`` (:func:`shopper_share`) removes one shopper's own baskets from the
    counts (pair, item, shopper and basket totals; the aisle aggregates and EASE keep them)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    d = minus or {}
    zero = np.zeros(len(rows))
    n = max(st.n_baskets - d.get("n", 0.0), 1)
    c_ab = st.lookup(st.C, rows, cols) - d.get("c_ab", zero)
    c_a, c_b = st.counts[rows] - d.get("c_a", zero), st.counts[cols] - d.get("c_b", zero)
    u_a, u_b = st.user_counts[rows] - d.get("u_a", zero), st.user_counts[cols] - d.get("u_b", zero)
    cw_ab = st.lookup(st.Cw, rows, cols) - d.get("cw_ab", zero)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_ba = np.where(c_a > 0, c_ab / c_a, 0.0)
        p_ab = np.where(c_b > 0, c_ab / c_b, 0.0)
        lift = np.where(c_a * c_b > 0, c_ab * n / (c_a * c_b), 0.0)
        pj = c_ab / n
        npmi = np.where(c_ab > 0, np.log(np.maximum(lift, 1e-300)) / -np.log(np.where(pj < 1, pj, 0.5)), -1.0)
        npmi = np.where((c_ab > 0) & (pj >= 1), 1.0, npmi)
        union = c_a + c_b - c_ab
        jac = np.where(union > 0, c_ab / union, 0.0)
        b_rep = np.where(u_b > 0, c_b / u_b, 0.0)
        a_rep = np.where(u_a > 0, c_a / u_a, 0.0)
    shoppers = st.lookup(st.S, rows, cols) - d.get("s_ab", zero)
    backoff = st.backoff(rows, cols)
    if cond_params is not None:
        alpha, beta, weighted = cond_params
        num = (cw_ab if weighted else c_ab) + alpha * backoff
        den = (st.wcounts[rows] - d.get("cw_a", zero) if weighted else c_a) + alpha
        cond = np.divide(num, den, out=np.zeros_like(num), where=den > 0) / np.power(np.maximum(c_b, 1.0), beta)
    else:
        cond = np.full(len(rows), np.nan)
    degree = np.diff(st.C.indptr)[rows].astype(np.float64)
    cols_out = {
        "c_ab": c_ab, "cw_ab": cw_ab, "c_a": c_a, "c_b": c_b,
        "p_b_given_a": p_ba, "p_a_given_b": p_ab, "lift": lift, "npmi": npmi, "jaccard": jac,
        "shoppers_ab": shoppers, "two_shoppers": (shoppers >= 2).astype(np.float64),
        "aisle_pair": st.aisle_pair[st.aisle[rows], st.aisle[cols]],
        "dept_pair": st.dept_pair[st.dept[rows], st.dept[cols]],
        "backoff": backoff, "cond_score": cond,
        "b_popularity": c_b / n, "b_users": u_b, "b_repeat": b_rep, "a_repeat": a_rep,
        "a_degree": degree,
        "ease": ease.scores(rows, cols) if ease is not None else np.full(len(rows), np.nan),
        "same_aisle": ((st.aisle_code[rows] >= 0) & (st.aisle[rows] == st.aisle[cols])).astype(np.float64),
        "same_dept": (st.dept[rows] == st.dept[cols]).astype(np.float64),
        "title_jaccard": title_jaccard(tokens, rows, cols) if tokens is not None else np.full(len(rows), np.nan),
    }
    return np.column_stack([cols_out[f] for f in FEATURES]).astype(np.float32)

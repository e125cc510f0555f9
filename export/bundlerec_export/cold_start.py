"""Cold-start complements: a "bought with" model over title embeddings, for items without orders.

Catalogs without orders (Home Depot, Icecat) and new items of a catalog with orders have no co-purchase
evidence. The content fallback (:func:`bundlerec_export.complements.related_from_index`) returns the
anchor's nearest neighbours, i.e. *substitutes* ("Living Basil" -> "Basil Leaves"). This module learns
complementarity from another catalog's orders (Instacart) and transfers it through the title encoder.

Model (asymmetric two-tower, linear)::

    score(a, c) = (e_a W_a) . (e_c W_c) + e_c . w_b + b0 [+ gamma * log1p(orders_c)]

``e`` = the catalog's L2-normalised 384-d MiniLM title embeddings (``embeddings.npy``), ``W_a`` / ``W_c``
separate anchor and complement projections (384 x ``dim``), so score(a, c) != score(c, a) and a title is
not its own best complement; ``w_b`` a content prior ("things people add to baskets": milk, bananas), and
optionally a popularity prior ``gamma`` for candidates that do have orders.

Training (:func:`train_cold_start`): for every anchor with co-purchases, the target distribution is its
cross-category co-occurrence counts with pairs bought together in >= ``min_support`` baskets (default 2),
and the loss is the full softmax cross-entropy over every catalog item (numpy, Adam). Every other item is a
negative, among them all same-category items (the substitutes: explicit hard negatives, they carry no target
mass even when they co-occur) and the popular items (popularity-matched negatives for free, the softmax
normaliser is over the whole catalog). Anchor rows are weighted by ``support ** anchor_power``.

Serving lists (:func:`cold_start_complements`): per anchor the ``top_k`` best-scoring candidates, excluding

* the anchor itself;
* **same category** — the item's category where it is known, else a cluster of the title embeddings
  (:func:`substitute_groups`: seeded spherical k-means, about ``cluster_size`` items per cluster), i.e.
  "same product type";
* **near-duplicate titles** — cosine(e_a, e_c) >= ``dup_cosine`` (0.8) or token Jaccard >= ``dup_jaccard``
  (0.5).

``strength`` = exp(score - best score of the anchor's list), in (0, 1], best first = 1; ``support`` = 0 (no
co-purchase evidence). The model file is a small ``.npz`` (:meth:`ColdStartModel.save` / :meth:`load`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from bundlerec_server.artifact import Complements

logger = logging.getLogger(__name__)

COLD_START_METHOD = "cold_start_two_tower"
MODEL_FILE = Path(__file__).parent / "models" / "cold_start_instacart.npz"
_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass
class ColdStartModel:
    """Asymmetric two-tower complement scorer over title embeddings (see module docstring)."""

    w_anchor: np.ndarray  # (emb_dim, dim)
    w_comp: np.ndarray  # (emb_dim, dim)
    w_bias: np.ndarray  # (emb_dim,)
    b0: float = 0.0
    gamma: float = 0.0  # weight of log1p(orders) of a candidate; 0 = content only
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def emb_dim(self) -> int:
        return int(self.w_anchor.shape[0])

    def anchor_vectors(self, emb: np.ndarray) -> np.ndarray:
        return np.asarray(emb, dtype=np.float32) @ self.w_anchor

    def comp_vectors(self, emb: np.ndarray) -> np.ndarray:
        return np.asarray(emb, dtype=np.float32) @ self.w_comp

    def comp_prior(self, emb: np.ndarray, popularity: np.ndarray | None = None) -> np.ndarray:
        prior = np.asarray(emb, dtype=np.float32) @ self.w_bias + np.float32(self.b0)
        if popularity is not None and self.gamma:
            prior = prior + np.float32(self.gamma) * np.log1p(np.asarray(popularity, dtype=np.float32))
        return prior.astype(np.float32)

    def score(self, emb_a: np.ndarray, emb_c: np.ndarray, popularity: np.ndarray | None = None) -> np.ndarray:
        """(len(emb_a), len(emb_c)) scores; higher = better complement of the row's anchor."""
        return self.anchor_vectors(emb_a) @ self.comp_vectors(emb_c).T + self.comp_prior(emb_c, popularity)[None, :]

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, w_anchor=self.w_anchor.astype(np.float32), w_comp=self.w_comp.astype(np.float32),
                                w_bias=self.w_bias.astype(np.float32), b0=np.float32(self.b0),
                                gamma=np.float32(self.gamma), meta=np.asarray(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | Path) -> ColdStartModel:
        with np.load(path) as z:
            return cls(z["w_anchor"].astype(np.float32), z["w_comp"].astype(np.float32), z["w_bias"].astype(np.float32),
                       float(z["b0"]), float(z["gamma"]), json.loads(str(z["meta"])))


def load_default_model() -> ColdStartModel:
    """The shipped model (trained on all Instacart orders, see docs/cold-start.md)."""
    return ColdStartModel.load(MODEL_FILE)


# ------------------------------------------------------------------------------------------------ training


def category_codes(categories: Sequence[str] | None, n: int) -> np.ndarray:
    """Integer code per item, -1 where unknown."""
    if categories is None:
        return np.full(n, -1, dtype=np.int64)
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(c, len(table)) if c else -1 for c in categories], dtype=np.int64)


def cooccurrence_targets(baskets: Sequence[Sequence[int]], n_items: int, categories: Sequence[str] | None = None,
                         min_support: int = 2) -> sp.csr_matrix:
    """items x items CSR: baskets containing both (>= ``min_support``), other categories only, no diagonal."""
    rows, cols = [], []
    for b in baskets:
        u = np.unique(np.asarray(list(b), dtype=np.int64))
        if len(u) < 2:
            continue
        i, j = np.meshgrid(u, u, indexing="ij")
        off = i != j
        rows.append(i[off])
        cols.append(j[off])
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float64)
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n_items, n_items))
    m.sum_duplicates()
    codes = category_codes(categories, n_items)
    coo = m.tocoo()
    keep = coo.data >= min_support
    ca, cb = codes[coo.row], codes[coo.col]
    keep &= (ca < 0) | (cb < 0) | (ca != cb)
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=(n_items, n_items))


@dataclass
class TrainConfig:
    dim: int = 64
    epochs: int = 40
    batch: int = 256
    lr: float = 0.03
    l2: float = 1e-5
    anchor_power: float = 1.0  # anchor row weight = (co-purchase support) ** power
    min_support: int = 2
    use_popularity: bool = False  # learn gamma on log1p(orders) of the candidate
    seed: int = 0


def train_cold_start(embeddings: np.ndarray, baskets: Sequence[Sequence[int]], categories: Sequence[str] | None = None,
                     cfg: TrainConfig | None = None, *, candidates: np.ndarray | None = None,
                     progress: bool = False) -> tuple[ColdStartModel, dict[str, Any]]:
    """Fits the two-tower model on the baskets' cross-category co-purchases (see module docstring).

    ``candidates``: boolean mask of the items the softmax runs over (default: items in any basket)."""
    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    emb = np.asarray(embeddings, dtype=np.float32)
    n, e_dim = emb.shape
    targets = cooccurrence_targets(baskets, n, categories, cfg.min_support)
    counts = np.zeros(n)
    for b in baskets:
        counts[np.unique(np.asarray(list(b), dtype=np.int64))] += 1
    cand = np.flatnonzero(counts > 0 if candidates is None else np.asarray(candidates, dtype=bool))
    pos = {int(c): k for k, c in enumerate(cand)}
    t = targets[:, cand].tocsr()
    support = np.asarray(t.sum(axis=1)).ravel()
    anchors = np.flatnonzero(support > 0)
    if len(anchors) == 0:
        raise ValueError("no co-purchase pairs to train on")
    weight = support[anchors] ** cfg.anchor_power
    weight = weight / weight.mean()
    rng = np.random.default_rng(cfg.seed)
    scale = 1.0 / np.sqrt(e_dim)
    params = {"wa": rng.normal(0, scale, (e_dim, cfg.dim)).astype(np.float32),
              "wc": rng.normal(0, scale, (e_dim, cfg.dim)).astype(np.float32),
              "wb": np.zeros(e_dim, dtype=np.float32), "b0": np.zeros(1, dtype=np.float32),
              "g": np.zeros(1, dtype=np.float32)}
    adam = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    ec = emb[cand]
    logpop = np.log1p(counts[cand]).astype(np.float32) if cfg.use_popularity else np.zeros(len(cand), np.float32)
    self_col = np.asarray([pos.get(int(a), -1) for a in anchors])
    losses = []
    step = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(anchors))
        total, wsum = 0.0, 0.0
        for s in range(0, len(order), cfg.batch):
            idx = order[s : s + cfg.batch]
            rows = anchors[idx]
            w = weight[idx].astype(np.float32)
            tb = t[rows].toarray().astype(np.float32)
            tb /= tb.sum(axis=1, keepdims=True)
            ea = emb[rows]
            u = ea @ params["wa"]
            v = ec @ params["wc"]
            logits = u @ v.T + (ec @ params["wb"] + params["b0"][0] + params["g"][0] * logpop)[None, :]
            sc = self_col[idx]
            has = sc >= 0
            logits[np.flatnonzero(has), sc[has]] = -1e9
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            total += float(-(w[:, None] * tb * np.log(p + 1e-12)).sum())
            wsum += float(w.sum())
            g = (p - tb) * (w / w.sum())[:, None]
            gbias = g.sum(axis=0)
            grads = {"wa": ea.T @ (g @ v), "wc": ec.T @ (g.T @ u), "wb": ec.T @ gbias,
                     "b0": np.asarray([gbias.sum()], np.float32), "g": np.asarray([gbias @ logpop], np.float32)}
            step += 1
            for k, gr in grads.items():
                if k in ("wa", "wc", "wb"):
                    gr = gr + cfg.l2 * params[k]
                m1, m2 = adam[k]
                m1 *= 0.9
                m1 += 0.1 * gr
                m2 *= 0.999
                m2 += 0.001 * gr * gr
                params[k] -= (cfg.lr * (m1 / (1 - 0.9**step)) / (np.sqrt(m2 / (1 - 0.999**step)) + 1e-8)).astype(np.float32)
        losses.append(total / max(wsum, 1e-12))
        if progress:
            logger.info("cold-start epoch %d: loss %.4f", epoch + 1, losses[-1])
    meta = {"method": COLD_START_METHOD, "config": cfg.__dict__, "anchors": int(len(anchors)),
            "candidates": int(len(cand)), "pairs": int(t.nnz), "loss": [round(x, 4) for x in losses],
            "seconds": round(time.perf_counter() - t0, 1)}
    model = ColdStartModel(params["wa"], params["wc"], params["wb"], float(params["b0"][0]),
                           float(params["g"][0]) if cfg.use_popularity else 0.0, meta)
    return model, meta


# ------------------------------------------------------------------------------------------------ serving


@dataclass
class GroupPrior:
    """Category-level complementarity: ``log_p[g, h]`` = log P(category h | category g) of cross-category
    co-purchases (add-``alpha`` smoothed), added ``weight`` times to score(a, c) where both categories are known."""

    codes: np.ndarray  # group per item, -1 unknown
    log_p: np.ndarray  # (groups, groups)
    weight: float = 1.0

    def of(self, rows: np.ndarray) -> np.ndarray:
        ga = self.codes[rows]
        out = self.log_p[np.maximum(ga, 0)][:, np.maximum(self.codes, 0)] * np.float32(self.weight)
        out[(ga < 0)[:, None] | (self.codes < 0)[None, :]] = 0.0
        return out.astype(np.float32)


def group_prior_from_orders(baskets: Sequence[Sequence[int]], categories: Sequence[str], alpha: float = 1.0,
                            weight: float = 1.0) -> GroupPrior:
    codes = category_codes(categories, len(categories))
    g = int(codes.max(initial=-1)) + 1
    t = cooccurrence_targets(baskets, len(categories), categories, min_support=1).tocoo()
    ga, gb = codes[t.row], codes[t.col]
    ok = (ga >= 0) & (gb >= 0)
    m = np.zeros((g, g))
    np.add.at(m, (ga[ok], gb[ok]), t.data[ok])
    m += alpha
    np.fill_diagonal(m, 0.0)
    p = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
    return GroupPrior(codes, np.log(np.maximum(p, 1e-12)).astype(np.float32), weight)



AISLE_CONTEXT_METHOD = "aisle_context_lift"


@dataclass
class AisleContext:
    """Anchor-context term for anchors without orders of their own: ``log_lift[A, c]`` =
    log(P(c | A) / P(c)), A = the anchor's category, from the baskets holding c and another item of A
    (:func:`aisle_context_from_orders`); added ``weight`` (beta) times to score(a, c). 0 where the anchor's
    category is unknown or the candidate has no orders."""

    codes: np.ndarray  # category per item, -1 unknown
    log_lift: np.ndarray  # (categories, items) float32
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def of(self, rows: np.ndarray) -> np.ndarray:
        ga = self.codes[rows]
        out = self.log_lift[np.maximum(ga, 0)] * np.float32(self.weight)
        out[ga < 0] = 0.0
        return out.astype(np.float32, copy=False)

    def with_weight(self, weight: float) -> AisleContext:
        return AisleContext(self.codes, self.log_lift, float(weight), self.meta)


def aisle_item_counts(baskets: Sequence[Sequence[int]], categories: Sequence[str],
                      n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_ac, n_a, n_c): ``n_ac[A, c]`` = baskets holding c and at least one OTHER item of category A (c is not
    its own evidence), ``n_a[A]`` = baskets holding an item of A, ``n_c[c]`` = baskets holding c."""
    codes = category_codes(categories, n_items)
    g = int(codes.max(initial=-1)) + 1
    rows, cols = [], []
    for k, b in enumerate(baskets):
        u = np.unique(np.asarray(list(b), dtype=np.int64))
        rows.append(np.full(len(u), k, dtype=np.int64))
        cols.append(u)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    items = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(baskets), n_items))
    n_c = np.asarray(items.sum(axis=0)).ravel()
    known = codes[c] >= 0
    per_cat = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (r[known], codes[c][known])),
                            shape=(len(baskets), g))
    per_cat.sum_duplicates()
    has1 = (per_cat >= 1).astype(np.float32)
    has2 = (per_cat >= 2).astype(np.float32)
    n_ac = np.asarray((has1.T @ items).todense(), dtype=np.float64)
    own = np.flatnonzero(codes >= 0)
    if len(own):  # c in A itself: another item of A is needed, i.e. >= 2 items of A in the basket
        same = np.asarray((has2.T @ items[:, own]).todense(), dtype=np.float64)
        n_ac[codes[own], own] = same[codes[own], np.arange(len(own))]
    n_a = np.asarray(has1.sum(axis=0)).ravel().astype(np.float64)
    return n_ac, n_a, n_c.astype(np.float64)


def aisle_context_from_orders(baskets: Sequence[Sequence[int]], categories: Sequence[str], alpha: float = 100.0,
                              weight: float = 1.0) -> AisleContext:
    """:class:`AisleContext` with P(c | A) = (n(A, c) + alpha P(c)) / (n(A) + alpha), P(c) = n(c) / baskets."""
    n = len(categories)
    n_ac, n_a, n_c = aisle_item_counts(baskets, categories, n)
    p_c = n_c / max(len(baskets), 1)
    p_ca = (n_ac + alpha * p_c[None, :]) / (n_a[:, None] + alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(p_c[None, :] > 0, np.log(np.maximum(p_ca, 1e-300) / np.maximum(p_c[None, :], 1e-300)), 0.0)
    meta = {"method": AISLE_CONTEXT_METHOD, "alpha": alpha, "baskets": len(baskets), "categories": int(len(n_a)),
            "formula": "log(P(c|A)/P(c)), P(c|A) = (n(A,c) + alpha P(c)) / (n(A) + alpha), "
                       "n(A,c) = baskets with c and another item of the anchor's category A"}
    return AisleContext(category_codes(categories, n), lift.astype(np.float32), weight, meta)


NEIGHBOUR_CONTEXT_METHOD = "title_neighbour_context_lift"


@dataclass
class NeighbourContext:
    """Title-neighbour context for anchors without orders: N(a) = the anchor's ``k`` nearest titles among the
    items WITH orders (same category where known), P(c | N(a)) = (sum_j C[j, c] + alpha P0(c)) / (sum_j n(j) +
    alpha), C = baskets holding both; P0 = the category context's P(c | A) (``base``) or P(c). ``of(rows)`` =
    ``weight`` * log(P(c | N(a)) / P(c)), 0 for candidates without orders."""

    embeddings: np.ndarray
    cooc: sp.csr_matrix  # items x items, baskets holding both, zero diagonal
    counts: np.ndarray  # baskets holding the item
    n_baskets: int
    codes: np.ndarray  # category per item, -1 unknown
    k: int = 20
    alpha: float = 100.0
    weight: float = 1.0
    base: AisleContext | None = None

    def with_params(self, alpha: float | None = None, weight: float | None = None) -> NeighbourContext:
        return NeighbourContext(self.embeddings, self.cooc, self.counts, self.n_baskets, self.codes, self.k,
                                self.alpha if alpha is None else alpha, self.weight if weight is None else weight,
                                self.base)

    def neighbours(self, rows: np.ndarray) -> sp.csr_matrix:
        """(len(rows), items) 0/1: the ``k`` nearest warm titles of each row (itself excluded)."""
        emb = self.embeddings
        sims = np.asarray(emb[rows], dtype=np.float32) @ np.asarray(emb, dtype=np.float32).T
        sims[:, self.counts <= 0] = -np.inf
        sims[np.arange(len(rows)), rows] = -np.inf
        ga = self.codes[rows]
        sims[(ga[:, None] >= 0) & (ga[:, None] != self.codes[None, :])] = -np.inf
        k = min(self.k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ok = np.isfinite(np.take_along_axis(sims, top, axis=1))
        r = np.repeat(np.arange(len(rows)), k)[ok.ravel()]
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, top.ravel()[ok.ravel()])), shape=sims.shape)

    def of(self, rows: np.ndarray) -> np.ndarray:
        nb = self.neighbours(rows)
        num = np.asarray((nb @ self.cooc).todense(), dtype=np.float32)
        den = np.asarray(nb @ self.counts, dtype=np.float32).ravel()
        p_c = (np.asarray(self.counts, dtype=np.float32) / max(self.n_baskets, 1))[None, :]
        p0 = p_c if self.base is None else p_c * np.exp(self.base.with_weight(1.0).of(rows))
        p = (num + np.float32(self.alpha) * p0) / (den[:, None] + np.float32(self.alpha))
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(p_c > 0, np.log(np.maximum(p, 1e-30) / np.maximum(p_c, 1e-30)), 0.0)
        return (np.float32(self.weight) * lift).astype(np.float32)


def neighbour_context_from_orders(embeddings: np.ndarray, baskets: Sequence[Sequence[int]],
                                  categories: Sequence[str] | None, k: int = 20, alpha: float = 100.0,
                                  weight: float = 1.0, base: AisleContext | None = None) -> NeighbourContext:
    n = len(embeddings)
    cooc = cooccurrence_targets(baskets, n, None, min_support=1).astype(np.float32).tocsr()
    counts = np.zeros(n, dtype=np.float32)
    for b in baskets:
        counts[np.unique(np.asarray(list(b), dtype=np.int64))] += 1
    return NeighbourContext(np.asarray(embeddings, dtype=np.float32), cooc, counts, len(baskets),
                            category_codes(categories, n), k, alpha, weight, base)



@dataclass(frozen=True)
class ContextConfig:
    """The list of a never-ordered item in a catalog with orders: log1p(orders_c) + ``beta`` * log lift of c
    given the anchor's context, ``kind`` = "aisle" (:class:`AisleContext`, smoothing ``aisle_alpha``) or
    "neighbour" (:class:`NeighbourContext`, ``k`` titles, smoothing ``alpha`` toward the aisle context).
    Defaults: the validation choice of ``benchmarks/cold_start_eval.py`` (docs/cold-start.md)."""

    kind: str = "aisle"
    aisle_alpha: float = 1000.0
    beta: float = 0.5
    k: int = 20
    alpha: float = 1000.0

    def context(self, embeddings: np.ndarray, baskets: Sequence[Sequence[int]],
                categories: Sequence[str] | None) -> AisleContext | NeighbourContext | None:
        if self.kind not in ("aisle", "neighbour"):
            raise ValueError(f"unknown context kind {self.kind!r}")
        aisle = aisle_context_from_orders(baskets, categories, self.aisle_alpha) if categories is not None else None
        if self.kind == "aisle":
            return aisle.with_weight(self.beta) if aisle is not None else None
        return neighbour_context_from_orders(embeddings, baskets, categories, self.k, self.alpha, self.beta, base=aisle)


# the served ContextConfig's figures (benchmarks/cold_start_eval.py, docs/results/cold-start.json): Instacart,
# user-level split, 20 % of products cold (their orders hidden), other-aisle targets, lists cut at 20
CONTEXT_VALIDATION: dict[str, Any] = {
    "chosen_on": "validation baskets with a cold anchor (704 anchors), grid alpha {10, 100, 1000} x beta "
                 "{0, 0.25, 0.5, 0.75, 1, 1.5}, lifts from the fit baskets",
    "validation_r5": {"chosen": 0.0477, "beta_0_popularity": 0.0473},
    "test_r5": 0.0490, "test_r5_x_popularity": [1.00, 0.99, 1.02],
    "test_r5_x_learned_never_ordered": [1.03, 1.01, 1.05],
    "source": "docs/cold-start.md",
}


def context_complements(embeddings: np.ndarray, categories: Sequence[str] | None, titles: Sequence[str],
                        baskets: Sequence[Sequence[int]], cfg: ContextConfig | None = None, *, top_k: int = 20,
                        anchors: np.ndarray | None = None) -> tuple[Complements, dict[str, Any]]:
    """Complements of ``anchors`` (default: the items in no basket) from popularity and the anchor's context alone
    (no content model, no order of the anchor): candidates are the items with orders, substitutes excluded as in
    :func:`cold_start_complements`. Also the manifest entry (method and settings)."""
    cfg = cfg or ContextConfig()
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    counts = np.zeros(n, dtype=np.float32)
    for b in baskets:
        counts[np.unique(np.asarray(list(b), dtype=np.int64))] += 1
    ctx = cfg.context(emb, baskets, categories)
    zero = np.zeros((emb.shape[1], 1), np.float32)
    popularity_only = ColdStartModel(zero, zero, np.zeros(emb.shape[1], np.float32), gamma=1.0)
    comps = cold_start_complements(emb, categories, titles, popularity_only, top_k=top_k,
                                   anchors=counts == 0 if anchors is None else anchors, candidates=counts > 0,
                                   popularity=counts, context=ctx)
    method = AISLE_CONTEXT_METHOD if cfg.kind == "aisle" else NEIGHBOUR_CONTEXT_METHOD
    info = {"method": method if ctx is not None else "popularity", "config": dict(cfg.__dict__),
            "score": "log1p(orders_c) + beta * log(P(c | context of a) / P(c))", "from_orders": True,
            "anchor_orders_used": False}
    return comps, info



def spherical_kmeans(emb: np.ndarray, k: int, seed: int = 0, iters: int = 15) -> np.ndarray:
    """Cluster label per row (cosine k-means, seeded k-means++-lite init: random distinct rows)."""
    x = np.asarray(emb, dtype=np.float32)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(n, size=k, replace=False)].copy()
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        labels = np.concatenate([np.argmax(x[s : s + 4096] @ centers.T, axis=1) for s in range(0, n, 4096)])
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        centers = np.where(empty[:, None], centers, sums / np.maximum(norms, 1e-12))
    return labels


def substitute_groups(embeddings: np.ndarray, categories: Sequence[str] | None = None, *,
                      cluster_size: int = 250, seed: int = 0) -> np.ndarray:
    """Group code per item for the "same category" rule: the category where known, else a title-embedding
    cluster (codes offset past the category codes, so a known and a clustered item never match)."""
    n = len(embeddings)
    codes = category_codes(categories, n)
    missing = codes < 0
    if missing.any():
        rows = np.flatnonzero(missing)
        labels = spherical_kmeans(embeddings[rows], max(1, round(len(rows) / cluster_size)), seed=seed)
        codes[rows] = int(codes.max(initial=-1)) + 1 + labels
    return codes


def title_tokens(titles: Sequence[str]) -> list[frozenset[str]]:
    return [frozenset(_TOKEN.findall((t or "").lower())) for t in titles]


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


@dataclass(frozen=True)
class HubCorrection:
    """Anti-hub correction of the cold-start score for a foreign catalog (docs/cold-start.md, "Hubs").

    ``prior_weight`` scales the learned content prior ``e_c . w_b`` (0 drops it: "things people add to grocery
    baskets" says nothing about hardware); ``csls_k`` > 0 subtracts ``csls_weight`` times each candidate's
    mean of its ``csls_k`` best scores over a seeded sample of ``sample`` anchors (CSLS, Conneau et al. 2018):
    a candidate that scores high for every anchor (a hub) is pushed down, one that fits few anchors is not."""

    prior_weight: float = 1.0
    csls_k: int = 0
    csls_weight: float = 1.0
    sample: int = 4096
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.prior_weight != 1.0 or (self.csls_k > 0 and self.csls_weight != 0.0)


# what a catalog without orders or categories gets (docs/cold-start.md, "Hubs": chosen on Home Depot / Icecat
# hubness with Instacart content-only Recall@5 checked)
FOREIGN_HUB_CORRECTION = HubCorrection(csls_k=10)  # with csls_weight 1 the prior cancels: r_c holds it too


def hub_penalty(u: np.ndarray, v: np.ndarray, prior: np.ndarray, anchors: np.ndarray, k: int, sample: int,
                seed: int = 0, batch: int = 512) -> np.ndarray:
    """Per candidate: the mean of its ``k`` best scores ``u[a] . v[c] + prior[c]`` over a seeded sample of
    ``anchors`` (a != c; the whole catalog in :func:`cold_start_complements`); the CSLS neighbourhood term r_c."""
    rows = np.asarray(anchors, dtype=np.int64)
    if sample and len(rows) > sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
    n = len(v)
    k = max(1, min(k, len(rows)))
    best = np.full((k, n), -np.inf, dtype=np.float32)
    for s in range(0, len(rows), batch):
        r = rows[s : s + batch]
        sc = u[r] @ v.T + prior[None, :]
        sc[np.arange(len(r)), r] = -np.inf
        both = np.concatenate([best, sc], axis=0)
        best = -np.partition(-both, k - 1, axis=0)[:k]
    finite = np.where(np.isfinite(best), best, np.nan)
    with np.errstate(invalid="ignore"):
        out = np.nanmean(finite, axis=0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def hubness(comp: Complements, rows: Sequence[int], k: int = 3, k_occ: int = 10) -> dict[str, Any]:
    """Hub figures of the lists: distinct complements in the first ``k`` of ``rows`` (and the slots), and over
    every anchor of ``comp``: how often the most frequent item appears in a top ``k_occ`` (N_k), the skewness of
    N_k over the catalog, and the share of items that appear in any top ``k_occ``."""
    firsts = [comp.of(int(a))[0][:k] for a in rows]
    slots = int(sum(len(f) for f in firsts))
    distinct = len({int(c) for f in firsts for c in f.tolist()})
    n = len(comp.indptr) - 1
    occ = np.zeros(n, dtype=np.int64)
    for a in range(n):
        np.add.at(occ, comp.of(a)[0][:k_occ], 1)
    mu, sd = occ.mean(), occ.std()
    top = np.argsort(-occ, kind="stable")[:5]
    return {"k": k, "anchors": len(firsts), "slots": slots, "distinct": distinct,
            "k_occ": k_occ, "max_occurrences": int(occ.max(initial=0)),
            "top_items": [[int(i), int(occ[i])] for i in top.tolist()],
            "skewness": float(((occ - mu) ** 3).mean() / sd**3) if sd > 0 else 0.0,
            "coverage": float((occ > 0).mean()) if n else 0.0}


def cold_start_complements(embeddings: np.ndarray, categories: Sequence[str] | None, titles: Sequence[str],
                           model: ColdStartModel, top_k: int = 20, exclude_substitutes: bool = True, *,
                           anchors: np.ndarray | None = None, candidates: np.ndarray | None = None,
                           popularity: np.ndarray | None = None, group_prior: GroupPrior | None = None,
                           context: AisleContext | NeighbourContext | None = None, dup_cosine: float = 0.8, dup_jaccard: float = 0.5,
                           cluster_size: int = 250, seed: int = 0, pool: int = 200, batch: int = 1024,
                           hub: HubCorrection | None = None, groups: np.ndarray | None = None) -> Complements:
    """Complements CSR (``artifact.Complements``) from the cold-start model, for ``anchors`` (boolean mask or
    row array; default every item) — other rows get empty lists. ``candidates`` (boolean mask) limits the
    complements (default: every item). With ``exclude_substitutes`` the anchor's group (category, else title
    cluster; or ``groups`` given) and near-duplicate titles are never listed (rule in the module docstring).
    ``hub``: the anti-hub correction (:class:`HubCorrection`)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    if len(titles) != n:
        raise ValueError("titles must give one title per embedding row")
    if emb.shape[1] != model.emb_dim:
        raise ValueError(f"embeddings have dim {emb.shape[1]}, the model expects {model.emb_dim}")
    if anchors is None:
        rows_all = np.arange(n)
    else:
        a = np.asarray(anchors)
        rows_all = np.flatnonzero(a) if a.dtype == bool else np.unique(a.astype(np.int64))
    cand_mask = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).copy()
    if exclude_substitutes and groups is None:
        groups = substitute_groups(emb, categories, cluster_size=cluster_size, seed=seed)
    elif not exclude_substitutes:
        groups = None
    tokens = title_tokens(titles) if exclude_substitutes else []
    u = model.anchor_vectors(emb)
    v = model.comp_vectors(emb)
    prior = model.comp_prior(emb, popularity)
    if hub is not None and hub.prior_weight != 1.0:
        prior = prior - np.float32(1.0 - hub.prior_weight) * (emb @ model.w_bias)
    if hub is not None and hub.csls_k > 0 and hub.csls_weight:
        prior = prior - np.float32(hub.csls_weight) * hub_penalty(u, v, prior, np.arange(n), hub.csls_k, hub.sample,
                                                                  hub.seed)
    prior = np.where(cand_mask, prior, -np.inf).astype(np.float32)
    pool = min(max(pool, top_k), n)
    counts = np.zeros(n, dtype=np.int64)
    out_cols: list[np.ndarray] = []
    out_str: list[np.ndarray] = []
    for s in range(0, len(rows_all), batch):
        rows = rows_all[s : s + batch]
        sc = u[rows] @ v.T + prior[None, :]
        if group_prior is not None:
            sc += group_prior.of(rows)
        if context is not None and context.weight:
            sc += context.of(rows)
        sc[np.arange(len(rows)), rows] = -np.inf
        if groups is not None:
            sc[groups[rows][:, None] == groups[None, :]] = -np.inf
        top = np.argpartition(-sc, pool - 1, axis=1)[:, :pool] if pool < n else np.tile(np.arange(n), (len(rows), 1))
        for r, (row, cols) in enumerate(zip(rows.tolist(), top)):
            cs = sc[r, cols]
            o = np.argsort(-cs, kind="stable")
            cols, cs = cols[o], cs[o]
            ok = np.isfinite(cs)
            cols, cs = cols[ok], cs[ok]
            if exclude_substitutes and len(cols):
                keep = emb[cols] @ emb[row] < dup_cosine
                kept = 0
                for j, c in enumerate(cols.tolist()):  # Jaccard only until top_k are kept (same lists, less work)
                    if kept >= top_k:
                        keep[j:] = False
                        break
                    if keep[j]:
                        keep[j] = _jaccard(tokens[row], tokens[c]) < dup_jaccard
                        kept += int(keep[j])
                cols, cs = cols[keep], cs[keep]
            cols, cs = cols[:top_k], cs[:top_k]
            counts[row] = len(cols)
            out_cols.append(cols.astype(np.int32))
            out_str.append(np.clip(np.exp(cs - cs[0]), 1e-6, 1.0).astype(np.float32) if len(cs) else np.zeros(0, np.float32))
    # rows_all is sorted and unique, so the lists are already in row order
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    idx = np.concatenate(out_cols) if out_cols else np.zeros(0, np.int32)
    strength = np.concatenate(out_str) if out_str else np.zeros(0, np.float32)
    return Complements(indptr, idx.astype(np.int32), strength.astype(np.float32), np.zeros(len(idx), dtype=np.int32))


def fill_empty_rows(primary: Complements, fallback: Complements,
                    rows: np.ndarray | None = None) -> tuple[Complements, np.ndarray]:
    """``primary``'s lists where it has any, else ``fallback``'s (same catalog); also the mask of filled rows.
    With ``rows`` (boolean mask) ``fallback``'s non-empty lists replace ``primary``'s on those rows instead.
    The build: mined/learned complements first, cold-start lists for the items without order evidence."""
    if len(primary.indptr) != len(fallback.indptr):
        raise ValueError("primary and fallback must cover the same catalog")
    use = np.diff(primary.indptr) == 0 if rows is None else np.asarray(rows, dtype=bool).copy()
    use &= np.diff(fallback.indptr) > 0
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    counts = np.zeros(len(use), dtype=np.int64)
    for row in range(len(use)):
        part = (fallback if use[row] else primary).of(row)
        counts[row] = len(part[0])
        parts.append(part)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def cat(k: int, dtype: type) -> np.ndarray:
        return np.concatenate([p[k] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)

    return Complements(indptr, cat(0, np.int32), cat(1, np.float32), cat(2, np.int32)), use


def substitute_share(comp: Complements, groups: np.ndarray, embeddings: np.ndarray, titles: Sequence[str],
                     rows: Sequence[int], k: int = 5, dup_cosine: float = 0.8, dup_jaccard: float = 0.5) -> dict[str, Any]:
    """Share of the first ``k`` complements of ``rows`` that are substitutes: same group, or near-duplicate title."""
    tokens = title_tokens(titles)
    same = dup = either = total = 0
    for a in rows:
        for c in comp.of(int(a))[0][:k].tolist():
            g = bool(groups[a] >= 0 and groups[a] == groups[c])
            d = float(embeddings[a] @ embeddings[c]) >= dup_cosine or _jaccard(tokens[a], tokens[c]) >= dup_jaccard
            total += 1
            same += int(g)
            dup += int(d)
            either += int(g or d)
    return {"k": k, "pairs": total, "same_group": same / total if total else None,
            "near_duplicate": dup / total if total else None, "substitute": either / total if total else None}

"""Learned complements: LightGBM LambdaRank over pair features, trained on each shopper's latest order.

Pipeline (:func:`rank_complements`; every step is a function the benchmark reuses):

1. **Split** (:func:`bundlerec_export.splits.latest_per_user`): the latest basket of every shopper with >= 2
   baskets is the *label* basket; the rest are the *fit* baskets.
2. **Candidates** (:class:`CandidateModel` mined on the fit baskets): for each anchor the union of the top
   ``n_candidates`` of raw co-occurrence, smoothed conditional probability (with aisle-pair backoff and
   popularity exponent), EASE, and the ``fill`` best aisle-pair backoff items (so a rare anchor still gets
   a full list); other aisles only when ``cross_aisle``.
3. **Labels**: one query per (label basket, anchor in it); a candidate is relevant when it is in that
   basket (other aisle than the anchor when ``cross_aisle``). Features
   (:data:`bundlerec_export.complement_features.FEATURES`) come from the fit baskets ONLY, so no label
   basket is counted in its own features. (``leave_shopper_out`` would also drop the label shopper's other
   baskets; measured worse, see ``RankerConfig``.)
4. **Train** LambdaRank (``lightgbm``) on the queries of ~80 % of the label shoppers (hash of the user id),
   early-stopped on NDCG@5 of the other ~20 %, whose Recall@5/10 are reported against the scorers.
5. **Serve**: the candidates and features are RE-MINED on ALL baskets (fit + label baskets: at serving
   time there is nothing held out) and the model ranks each anchor's candidates; the best ``top_k`` per
   anchor become the :class:`Complements` (strength = model score min-max scaled to (0, 1] over all kept
   pairs, support = baskets containing both). Serving stays a CSR lookup.

Count features grow by about (all baskets / fit baskets) between training and serving; the ratio-type
features (P(b|a), lift, NPMI, Jaccard, shares) do not. The benchmark measures the served lists on a test
split that neither step saw.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bundlerec_export import complement_features as cf
from bundlerec_export.splits import latest_per_user
from bundlerec_server.artifact import Complements

logger = logging.getLogger(__name__)

METHOD = "lambdarank"


@dataclass
class RankerConfig:
    top_k: int = 20
    n_candidates: int = 50
    fill: int = 50
    cross_aisle: bool = True
    # scorer settings chosen on validation in benchmarks/bundle_quality.py (user split), see docs/bundles.md
    cond_alpha: float = 20.0
    cond_beta: float = 0.0
    cond_weighted: bool = True
    ease_lambda: float = 8000.0
    ease_items: int = 3000
    num_leaves: int = 15
    learning_rate: float = 0.05
    min_data_in_leaf: int = 50
    max_rounds: int = 400
    early_stopping: int = 40
    holdout_pct: float = 20.0
    seed: int = 0
    threads: int = 2
    features: tuple[str, ...] = field(default_factory=lambda: cf.FEATURES)
    chunk: int = 2000  # anchors per scoring chunk
    # a label basket's features without its own shopper's other baskets. OFF: measured worse (train/serve skew,
    # docs/bundles.md): the subtraction leaves the aisle backoff and EASE with the shopper's counts, so the
    # model learns to spot the shopper's own earlier purchases, a signal the served (population) lists lack
    leave_shopper_out: bool = False
    # never-ordered anchors of one aisle share every pair feature but title overlap: score one per aisle (its
    # title ignored) and give the others its list, instead of scoring each (build time, docs/bundles.md)
    share_unordered: bool = True


def _hash_pct(key: str, salt: str = "complement-ranker") -> float:
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2.0**64 * 100.0


class CandidateModel:
    """Pair statistics + scorers mined on one set of baskets; gives candidates and features per anchor."""

    def __init__(self, baskets: Sequence[Sequence[int]], n_items: int, cfg: RankerConfig, *,
                 users: Sequence[str] | None = None, aisles: Sequence[str] | None = None,
                 departments: Sequence[str] | None = None, tokens: Sequence[frozenset[str]] | None = None):
        self.cfg, self.n_items, self.tokens = cfg, n_items, tokens
        self.stats = cf.pair_stats(baskets, n_items, users, aisles, departments)
        self.cond = cf.conditional_scores(self.stats, cfg.cond_alpha, cfg.cond_beta, cfg.cond_weighted, cfg.fill,
                                          cfg.cross_aisle)
        self.ease = cf.ease_model(baskets, n_items, cfg.ease_lambda, cfg.ease_items)
        self.fill = cf.aisle_fill(self.stats, cfg.fill, cfg.cross_aisle)
        self._by_shopper: dict[str, list[int]] | None = None

    def candidates(self, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anchor, candidate) pairs for ``anchors``, sorted by anchor then candidate."""
        st, k = self.stats, self.cfg.n_candidates
        aisle = st.aisle_code if self.cfg.cross_aisle else None
        lists = [cf.top_lists(m, k, aisle, st.counts, anchors)
                 for m in (st.C, self.cond, self.ease.matrix(self.n_items, k))]
        lists.append(cf.top_lists(self.fill, self.cfg.fill, aisle, st.counts, anchors))
        return cf.union_candidates(lists, self.n_items)

    def features(self, rows: np.ndarray, cols: np.ndarray, shopper: str | None = None) -> np.ndarray:
        """Features of (rows, cols); with ``shopper``, as if that shopper's baskets had not been mined."""
        minus = None
        if shopper is not None:
            if self._by_shopper is None:
                self._by_shopper = {}
                for k, u in enumerate(self.stats.basket_users):
                    self._by_shopper.setdefault(u, []).append(k)
            own = self._by_shopper.get(shopper)
            minus = cf.shopper_share(self.stats, np.asarray(own), rows, cols) if own else None
        c = self.cfg
        x = cf.pair_features(self.stats, rows, cols, tokens=self.tokens, ease=self.ease,
                             cond_params=(c.cond_alpha, c.cond_beta, c.cond_weighted), minus=minus)
        keep = [cf.FEATURES.index(f) for f in self.cfg.features]
        return x[:, keep]


def _label_queries(model: CandidateModel, baskets: Sequence[Sequence[int]],
                   users: Sequence[str] | None = None) -> dict[str, Any]:
    """Candidates + features for every distinct anchor of ``baskets``; one query per (basket, anchor).
    With ``users`` (and ``cfg.leave_shopper_out``) each basket's features leave out its shopper's baskets."""
    anchors = np.unique(np.concatenate([np.asarray(list(b), dtype=np.int64) for b in baskets]))
    rows, cols = model.candidates(anchors)
    start = np.searchsorted(rows, np.arange(model.n_items + 1))
    per_basket = users is not None and model.cfg.leave_shopper_out
    blocks = [] if per_basket else [model.features(rows, cols)]
    offset = 0
    aisle = model.stats.aisle_code
    idx, labels, group, qbasket, n_targets, q_cols = [], [], [], [], [], []
    for k, b in enumerate(baskets):
        items = list(dict.fromkeys(int(i) for i in b))
        if per_basket:  # this basket's anchors' candidate blocks, one after the other
            sizes = [start[a + 1] - start[a] for a in items]
            local = dict(zip(items, (offset + np.concatenate([[0], np.cumsum(sizes)[:-1]])).tolist()))
            sel = np.concatenate([np.arange(start[a], start[a + 1]) for a in items])
            blocks.append(model.features(rows[sel], cols[sel], (users or [])[k] or None))
            offset += len(sel)
        for a in items:
            targets = {t for t in items if t != a and not (model.cfg.cross_aisle and aisle[a] >= 0 and aisle[t] == aisle[a])}
            if not targets:
                continue
            lo, hi = start[a], start[a + 1]
            if hi == lo:
                continue
            q_cols.append(cols[lo:hi])
            if per_basket:
                lo, hi = local[a], local[a] + (hi - lo)
            idx.append(np.arange(lo, hi))
            labels.append(np.isin(q_cols[-1], list(targets)).astype(np.int32))
            group.append(hi - lo)
            qbasket.append(k)
            n_targets.append(len(targets))
    feats = np.concatenate(blocks) if blocks else np.zeros((0, len(model.cfg.features)), dtype=np.float32)
    return {"X": feats, "q_cols": q_cols, "idx": idx, "labels": labels, "group": np.asarray(group),
            "basket": np.asarray(qbasket, dtype=np.int64), "n_targets": n_targets}


def _stack(q: dict[str, Any], which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sel = np.flatnonzero(which)
    if len(sel) == 0:
        return np.zeros((0, q["X"].shape[1]), dtype=np.float32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    idx = np.concatenate([q["idx"][i] for i in sel])
    return q["X"][idx], np.concatenate([q["labels"][i] for i in sel]), q["group"][sel]


def train_ranker(model: CandidateModel, label_baskets: Sequence[Sequence[int]], label_users: Sequence[str],
                 cfg: RankerConfig) -> tuple[Any, dict[str, Any]]:
    """LambdaRank on (label basket, anchor) queries over ``model``'s candidates; returns (booster, report)."""
    import lightgbm as lgb

    t0 = time.perf_counter()
    q = _label_queries(model, label_baskets, label_users)
    users = np.asarray([label_users[b] or f"#{b}" for b in q["basket"].tolist()], dtype=object)
    holdout = np.asarray([_hash_pct(u) < cfg.holdout_pct for u in users], dtype=bool)
    has_pos = np.asarray([lab.any() for lab in q["labels"]], dtype=bool)
    xt, yt, gt = _stack(q, ~holdout & has_pos)
    xv, yv, gv = _stack(q, holdout & has_pos)
    params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [5, 10], "learning_rate": cfg.learning_rate,
              "num_leaves": cfg.num_leaves, "min_data_in_leaf": cfg.min_data_in_leaf, "feature_fraction": 0.8,
              "bagging_fraction": 0.8, "bagging_freq": 1, "lambdarank_truncation_level": 20, "seed": cfg.seed,
              "deterministic": True, "force_row_wise": True, "num_threads": cfg.threads, "verbose": -1}
    dtrain = lgb.Dataset(xt, yt, group=gt, feature_name=list(cfg.features), free_raw_data=False)
    valid = [lgb.Dataset(xv, yv, group=gv, reference=dtrain)] if len(gv) else []
    callbacks: list[Any] = [lgb.early_stopping(cfg.early_stopping, first_metric_only=True, verbose=False)] if valid else []
    booster = lgb.train(params, dtrain, num_boost_round=cfg.max_rounds, valid_sets=valid, callbacks=callbacks)
    # held-out queries (all of them, also those whose candidates miss every target): recall of the top-K
    report: dict[str, Any] = {
        "queries": int(len(q["group"])), "queries_with_positive": int(has_pos.sum()),
        "train_queries": int(len(gt)), "holdout_queries": int(holdout.sum()), "train_rows": int(len(yt)),
        "best_iteration": int(booster.best_iteration or booster.current_iteration()),
        "candidate_recall": float(np.mean([lab.sum() > 0 for lab in q["labels"]])) if q["labels"] else None,
    }
    hold = np.flatnonzero(holdout)
    if len(hold):
        scores = booster.predict(q["X"], num_iteration=report["best_iteration"], num_threads=cfg.threads)
        feat_cond = cfg.features.index("cond_score") if "cond_score" in cfg.features else None
        rec: dict[str, dict[int, list[float]]] = {n: {5: [], 10: []} for n in ("ranker", "cond_score", "c_ab")}
        for i in hold.tolist():
            ix, lab = q["idx"][i], q["labels"][i]
            total = q["n_targets"][i]
            for name, s in (("ranker", scores[ix]),
                            ("cond_score", q["X"][ix, feat_cond] if feat_cond is not None else None),
                            ("c_ab", q["X"][ix, cfg.features.index("c_ab")] if "c_ab" in cfg.features else None)):
                if s is None:
                    continue
                order = np.lexsort((q["q_cols"][i], -s))
                for k in (5, 10):
                    rec[name][k].append(lab[order[:k]].sum() / total)
        report["holdout_recall"] = {n: {str(k): float(np.mean(v)) for k, v in r.items()} for n, r in rec.items() if r[5]}
    imp = booster.feature_importance("gain")
    report["feature_gain"] = dict(sorted(zip(cfg.features, (float(x) for x in imp)), key=lambda t: -t[1]))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return booster, report


def score_anchors(booster: Any, model: CandidateModel, anchors: np.ndarray, top_k: int,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ranks ``anchors``' candidates with the booster: CSR (indptr over all items, indices, model score,
    support = baskets containing both), best first, at most ``top_k`` each."""
    from tqdm.auto import tqdm

    cfg, n = model.cfg, model.n_items
    anchors = np.unique(np.asarray(anchors, dtype=np.int64))
    parts_r, parts_c, parts_s = [], [], []
    chunks = range(0, len(anchors), cfg.chunk)
    for lo in tqdm(chunks, desc="ranking complements", unit="chunk", disable=not progress):
        rows, cols = model.candidates(anchors[lo:lo + cfg.chunk])
        if len(rows) == 0:
            continue
        s = booster.predict(model.features(rows, cols), num_threads=cfg.threads)
        parts_r.append(rows)
        parts_c.append(cols)
        parts_s.append(s)
    if not parts_r:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0), np.zeros(0, dtype=np.int32)
    rows, cols, s = np.concatenate(parts_r), np.concatenate(parts_c), np.concatenate(parts_s)
    order = np.lexsort((cols, -s, rows))
    rows, cols, s = rows[order], cols[order], s[order]
    per = np.bincount(rows, minlength=n)
    rank = np.arange(len(rows)) - np.repeat(np.concatenate([[0], np.cumsum(per)[:-1]]), per)
    keep = rank < top_k
    rows, cols, s = rows[keep], cols[keep], s[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    support = model.stats.lookup(model.stats.C, rows, cols).astype(np.int32)
    return indptr, cols.astype(np.int32), s, support


def to_complements(indptr: np.ndarray, idx: np.ndarray, score: np.ndarray, support: np.ndarray) -> Complements:
    """Model scores -> strength in (0, 1] (min-max over all kept pairs, floor 1e-3)."""
    if len(score):
        lo, hi = float(score.min()), float(score.max())
        strength = (score - lo) / (hi - lo) if hi > lo else np.ones_like(score)
        strength = np.clip(strength, 1e-3, 1.0)
    else:
        strength = score
    return Complements(indptr, idx, strength.astype(np.float32), support.astype(np.int32))


def rank_complements(
    baskets: Sequence[Sequence[int]],
    n_items: int,
    *,
    users: Sequence[str],
    order_numbers: Sequence[int] | None = None,
    titles: Sequence[str] | None = None,
    aisles: Sequence[str] | None = None,
    departments: Sequence[str] | None = None,
    cfg: RankerConfig | None = None,
    progress: bool = False,
) -> tuple[Complements, dict[str, Any]]:
    """Learned complements for a catalog of ``n_items`` rows from baskets of item rows (see module docstring).

    ``users``: one shopper id per basket ("" unknown); ``order_numbers``: their order within a shopper (None:
    the list order). Returns the top-``cfg.top_k`` Complements for every catalog item (a never-ordered one ranked on its aisle backoff and popularity), and a report
    (``method``, ``config``, ``features``, ``validation`` figures, ``model_text`` = the LightGBM model,
    ``timings_s``) for the manifest."""
    cfg = cfg or RankerConfig()
    t0 = time.perf_counter()
    numbers = list(order_numbers) if order_numbers is not None else list(range(len(baskets)))
    multi = {u for u, c in _user_order_counts(users).items() if c >= 2}
    label_mask = latest_per_user(users, numbers) & np.asarray([bool(u) and u in multi for u in users], dtype=bool)
    fit_idx, lab_idx = np.flatnonzero(~label_mask).tolist(), np.flatnonzero(label_mask).tolist()
    tokens = cf.title_tokens(titles) if titles is not None else None
    fit_model = CandidateModel([baskets[i] for i in fit_idx], n_items, cfg, users=[users[i] for i in fit_idx],
                               aisles=aisles, departments=departments, tokens=tokens)
    t_fit = time.perf_counter()
    booster, val = train_ranker(fit_model, [baskets[i] for i in lab_idx], [users[i] for i in lab_idx], cfg)
    t_train = time.perf_counter()
    counts = np.bincount(np.asarray([i for b in baskets for i in set(b)], dtype=np.int64), minlength=n_items)
    anchors, copy_from = _anchors_to_score(counts, cf.group_codes(aisles, n_items), cfg.share_unordered)
    if copy_from is not None and tokens is not None:  # the representatives' lists must not follow their own titles
        tokens = [frozenset() if copy_from[r] == -2 else t for r, t in enumerate(tokens)]
    full = CandidateModel(baskets, n_items, cfg, users=users, aisles=aisles, departments=departments, tokens=tokens)
    scored = score_anchors(booster, full, anchors, cfg.top_k, progress)  # never-ordered ones: aisle backoff + popularity
    comp = to_complements(*(_copy_rows(*scored, copy_from) if copy_from is not None else scored))
    t_end = time.perf_counter()
    report = {
        "method": METHOD, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "features": list(cfg.features), "fit_baskets": int(len(fit_idx)), "label_baskets": int(len(lab_idx)),
        "validation": val, "anchors": int(np.count_nonzero(np.diff(comp.indptr))), "pairs": int(len(comp.indices)),
        "anchors_scored": int(len(anchors)),
        "model_text": booster.model_to_string(num_iteration=val["best_iteration"]),
        "timings_s": {"mine_fit": round(t_fit - t0, 2), "train": round(t_train - t_fit, 2),
                      "mine_all_and_rank": round(t_end - t_train, 2), "total": round(t_end - t0, 2)},
    }
    logger.info("learned complements: %d pairs for %d anchors in %.1f s", report["pairs"], report["anchors"], t_end - t0)
    return comp, report


def _anchors_to_score(counts: np.ndarray, groups: np.ndarray, share: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The anchors to score and, with ``share``, per row the row whose list it takes (-1: its own; -2: its own,
    and it stands for the never-ordered items of its aisle group). Without never-ordered items: all, None."""
    n = len(counts)
    never = np.flatnonzero(counts == 0)
    if not share or len(never) == 0:
        return np.arange(n), None
    uniq, first, inverse = np.unique(groups[never], return_index=True, return_inverse=True)
    reps = never[first]
    copy_from = np.full(n, -1, dtype=np.int64)
    copy_from[never] = reps[inverse]
    copy_from[reps] = -2
    return np.sort(np.concatenate([np.flatnonzero(counts > 0), reps])), copy_from


def _copy_rows(indptr: np.ndarray, idx: np.ndarray, score: np.ndarray, support: np.ndarray, copy_from: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CSR with every row whose ``copy_from`` is >= 0 replaced by that row's list."""
    n = len(indptr) - 1
    src = np.where(copy_from >= 0, copy_from, np.arange(n))
    lens = np.diff(indptr)[src]
    out_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    take = np.arange(int(out_ptr[-1])) + np.repeat(indptr[src] - out_ptr[:-1], lens)
    return out_ptr, idx[take], score[take], support[take]


def _user_order_counts(users: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for u in users:
        if u:
            out[u] = out.get(u, 0) + 1
    return out

"""Bundle quality on Instacart orders: complement completion (offline, two splits), personalization (offline)
and next-basket personalization through a server.

    python -m benchmarks.bundle_quality --data-dir /work/shared/data/instacart \
        --json docs/results/bundle-quality.json --plot docs/img/bundle-quality.png --markdown runs/bq.md
    # faster: --views user --no-learned --no-personalization --draws 200

    # the artifact for --target (catalog = products that appear in the orders; the users' target orders left
    # out of its order files, so their next basket never feeds the complements it is scored against):
    python -m benchmarks.bundle_quality --data-dir /work/shared/data/instacart --prepare-artifact-data /tmp/bq-data
    bundlerec-export --dataset instacart --data-dir /tmp/bq-data --out artifacts/instacart-bq --no-progress
    bundlerec-server --artifact artifacts/instacart-bq --port 50071

1. **Bundle completion** (no server), two views of the orders:

   * ``user`` (headline): each shopper's latest order is the TEST basket (a shopper with one order has it in
     test and nothing mined); every other order is TRAIN (``bundlerec_export.splits.user_level_split``).
   * ``order``: orders split by a stable hash of ``order_id`` (``--test-pct`` 20 %).

   In both, VAL = each shopper's latest TRAIN order and FIT = TRAIN - VAL. Every method is tuned the same way:
   its grid (``GRIDS``) is mined on FIT and scored on VAL (Recall@5), the best point is re-mined on TRAIN and
   the TEST baskets are scored once. The learned re-ranker is trained on VAL labels (features from FIT, the
   label basket's own shopper left out) and chosen on the VAL shoppers it did not train on.

   For every test basket and every item of it as the anchor: targets = the basket's other items in another
   aisle; every method's list is restricted to other aisles (``kmax`` = 20, the served top_k). Per
   (basket, anchor) pair: Recall@{5, 10, 20}, NDCG@10, hit@10, long-tail Recall@10 (the 100 most popular
   TRAIN items removed from targets and from the method's candidates, i.e. its deep list of kmax + 100, then
   cut at 10; ``long_tail_top`` = the stricter view: removed from the served top-kmax list), mean TRAIN
   popularity of the top 5. Means over pairs, 95 %
   intervals by bootstrap over test baskets (= shoppers in the user view), and the paired ratio to tuned
   raw co-occurrence (same resamples). ``coverage`` = share of TRAIN items with a full list (kmax items).
   Breakdowns: Recall@5 by anchor frequency (TRAIN baskets: head >= 100, middle 10-99, tail 1-9, unseen 0)
   and by shopper (returning vs first order).

   Methods: ``popularity`` (global / department / aisle-pair backoff), ``cooccurrence`` (raw counts,
   optional 2-shopper rule and popularity fill), ``npmi`` (the mining of ``complements.mine_cooccurrence``,
   tuned), ``npmi_served`` (the build's defaults), ``conditional`` (smoothed P(b|a), aisle backoff, basket
   size weighting, popularity exponent), ``ease``, ``learned`` (LambdaRank, ``complement_ranker``).

2. **Personalization offline** (user view, test baskets of returning shoppers): an anchor's list mixed with
   the shopper's own purchase frequency (``personal_cooccurrence``: P-TopFreq + co-occurrence) or decayed
   frequency (TIFU-KNN-like, ``*_recency``, ``personal_learned``); weights tuned on VAL shoppers the ranker
   did not train on. Recall@5 over all targets, over repeat targets (bought before) and explore targets.

3. **Next-basket personalization** (``--target``). Users with >= 3 orders (whole orders.csv): the last order
   (highest order_number) is the target. One item of it, picked by a stable hash, gives the query: its aisle
   name (``--query-from aisle``, default) or the first word(s) of its name (``head``, never the full name).
   Recommend is called twice, without and with ``recent_item_ids`` = distinct items of the earlier orders,
   most recent first, at most 50; score = Recall of the target order's items among all items of the returned
   bundles (``--max-bundles`` 10 x ``--items-per-bundle`` 3). Means, the paired difference (95 % normal CI),
   wins / ties / losses; ``rest`` repeats it without the item the query came from (the query alone may find it). Bounded: ``--max-users`` (stable-hash sample), ``--concurrency``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KS = (3, 5, 10)
VARIANTS = ("other_aisle", "all")
METHODS = ("popularity", "cooccurrence", "npmi", "conditional", "ease", "npmi_served", "learned")
SALT = "bundle-quality"


# ------------------------------------------------------------------------------------------------ split


def hash_fraction(key: str, salt: str = SALT) -> float:
    """Stable value in [0, 1) from sha1(salt:key) (independent of PYTHONHASHSEED and platform)."""
    digest = hashlib.sha1(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of_order(order_id: str, test_pct: float = 20.0, salt: str = SALT) -> str:
    """"test" for about ``test_pct`` % of order ids, "train" for the rest; deterministic."""
    return "test" if hash_fraction(str(order_id).strip(), salt) * 100.0 < test_pct else "train"


# ------------------------------------------------------------------------------------------------- data


@dataclass
class Order:
    order_id: str
    user_id: str
    order_number: int
    items: list[str]  # product ids, add_to_cart order, distinct
    days_since_prior: float | None = None  # orders.csv days_since_prior_order (None: first order / unknown)


@dataclass
class Data:
    products: dict[str, tuple[str, str, str]]  # product_id -> (name, aisle, department), only ordered products
    orders: list[Order]
    all_products: int = 0
    dropped_lines: int = 0  # order lines naming unknown products


def load_instacart(data_dir: str | Path) -> Data:
    data_dir = Path(data_dir)
    catalog: dict[str, tuple[str, str, str]] = {}
    with open(data_dir / "products.csv", newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            name = " ".join((row["product_name"] or "").split())
            if name:
                catalog[row["product_id"].strip()] = (name, (row.get("aisle") or "").strip(),
                                                      (row.get("department") or "").strip())
    meta: dict[str, tuple[str, int, float | None]] = {}
    with open(data_dir / "orders.csv", newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            days = (row.get("days_since_prior_order") or "").strip()
            meta[row["order_id"].strip()] = (row["user_id"].strip(), int(row.get("order_number") or 0),
                                             float(days) if days else None)
    lines: dict[str, list[tuple[int, str]]] = {}
    dropped = 0
    with open(data_dir / "order_items.csv", newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            pid = row["product_id"].strip()
            if pid not in catalog:
                dropped += 1
                continue
            lines.setdefault(row["order_id"].strip(), []).append((int(row.get("add_to_cart_order") or 0), pid))
    orders = []
    for oid, its in lines.items():
        user, number, days = meta.get(oid, ("", 0, None))
        orders.append(Order(oid, user, number, list(dict.fromkeys(p for _, p in sorted(its, key=lambda t: t[0]))), days))
    used = {p for o in orders for p in o.items}
    products = {p: v for p, v in catalog.items() if p in used}
    return Data(products, orders, len(catalog), dropped)


def next_basket_users(orders: Sequence[Order], min_orders: int = 3) -> dict[str, list[Order]]:
    """user_id -> that user's orders sorted by order_number, for users with >= ``min_orders`` orders."""
    by_user: dict[str, list[Order]] = {}
    for o in orders:
        if o.user_id:
            by_user.setdefault(o.user_id, []).append(o)
    return {u: sorted(os_, key=lambda o: (o.order_number, o.order_id)) for u, os_ in by_user.items()
            if len(os_) >= min_orders}


def prepare_artifact_data(data: Data, src: Path, out: Path, min_orders: int = 3) -> dict[str, int]:
    """Writes an instacart folder for ``bundlerec-export``: products restricted to the ordered ones, and the
    orders WITHOUT the next-basket target orders (last order of every user with >= ``min_orders`` orders)."""
    out.mkdir(parents=True, exist_ok=True)
    targets = {os_[-1].order_id for os_ in next_basket_users(data.orders, min_orders).values()}
    with open(src / "products.csv", newline="", encoding="utf-8-sig") as fi, \
            open(out / "products.csv", "w", newline="", encoding="utf-8") as fo:
        reader = csv.DictReader(fi)
        writer = csv.DictWriter(fo, fieldnames=reader.fieldnames)
        writer.writeheader()
        n_products = 0
        for row in reader:
            if row["product_id"].strip() in data.products:
                writer.writerow(row)
                n_products += 1
    counts = {}
    for name in ("orders.csv", "order_items.csv"):
        with open(src / name, newline="", encoding="utf-8-sig") as fi, \
                open(out / name, "w", newline="", encoding="utf-8") as fo:
            reader = csv.DictReader(fi)
            writer = csv.DictWriter(fo, fieldnames=reader.fieldnames)
            writer.writeheader()
            kept = 0
            for row in reader:
                if row["order_id"].strip() not in targets:
                    writer.writerow(row)
                    kept += 1
            counts[name] = kept
    return {"products": n_products, "orders": counts["orders.csv"], "order_items": counts["order_items.csv"],
            "target_orders_left_out": len(targets)}


# -------------------------------------------------------------------------------------------- rankers

Ranker = Callable[[int], Sequence[int]]


def recall_at_k(ranked: Sequence[int], targets: set[int] | frozenset[int], k: int) -> float | None:
    """|first k of ``ranked`` (distinct) ∩ targets| / |targets|; None when there is no target."""
    if not targets:
        return None
    top = list(dict.fromkeys(ranked))[:k]
    return sum(1 for r in top if r in targets) / len(targets)


def _codes(values: Sequence[str]) -> np.ndarray:
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(v, len(table)) if v else -1 for v in values], dtype=np.int64)


def popularity_ranker(counts: np.ndarray, groups: Sequence[str] | None, aisles: Sequence[str],
                      cross_aisle: bool, kmax: int) -> Ranker:
    """Anchor -> the most popular items (count > 0; ties by row) of the anchor's group (all items when
    ``groups`` is None), the anchor excluded, and with ``cross_aisle`` also the anchor's aisle."""
    n = len(counts)
    gcodes = np.zeros(n, dtype=np.int64) if groups is None else _codes(groups)
    acodes = _codes(aisles)
    order = np.lexsort((np.arange(n), -np.asarray(counts)))
    order = order[np.asarray(counts)[order] > 0]
    by_group: dict[int, list[int]] = {}
    for r in order.tolist():
        by_group.setdefault(int(gcodes[r]), []).append(r)
    cache: dict[int, list[int]] = {}

    def rank(anchor: int) -> list[int]:
        if anchor not in cache:
            out = []
            for r in by_group.get(int(gcodes[anchor]), []):
                if r == anchor or (cross_aisle and acodes[r] >= 0 and acodes[r] == acodes[anchor]):
                    continue
                out.append(r)
                if len(out) >= kmax:
                    break
            cache[anchor] = out
        return cache[anchor]

    return rank


def cooccurrence_ranker(baskets: Sequence[Sequence[int]], counts: np.ndarray, aisles: Sequence[str],
                        cross_aisle: bool, kmax: int) -> Ranker:
    """Anchor -> items by number of baskets shared with it (desc), ties by popularity (desc) then row."""
    from bundlerec_export import complements as cmp

    n = len(counts)
    a, b, c = cmp.pair_counts(baskets, n)
    rows, cols, cnt = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([c, c])
    if cross_aisle:
        acodes = _codes(aisles)
        keep = (acodes[rows] < 0) | (acodes[cols] < 0) | (acodes[rows] != acodes[cols])
        rows, cols, cnt = rows[keep], cols[keep], cnt[keep]
    pop = np.asarray(counts)[cols]
    order = np.lexsort((cols, -pop, -cnt, rows))
    rows, cols = rows[order], cols[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])

    def rank(anchor: int) -> np.ndarray:
        return cols[indptr[anchor]:min(indptr[anchor + 1], indptr[anchor] + kmax)]

    return rank


def complements_ranker(comp) -> Ranker:
    def rank(anchor: int) -> np.ndarray:
        return comp.indices[comp.indptr[anchor]:comp.indptr[anchor + 1]]

    return rank


# ---------------------------------------------------------------------------------------------- evaluate


def targets_of(basket: Sequence[int], anchor: int, aisles: Sequence[str], variant: str) -> set[int]:
    """The basket's other items; for ``other_aisle`` only those in a different (or unknown) aisle."""
    if variant == "all":
        return {r for r in basket if r != anchor}
    if variant == "other_aisle":
        aa = aisles[anchor]
        return {r for r in basket if r != anchor and (not aa or not aisles[r] or aisles[r] != aa)}
    raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------- pair metrics

PAIR_KS = (5, 10, 20)
LONG_TAIL_TOP = 100  # the most popular training items removed from targets and candidates for long-tail recall
LONG_TAIL_K = 10


def _dcg(hits: Sequence[bool]) -> float:
    return sum(1.0 / math.log2(i + 2) for i, h in enumerate(hits) if h)


def pair_records(baskets: Sequence[Sequence[int]], rank: Ranker | Sequence[Ranker], aisles: Sequence[str],
                 variant: str, ks: Sequence[int] = PAIR_KS, popular: set[int] | frozenset[int] | None = None,
                 counts: np.ndarray | None = None, histories: Sequence[set[int]] | None = None,
                 kmax: int | None = None) -> dict[str, np.ndarray]:
    """Per (basket, anchor) pair with >= 1 target: Recall@k for each k, NDCG@10 and hit@10 (binary gains),
    long-tail Recall@10 (``popular`` removed from targets AND from the whole ranked list, the method's
    candidates; NaN when no target is left) and ``long_tail_top`` (removed from the list's first ``kmax``),
    mean training popularity of the top 5 (``counts``; NaN for an empty list), empty flag, basket, anchor.
    ``rank`` may be one ranker per basket (personalized lists); every other metric reads the list's first
    ``kmax`` items (all of it when None). With ``histories`` (the shopper's earlier
    items per basket): ``repeat5`` / ``explore5`` = Recall@5 over the targets bought before / never bought."""
    out: dict[str, list[float]] = {f"r{k}": [] for k in ks}
    for key in ("ndcg10", "hit10", "long_tail", "long_tail_top", "pop5", "empty", "basket", "anchor", "repeat5", "explore5"):
        out[key] = []
    for bi, basket in enumerate(baskets):
        basket = list(dict.fromkeys(basket))
        rank_b = rank if callable(rank) else rank[bi]
        for anchor in basket:
            targets = targets_of(basket, anchor, aisles, variant)
            if not targets:
                continue
            deep = list(dict.fromkeys(int(r) for r in rank_b(anchor)))
            ranked = deep if kmax is None else deep[:kmax]
            hits = [r in targets for r in ranked]
            for k in ks:
                out[f"r{k}"].append(sum(hits[:k]) / len(targets))
            out["ndcg10"].append(_dcg(hits[:10]) / _dcg([True] * min(len(targets), 10)))
            out["hit10"].append(float(any(hits[:10])))
            tail_targets = targets - popular if popular is not None else set()
            for key, lst in (("long_tail", deep), ("long_tail_top", ranked)):
                if tail_targets:
                    tail = [r for r in lst if r not in popular][:LONG_TAIL_K]
                    out[key].append(sum(r in tail_targets for r in tail) / len(tail_targets))
                else:
                    out[key].append(math.nan)
            top5 = ranked[:5]
            out["pop5"].append(float(np.mean(counts[top5])) if counts is not None and top5 else math.nan)
            out["empty"].append(float(not ranked))
            for key, part in (("repeat5", True), ("explore5", False)):
                sub = {t for t in targets if (t in histories[bi]) == part} if histories is not None else set()
                out[key].append(sum(r in sub for r in ranked[:5]) / len(sub) if sub else math.nan)
            out["basket"].append(bi)
            out["anchor"].append(anchor)
    return {k: np.asarray(v, dtype=np.int64 if k in ("basket", "anchor") else np.float64) for k, v in out.items()}


def evaluate_completion(test_baskets: Iterable[Sequence[int]], rankers: dict[str, Ranker],
                        aisles: Sequence[str], variant: str, ks: Sequence[int] = KS) -> dict[str, Any]:
    """Macro-averaged Recall@k over (basket, anchor) pairs with >= 1 target; per method, plus pair counts."""
    baskets = [list(dict.fromkeys(b)) for b in test_baskets]
    pairs = sum(1 for b in baskets for a in b if targets_of(b, a, aisles, variant))
    skipped = sum(len(b) for b in baskets) - pairs
    methods, anchors = {}, set()
    for name, rank in rankers.items():
        rec = pair_records(baskets, rank, aisles, variant, ks)
        anchors = set(rec["anchor"].tolist())
        empty = rec["empty"] > 0
        covered = int((~empty).sum())
        methods[name] = {
            "recall": {str(k): (float(rec[f"r{k}"].mean()) if pairs else None) for k in ks},
            "recall_covered": {str(k): (float(rec[f"r{k}"][~empty].mean()) if covered else None) for k in ks},
            "pairs": pairs, "pairs_empty": int(empty.sum()),
            "pair_coverage": covered / pairs if pairs else None,
            "anchors_empty": len(set(rec["anchor"][empty].tolist())),
        }
    return {"variant": variant, "pairs": pairs, "pairs_without_target": skipped, "anchors": len(anchors),
            "methods": methods}


def bootstrap_weights(n_groups: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """draws x n_groups resampling counts (each row a bootstrap sample of the groups, with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=draws).astype(np.float64)


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.isnan(values)
    return (np.bincount(groups[ok], values[ok], minlength=n_groups),
            np.bincount(groups[ok], minlength=n_groups).astype(np.float64))


def mean_ci(values: np.ndarray, groups: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """Mean over the non-NaN pairs, with a 95 % percentile interval from resampling whole groups (baskets)."""
    s, c = _group_sums(values, groups, weights.shape[1])
    if c.sum() == 0:
        return {"mean": None, "ci95": None, "n": 0}
    boot = (weights @ s) / np.maximum(weights @ c, 1e-12)
    return {"mean": float(s.sum() / c.sum()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "n": int(c.sum())}


def paired_ratio(values: np.ndarray, ref: np.ndarray, groups: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """mean(values) / mean(ref) over the same pairs, with a paired bootstrap 95 % interval (same resamples)."""
    s, _ = _group_sums(values, groups, weights.shape[1])
    r, _ = _group_sums(ref, groups, weights.shape[1])
    if r.sum() == 0:
        return {"ratio": None, "ci95": None}
    boot = (weights @ s) / np.maximum(weights @ r, 1e-12)
    return {"ratio": float(s.sum() / r.sum()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def coverage(rank: Ranker, items: Iterable[int], k: int) -> float:
    """Share of ``items`` whose list holds at least ``k`` distinct items."""
    items = list(items)
    return sum(1 for a in items if len(set(int(r) for r in rank(a))) >= k) / max(len(items), 1)


FREQ_BUCKETS = (("head", 100, math.inf), ("middle", 10, 100), ("tail", 1, 10), ("unseen", 0, 1))
METRICS = ("r5", "r10", "r20", "ndcg10", "hit10", "long_tail", "long_tail_top")


def summarize(records: dict[str, dict[str, np.ndarray]], ref: str, counts: np.ndarray, weights: np.ndarray,
              with_history: np.ndarray | None = None) -> dict[str, Any]:
    """Per method: every metric with its 95 % interval, the paired ratio to ``ref`` for each, mean top-5
    popularity, and Recall@5 by anchor frequency (head / middle / tail / unseen) and by shopper segment."""
    out = {}
    for name, rec in records.items():
        g = rec["basket"]
        m: dict[str, Any] = {k: mean_ci(rec[k], g, weights) for k in METRICS}
        m["ratio_vs_" + ref] = {k: paired_ratio(rec[k], records[ref][k], g, weights) for k in METRICS}
        m["pop5"] = float(np.nanmean(rec["pop5"])) if np.any(~np.isnan(rec["pop5"])) else None
        m["pair_coverage"] = float(1.0 - rec["empty"].mean()) if len(rec["empty"]) else None
        freq = counts[rec["anchor"]]
        m["by_anchor_frequency"] = {
            b: {"pairs": int(sel.sum()), "r5": float(rec["r5"][sel].mean()) if sel.any() else None}
            for b, lo, hi in FREQ_BUCKETS for sel in [(freq >= lo) & (freq < hi)]}
        if with_history is not None:
            hist = with_history[g]
            m["by_shopper"] = {seg: {"pairs": int(sel.sum()), "r5": float(rec["r5"][sel].mean()) if sel.any() else None}
                               for seg, sel in (("returning", hist), ("first_order", ~hist))}
        out[name] = m
    return out


# ------------------------------------------------------------------------------------------- methods


@dataclass
class Mined:
    """Everything mined from one set of orders (the fit orders during tuning, all train orders for test)."""

    baskets: list[list[int]]
    users: list[str]
    n: int
    aisles: list[str]
    departments: list[str]
    stats: Any = None
    _gram: Any = None

    def __post_init__(self) -> None:
        from bundlerec_export import complement_features as cf

        self.stats = cf.pair_stats(self.baskets, self.n, self.users, self.aisles, self.departments)

    @property
    def counts(self) -> np.ndarray:
        return self.stats.counts

    def gram(self, max_items: int):
        from bundlerec_export import complement_features as cf

        if self._gram is None or self._gram[0] != max_items:
            self._gram = (max_items, cf.ease_gram(self.baskets, self.n, max_items))
        return self._gram[1]


def csr_ranker(indptr: np.ndarray, idx: np.ndarray) -> Ranker:
    def rank(anchor: int) -> np.ndarray:
        return idx[indptr[anchor]:indptr[anchor + 1]]

    return rank


def cut(rank: Ranker, kmax: int) -> Ranker:
    """``rank``'s list cut at ``kmax``."""
    def ranked(anchor: int) -> Sequence[int]:
        return rank(anchor)[:kmax]

    return ranked


def with_fallback(first: Ranker, then: Ranker, kmax: int) -> Ranker:
    """``first``'s list, completed up to ``kmax`` with ``then``'s items not yet in it."""
    def rank(anchor: int) -> list[int]:
        return list(dict.fromkeys([int(r) for r in first(anchor)] + [int(r) for r in then(anchor)]))[:kmax]

    return rank


GRIDS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{"group": g} for g in ("global", "department", "aisle_pair")],
    "cooccurrence": [{"min_users": u, "fill": f} for u in (1, 2) for f in (False, True)],
    "npmi": [{"shrinkage": s, "min_users": u} for s in (5.0, 20.0, 50.0, 200.0) for u in (1, 2)],
    "conditional": [{"alpha": a, "beta": b, "weighted": w} for a in (0.0, 5.0, 20.0, 80.0) for b in (0.0, 0.25)
                    for w in (False, True)],
    "ease": [{"lam": lam, "items": 3000} for lam in (100.0, 500.0, 2000.0, 8000.0)],
    # one point + early stopping on validation shoppers: a 2-point grid (15 / 50 vs 63 / 100) chose 15 / 50 on
    # validation (holdout R@5 0.0667 vs 0.0657) at ~4 min a point on the shared machine
    "learned": [{"num_leaves": 15, "min_data_in_leaf": 50}],
}
SERVED = {"npmi_served": {"shrinkage": 50.0, "min_users": 2}}  # the build's defaults (BuildConfig)


def build_method(name: str, m: Mined, p: dict[str, Any], kmax: int) -> Ranker:
    """One tuned baseline or scorer as an anchor -> ranked list function over ``m`` (other aisles only)."""
    from bundlerec_export import complement_features as cf
    from bundlerec_export import complements as cmp

    st = m.stats
    pop = popularity_ranker(m.counts, None, m.aisles, True, kmax)
    if name == "popularity":
        if p["group"] == "aisle_pair":
            return with_fallback(csr_ranker(*cf.top_lists(cf.aisle_fill(st, kmax), kmax, st.aisle_code, m.counts)[:2]),
                                 pop, kmax)
        return pop if p["group"] == "global" else popularity_ranker(m.counts, m.departments, m.aisles, True, kmax)
    if name == "cooccurrence":
        r = csr_ranker(*cf.top_lists(cf.cooccurrence_scores(st, p["min_users"]), kmax, st.aisle_code, m.counts)[:2])
        return with_fallback(r, pop, kmax) if p["fill"] else r
    if name in ("npmi", "npmi_served"):
        comp, _ = cmp.mine_cooccurrence(m.baskets, m.n, m.aisles, min_support=2, top_k=kmax, shrinkage=p["shrinkage"],
                                        support_users=m.users, min_users=p["min_users"])
        return complements_ranker(comp)
    if name == "conditional":
        s = cf.conditional_scores(st, p["alpha"], p["beta"], p["weighted"], fill=kmax)
        return csr_ranker(*cf.top_lists(s, kmax, st.aisle_code, m.counts)[:2])
    if name == "ease":
        ease = cf.ease_model(m.baskets, m.n, p["lam"], p["items"], gram=m.gram(p["items"]))
        r = csr_ranker(*cf.top_lists(ease.matrix(m.n, 2 * kmax), kmax, st.aisle_code, m.counts)[:2])
        cooc = csr_ranker(*cf.top_lists(st.C, kmax, st.aisle_code, m.counts)[:2])
        return with_fallback(with_fallback(r, cooc, kmax), pop, kmax)
    raise ValueError(f"unknown method {name!r}")


def learned_method(fit: Mined, train: Mined, val: Sequence[Sequence[int]], val_users: Sequence[str],
                   titles: Sequence[str], grid: Sequence[dict[str, Any]], base: dict[str, Any], kmax: int,
                   progress: bool = False, depth: int | None = None) -> tuple[Ranker, Ranker, dict[str, Any]]:
    """LambdaRank per grid point (features mined on ``fit``, labels from ``val``); the point with the best
    held-out Recall@5 (val shoppers not trained on) is kept. Returns (ranker on fit features [val-holdout
    diagnostics, ``kmax`` long], ranker on train features [the served list, ``depth`` (default kmax) long], report)."""
    from bundlerec_export import complement_features as cf
    from bundlerec_export import complement_ranker as cr

    tokens = cf.title_tokens(titles)
    best = None
    tried = []
    for p in grid:
        cfg = cr.RankerConfig(top_k=kmax, **base, **p)
        fit_model = cr.CandidateModel(fit.baskets, fit.n, cfg, users=fit.users, aisles=fit.aisles,
                                      departments=fit.departments, tokens=tokens)
        booster, rep = cr.train_ranker(fit_model, val, val_users, cfg)
        score = rep.get("holdout_recall", {}).get("ranker", {}).get("5", 0.0)
        tried.append({"params": p, "holdout_recall5": score, "best_iteration": rep["best_iteration"],
                      "seconds": rep["seconds"]})
        if best is None or score > best[0]:
            best = (score, p, cfg, booster, rep, fit_model)
    _, p, cfg, booster, rep, fit_model = best
    full = cr.CandidateModel(train.baskets, train.n, cfg, users=train.users, aisles=train.aisles,
                             departments=train.departments, tokens=tokens)
    anchors = np.arange(train.n)  # every catalog item: a never-ordered anchor is ranked on its aisle backoff and popularity
    t0 = time.perf_counter()
    indptr, idx, score, _ = cr.score_anchors(booster, full, anchors, depth or kmax, progress)
    served_s = time.perf_counter() - t0
    val_anchors = np.unique(np.concatenate([np.asarray(b, dtype=np.int64) for b in val]))
    vi, vx, _, _ = cr.score_anchors(booster, fit_model, val_anchors, kmax)
    report = {"grid": tried, "chosen": p, "validation": {k: v for k, v in rep.items()}, "score_all_anchors_s": round(served_s, 2),
              "model_text_chars": len(booster.model_to_string())}
    return csr_ranker(vi, vx), csr_ranker(indptr, idx), report


# ------------------------------------------------------------------------------------------- views


@dataclass
class Prepared:
    """Orders as item rows over the catalog of ordered products."""

    ids: list[str]
    aisles: list[str]
    departments: list[str]
    titles: list[str]
    baskets: list[list[int]]
    users: list[str]
    numbers: list[int]


def prepare(data: Data) -> Prepared:
    ids = sorted(data.products, key=lambda p: int(p) if p.isdigit() else p)
    row = {p: i for i, p in enumerate(ids)}
    return Prepared(ids, [data.products[p][1] for p in ids], [data.products[p][2] for p in ids],
                    [data.products[p][0] for p in ids], [[row[p] for p in o.items] for o in data.orders],
                    [o.user_id for o in data.orders], [o.order_number for o in data.orders])


def order_level_split(data: Data, test_pct: float, salt: str):
    """The second view: test = orders whose id hashes into ``test_pct`` %; val = each shopper's latest
    remaining order (as in the user-level split); fit = train - val."""
    from bundlerec_export.splits import UserSplit, latest_per_user

    test_mask = np.asarray([split_of_order(o.order_id, test_pct, salt) == "test" for o in data.orders], dtype=bool)
    val_mask = latest_per_user([o.user_id for o in data.orders], [o.order_number for o in data.orders], ~test_mask)
    val_mask &= np.asarray([bool(o.user_id) for o in data.orders])
    return UserSplit(np.flatnonzero(~test_mask), np.flatnonzero(test_mask), np.flatnonzero(val_mask),
                     np.flatnonzero(~test_mask & ~val_mask))


def _subset(pr: Prepared, idx: np.ndarray) -> tuple[list[list[int]], list[str]]:
    return [pr.baskets[i] for i in idx.tolist()], [pr.users[i] for i in idx.tolist()]


def tune(name: str, fit: Mined, val: Sequence[Sequence[int]], aisles: Sequence[str], kmax: int,
         grid: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Grid point with the best validation Recall@5 (other aisles); the whole grid's figures."""
    tried = []
    for p in grid:
        rec = pair_records(val, build_method(name, fit, p, kmax), aisles, "other_aisle", (5, 10))
        tried.append({"params": p, "val_r5": float(rec["r5"].mean()), "val_r10": float(rec["r10"].mean())})
    best = max(tried, key=lambda t: t["val_r5"])
    return best["params"], tried


def run_view(pr: Prepared, split, label: str, kmax: int = 20, draws: int = 1000, learned: bool = True,
             progress: bool = False, log=print, leave_shopper_out: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tunes every method on (fit -> val), refits on train, scores the test baskets once. Returns (the
    view's JSON, the objects the personalization check reuses)."""
    t0 = time.perf_counter()
    n = len(pr.ids)
    fit = Mined(*_subset(pr, split.fit), n, pr.aisles, pr.departments)
    train = Mined(*_subset(pr, split.train), n, pr.aisles, pr.departments)
    val_b, val_u = _subset(pr, split.val)
    test_b, _ = _subset(pr, split.test)
    deep = kmax + LONG_TAIL_TOP  # test lists: the first kmax are the served list; the rest feed long-tail recall
    rankers: dict[str, Ranker] = {}
    val_rankers: dict[str, Ranker] = {}
    tuning: dict[str, Any] = {}
    for name in ("popularity", "cooccurrence", "npmi", "conditional", "ease"):
        best, tried = tune(name, fit, val_b, pr.aisles, kmax, GRIDS[name])
        tuning[name] = {"chosen": best, "grid": tried}
        rankers[name] = build_method(name, train, best, deep)
        val_rankers[name] = build_method(name, fit, best, kmax)
        log(f"[{label}] {name}: chosen {best} (val R@5 {max(t['val_r5'] for t in tried):.4f})")
    rankers["npmi_served"] = build_method("npmi_served", train, SERVED["npmi_served"], deep)
    if learned:
        c, e = tuning["conditional"]["chosen"], tuning["ease"]["chosen"]
        base = {"cond_alpha": c["alpha"], "cond_beta": c["beta"], "cond_weighted": c["weighted"],
                "ease_lambda": e["lam"], "ease_items": e["items"], "leave_shopper_out": leave_shopper_out}
        val_rankers["learned"], rankers["learned"], tuning["learned"] = learned_method(
            fit, train, val_b, val_u, pr.titles, GRIDS["learned"], base, kmax, progress, depth=deep)
        log(f"[{label}] learned: chosen {tuning['learned']['chosen']}, holdout "
            f"{tuning['learned']['validation']['holdout_recall']}")
    counts = train.counts
    popular = set(np.argsort(-counts, kind="stable")[:LONG_TAIL_TOP].tolist())
    records = {name: pair_records(test_b, r, pr.aisles, "other_aisle", PAIR_KS, popular, counts, kmax=kmax)
               for name, r in rankers.items()}
    weights = bootstrap_weights(len(test_b), draws)
    train_users = {pr.users[i] for i in split.train.tolist() if pr.users[i]}
    with_history = np.asarray([pr.users[i] in train_users for i in split.test.tolist()], dtype=bool)
    methods = summarize(records, "cooccurrence", counts, weights, with_history)
    items = np.flatnonzero(counts > 0).tolist()
    for name, r in rankers.items():
        methods[name]["coverage"] = coverage(r, items, kmax)
        methods[name]["coverage_any"] = coverage(r, items, 1)
    result = {
        "split": {**{k: int(len(getattr(split, k))) for k in ("train", "test", "val", "fit")},
                  "test_baskets_with_history": int(with_history.sum()), "catalog_items": n,
                  "train_items": len(items)},
        "pairs": int(len(records["cooccurrence"]["r5"])), "kmax": kmax, "bootstrap_draws": draws,
        "methods": methods, "tuning": tuning, "seconds": round(time.perf_counter() - t0, 1),
    }
    served = {name: cut(r, kmax) for name, r in rankers.items()}
    ctx = {"fit": fit, "train": train, "val_rankers": val_rankers, "rankers": served, "val": (val_b, val_u),
           "split": split}
    return result, ctx


# ------------------------------------------------------------------------------------- personalization


def user_frequency(orders: Sequence[Sequence[int]], decay: float) -> dict[int, float]:
    """Item -> sum over the shopper's orders (oldest first) of decay ** (orders after it) (decay 1 = counts)."""
    out: dict[int, float] = {}
    last = len(orders) - 1
    for k, o in enumerate(orders):
        w = decay ** (last - k)
        for i in set(o):
            out[i] = out.get(i, 0.0) + w
    return out


def personal_ranker(base: Ranker, freq: dict[int, float], weight: float, aisles: Sequence[str], kmax: int) -> Ranker:
    """Mix of the anchor's list (rank score 1 - r / len) and the shopper's frequency (scaled by its max):
    ``weight * freq + (1 - weight) * list``; other aisles than the anchor only; ties by list order."""
    top = max(freq.values(), default=0.0) or 1.0

    def rank(anchor: int) -> list[int]:
        lst = [int(r) for r in base(anchor)]
        s: dict[int, float] = {r: (1.0 - weight) * (1.0 - k / max(len(lst), 1)) for k, r in enumerate(lst)}
        aa = aisles[anchor]
        for i, f in freq.items():
            if i != anchor and not (aa and aisles[i] == aa):
                s[i] = s.get(i, 0.0) + weight * f / top
        return sorted(s, key=lambda i: (-s[i], i))[:kmax]

    return rank


PERSONAL = {  # method -> (base list, grid of (weight, decay))
    "personal_cooccurrence": ("cooccurrence", [(w, 1.0) for w in (0.25, 0.5, 0.75, 1.0)]),
    "personal_cooccurrence_recency": ("cooccurrence", [(w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (0.6, 0.8)]),
    "personal_learned": ("learned", [(w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (0.6, 0.8, 1.0)]),
}


def _histories(pr: Prepared, pool: np.ndarray, targets: np.ndarray) -> list[list[list[int]]]:
    """For each target order: the same shopper's orders from ``pool`` placed before it (oldest first)."""
    by_user: dict[str, list[int]] = {}
    for i in pool.tolist():
        if pr.users[i]:
            by_user.setdefault(pr.users[i], []).append(i)
    out = []
    for t in targets.tolist():
        earlier = [i for i in by_user.get(pr.users[t], []) if pr.numbers[i] < pr.numbers[t]]
        out.append([pr.baskets[i] for i in sorted(earlier, key=lambda i: pr.numbers[i])])
    return out


def run_personalization(pr: Prepared, ctx: dict[str, Any], kmax: int = 20, draws: int = 1000,
                        log=print) -> dict[str, Any]:
    """Item 4 offline: test baskets of shoppers with earlier orders; the personal lists mix an anchor's list
    with the shopper's own purchase frequency (P-TopFreq) / decayed frequency (TIFU-KNN-like). Weights are
    tuned on the validation baskets of shoppers the ranker did not train on; test is scored once."""
    from bundlerec_export.complement_ranker import RankerConfig, _hash_pct

    split = ctx["split"]
    holdout_pct = RankerConfig().holdout_pct
    val_keep = np.asarray([pr.users[i] and _hash_pct(pr.users[i]) < holdout_pct for i in split.val.tolist()], dtype=bool)
    val_idx = split.val[val_keep]
    val_hist = _histories(pr, split.fit, val_idx)
    ok = np.asarray([len(h) > 0 for h in val_hist])
    val_idx, val_hist = val_idx[ok], [h for h, k in zip(val_hist, ok) if k]
    test_hist = _histories(pr, split.train, split.test)
    ok = np.asarray([len(h) > 0 for h in test_hist])
    test_idx, test_hist = split.test[ok], [h for h, k in zip(test_hist, ok) if k]
    val_b = [pr.baskets[i] for i in val_idx.tolist()]
    test_b = [pr.baskets[i] for i in test_idx.tolist()]
    test_seen = [set(i for o in h for i in o) for h in test_hist]
    records, tuning = {}, {}
    for name in ("cooccurrence", "learned"):
        if name in ctx["rankers"]:
            records[name] = pair_records(test_b, ctx["rankers"][name], pr.aisles, "other_aisle", histories=test_seen)
    for name, (base, grid) in PERSONAL.items():
        if base not in ctx["rankers"]:
            continue
        tried = []
        for w, d in grid:
            rs = [personal_ranker(ctx["val_rankers"][base], user_frequency(h, d), w, pr.aisles, kmax) for h in val_hist]
            tried.append({"weight": w, "decay": d, "val_r5": float(pair_records(val_b, rs, pr.aisles, "other_aisle", (5,))["r5"].mean())})
        best = max(tried, key=lambda t: t["val_r5"])
        tuning[name] = {"chosen": best, "grid": tried}
        rs = [personal_ranker(ctx["rankers"][base], user_frequency(h, best["decay"]), best["weight"], pr.aisles, kmax)
              for h in test_hist]
        records[name] = pair_records(test_b, rs, pr.aisles, "other_aisle", histories=test_seen)
        log(f"[personal] {name}: chosen w={best['weight']} decay={best['decay']} (val R@5 {best['val_r5']:.4f})")
    weights = bootstrap_weights(len(test_b), draws, seed=1)
    out = {}
    for name, rec in records.items():
        g = rec["basket"]
        out[name] = {k: mean_ci(rec[k], g, weights) for k in ("r5", "r10", "repeat5", "explore5")}
        out[name]["ratio_vs_personal_cooccurrence"] = {
            k: paired_ratio(rec[k], records["personal_cooccurrence"][k], g, weights) for k in ("r5", "repeat5", "explore5")}
    return {"test_baskets": len(test_b), "val_baskets": len(val_b), "pairs": int(len(records["cooccurrence"]["r5"])),
            "methods": out, "tuning": tuning}


# ------------------------------------------------------------------------------------- next basket


def query_for(product: tuple[str, str, str], mode: str) -> str:
    """A short query derived from one product: its aisle, or the first 1-2 words of its name (never all of it)."""
    name, aisle, _ = product
    if mode == "aisle" and aisle:
        return aisle
    words = name.split()
    head = words[:2] if len(words) > 2 else words[:1]
    return " ".join(head) or aisle or name


def next_basket_cases(data: Data, max_users: int, query_from: str, history_cap: int = 50,
                      min_orders: int = 3, salt: str = SALT) -> list[dict[str, Any]]:
    users = next_basket_users(data.orders, min_orders)
    chosen = sorted(users, key=lambda u: (hash_fraction(f"user:{u}", salt), u))[:max_users]
    cases = []
    for u in chosen:
        history_orders, target = users[u][:-1], users[u][-1]
        history: list[str] = []
        for o in reversed(history_orders):  # most recent first
            history.extend(o.items)
        history = list(dict.fromkeys(history))[:history_cap]
        pick = target.items[int(hash_fraction(f"pick:{target.order_id}", salt) * len(target.items))]
        ages = [a + (target.days_since_prior or 0.0) for a in order_ages(history_orders)]
        cases.append({"user_id": u, "order_id": target.order_id, "targets": list(target.items),
                      "history": history, "query": query_for(data.products[pick], query_from), "query_item": pick,
                      "counts": history_counts([o.items for o in history_orders], ages)})
    return cases


TOPFREQ_POOL = 64  # Search hits a P-TopFreq baseline may pick from (the server's anchor pool)


async def run_next_basket(target: str, cases: list[dict[str, Any]], max_bundles: int, items_per_bundle: int,
                          concurrency: int, timeout: float) -> dict[str, Any]:
    from bundlerec import AsyncClient, BundleRecError

    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = [{} for _ in cases]
    errors: dict[str, int] = {}

    async with AsyncClient(target, timeout=timeout) as client:
        await client.health()

        async def call(case: dict[str, Any], recent: list[str], counts: bool = False) -> tuple[set[str], bool] | None:
            try:
                stream = client.recommend(case["query"], recent_item_ids=recent, max_bundles=max_bundles,
                                          max_items_per_bundle=items_per_bundle,
                                          recent_item_counts=request_counts(case, time.time()) if counts else [])
                got = {it.item_id async for b in stream for it in b.items}
                return got, bool(stream.summary and stream.summary.personalized)
            except BundleRecError as exc:
                key = getattr(exc, "code", None)
                key = getattr(key, "name", None) or str(key or type(exc).__name__)
                errors[key] = errors.get(key, 0) + 1
                return None

        async def topfreq(case: dict[str, Any], n: int) -> tuple[set[str], bool] | None:
            """P-TopFreq over the query's matches: the shopper's ``n`` most bought items among the query's
            Search hits (``TOPFREQ_POOL``, the server's default mode), by count, then recency, then id."""
            try:
                hits = await client.search(case["query"], k=TOPFREQ_POOL)
            except BundleRecError:
                return None
            matched = [h.item_id for h in hits if h.item_id in case["counts"]]
            ranked = sorted(matched, key=lambda p: (-case["counts"][p][0], case["counts"][p][2], p))
            return set(ranked[:n]), False

        def topfreq_all(case: dict[str, Any], n: int) -> tuple[set[str], bool]:
            """P-TopFreq ignoring the query: the shopper's ``n`` most bought items (the next-basket reference)."""
            ranked = sorted(case["counts"], key=lambda p: (-case["counts"][p][0], case["counts"][p][2], p))
            return set(ranked[:n]), False

        async def one(i: int, case: dict[str, Any]) -> None:
            async with sem:
                plain = await call(case, [])
                pers = await call(case, case["history"])
                counted = await call(case, [], counts=True)
                n = len(counted[0]) if counted else max_bundles * items_per_bundle
                freq = await topfreq(case, n)
            targets = set(case["targets"])
            rec = {}
            for name, res in (("plain", plain), ("personalized", pers), ("counts", counted), ("topfreq", freq),
                              ("topfreq_all", topfreq_all(case, n))):
                if res is None:
                    rec[name] = None
                    continue
                got, flag = res
                rest = targets - {case["query_item"]}
                rec[name] = {"recall": len(got & targets) / len(targets), "items": len(got), "flag": flag,
                             "recall_rest": len(got & rest) / len(rest) if rest else None}
            out[i] = rec

        await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))

    both = [r for r in out if all(r.get(k) for k in ("plain", "counts", "topfreq"))]
    counts_block: dict[str, Any] = {}
    if both:
        a = np.asarray([r["plain"]["recall"] for r in both])
        c = np.asarray([r["counts"]["recall"] for r in both])
        f = np.asarray([r["topfreq"]["recall"] for r in both])
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(both), size=(1000, len(both)))
        ratio = c[idx].mean(1) / np.maximum(a[idx].mean(1), 1e-12)
        vs_freq = c[idx].mean(1) / np.maximum(f[idx].mean(1), 1e-12)
        counts_block = {
            "scored": len(both), "recall_plain": float(a.mean()), "recall_counts": float(c.mean()),
            "recall_topfreq_matches": float(f.mean()), "topfreq_pool": TOPFREQ_POOL,
            "ratio_counts_to_plain": float(c.mean() / a.mean()) if a.mean() else None,
            "ratio_counts_to_plain_ci95": [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))],
            "ratio_counts_to_topfreq": float(c.mean() / f.mean()) if f.mean() else None,
            "ratio_counts_to_topfreq_ci95": [float(np.percentile(vs_freq, 2.5)), float(np.percentile(vs_freq, 97.5))],
            "recall_topfreq_all": float(np.mean([r["topfreq_all"]["recall"] for r in both])),
            "mean_items_counts": float(np.mean([r["counts"]["items"] for r in both])),
            "mean_items_topfreq": float(np.mean([r["topfreq"]["items"] for r in both])),
            "targets": {"counts >= 1.5 x plain": bool(c.mean() >= 1.5 * a.mean()),
                        "counts >= topfreq over the matches": bool(c.mean() >= f.mean())},
        }
    ok = [(r["plain"], r["personalized"]) for r in out if r.get("plain") and r.get("personalized")]
    plain = np.asarray([a["recall"] for a, _ in ok], dtype=np.float64)
    pers = np.asarray([b["recall"] for _, b in ok], dtype=np.float64)
    diff = pers - plain
    m = len(ok)
    se = float(diff.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan")
    rest = [(a["recall_rest"], b["recall_rest"]) for a, b in ok if a["recall_rest"] is not None]
    rest_diff = np.asarray([y - x for x, y in rest], dtype=np.float64)
    rest_se = float(rest_diff.std(ddof=1) / math.sqrt(len(rest))) if len(rest) > 1 else float("nan")
    return {
        "users": len(cases), "scored": m, "errors": errors,
        "recall_plain": float(plain.mean()) if m else None,
        "recall_personalized": float(pers.mean()) if m else None,
        "diff_mean": float(diff.mean()) if m else None, "diff_se": se,
        "diff_ci95": [float(diff.mean() - 1.96 * se), float(diff.mean() + 1.96 * se)] if m > 1 else None,
        "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
        # the same without the item the query was derived from (the rest of the next basket)
        "rest": {"scored": len(rest),
                 "recall_plain": float(np.mean([x for x, _ in rest])) if rest else None,
                 "recall_personalized": float(np.mean([y for _, y in rest])) if rest else None,
                 "diff_mean": float(rest_diff.mean()) if rest else None, "diff_se": rest_se},
        "hit_rate_plain": float((plain > 0).mean()) if m else None,
        "hit_rate_personalized": float((pers > 0).mean()) if m else None,
        "mean_items_plain": float(np.mean([a["items"] for a, _ in ok])) if m else None,
        "mean_items_personalized": float(np.mean([b["items"] for _, b in ok])) if m else None,
        "personalized_flag_rate": float(np.mean([b["flag"] for _, b in ok])) if m else None,
        "mean_history_items": float(np.mean([len(c["history"]) for c in cases])) if cases else None,
        "mean_target_items": float(np.mean([len(c["targets"]) for c in cases])) if cases else None,
        "target": {"rule": "recall_personalized >= recall_plain",
                   "met": bool(m and pers.mean() >= plain.mean())},
        # history as recent_item_counts, and P-TopFreq restricted to the query's Search hits (paired bootstrap)
        "counts": counts_block,
    }


# ------------------------------------------------------------------------- complements through the RPC

PERSONAL_BASELINE = (0.85, 1.0)  # (weight, decay) of personal_cooccurrence: tune_history's "counts" choice
# (0.75 before the validation slice of tune_history existed; kept as a second reference row)
PERSONAL_BASELINE_PREVIOUS = (0.75, 1.0)


def order_ages(orders: Sequence[Order]) -> list[float]:
    """Days from each of a shopper's orders (sorted) to their last one, from ``days_since_prior`` (0 if unknown)."""
    ages, age = [], 0.0
    for o in reversed(orders):
        ages.append(age)
        age += o.days_since_prior or 0.0
    return ages[::-1]


def history_counts(orders: Sequence[Sequence[str]], ages: Sequence[float]) -> dict[str, tuple[int, float, float]]:
    """item -> (orders containing it, days since the first of them, days since the last of them)."""
    out: dict[str, tuple[int, float, float]] = {}
    for items, age in zip(orders, ages, strict=True):
        for p in set(items):
            n, first, _ = out.get(p, (0, age, age))
            out[p] = (n + 1, max(first, age), age)
    return out


def complement_cases(data: Data, max_users: int, history_cap: int = 50, min_orders: int = 3,
                     salt: str = SALT) -> list[dict[str, Any]]:
    """Next-basket cases whose query is one item's full title (picked by a stable hash among the target items
    with an other-aisle target), so the bundle anchored on it can be scored: targets = the basket's other
    items of other aisles; ``seen`` = every item of the shopper's earlier orders (repeat vs explore);
    ``counts`` = per item of those orders: (orders, days since the first, days since the last) before the target."""
    users = next_basket_users(data.orders, min_orders)
    chosen = sorted(users, key=lambda u: (hash_fraction(f"user:{u}", salt), u))
    cases = []
    for u in chosen:
        history_orders, target = users[u][:-1], users[u][-1]
        aisle = {p: data.products[p][1] for p in target.items}
        anchors = [p for p in target.items if any(aisle[q] != aisle[p] for q in target.items)]
        if not anchors:
            continue
        pick = anchors[int(hash_fraction(f"anchor:{target.order_id}", salt) * len(anchors))]
        recent: list[str] = []
        for o in reversed(history_orders):
            recent.extend(o.items)
        ages = [a + (target.days_since_prior or 0.0) for a in order_ages(history_orders)]
        cases.append({"user_id": u, "anchor": pick, "query": data.products[pick][0],
                      "targets": [q for q in target.items if aisle[q] != aisle[pick]],
                      "recent": list(dict.fromkeys(recent))[:history_cap],
                      "history": [list(o.items) for o in history_orders],
                      "counts": history_counts([o.items for o in history_orders], ages),
                      "seen": sorted({q for o in history_orders for q in o.items})})
        if len(cases) == max_users:
            break
    return cases


# weights and half-lives tried on the validation baskets (tune_history)
TUNE_WEIGHTS = (0.65, 0.75, 0.85, 0.9, 0.95)
TUNE_HALF_LIVES = (15.0, 30.0, 45.0, 60.0, 90.0)


def history_validation_split(data: Data, min_orders: int = 3) -> tuple[dict[str, Order], dict[str, Order], list[Order]]:
    """(test basket per shopper, validation basket per shopper, orders to mine) for :func:`tune_history`: for every
    shopper with >= ``min_orders`` orders the last one is the RPC test basket (left out of the artifact by
    :func:`prepare_artifact_data`) and the one before it the validation basket; neither is mined."""
    users = next_basket_users(data.orders, min_orders)
    test = {u: os_[-1] for u, os_ in users.items()}
    val = {u: os_[-2] for u, os_ in users.items()}
    held = {o.order_id for o in (*test.values(), *val.values())}
    return test, val, [o for o in data.orders if o.order_id not in held]


def tune_history(data: Data, min_orders: int = 3, kmax: int = 20, history_cap: int = 50) -> dict[str, Any]:
    """The served personal mix tuned on VALIDATION baskets carved from training orders only: for every shopper
    with >= ``min_orders`` orders the last order (the RPC test basket) is set aside, the one before it is the
    validation basket, the orders before that are the history; the base lists are raw co-occurrence mined
    from every order except the test and validation baskets. Every item of a validation basket with an
    other-aisle target is an anchor; Recall@5 over (basket, anchor) pairs, for the served affinities
    (``bundling.shopper_affinity`` of the id list as sent, ``count_affinity`` of plain and decayed counts)."""
    from bundlerec_server.bundling import DAY_MS, count_affinity, decayed_count, shopper_affinity

    users = next_basket_users(data.orders, min_orders)
    _, val_of, mined = history_validation_split(data, min_orders)
    ids = sorted(data.products)
    row = {p: i for i, p in enumerate(ids)}
    aisles = [data.products[p][1] for p in ids]
    baskets = [[row[p] for p in o.items] for o in mined]
    counts = np.bincount(np.asarray([i for b in baskets for i in b], dtype=np.int64), minlength=len(ids))
    base = cooccurrence_ranker(baskets, counts, aisles, True, kmax)
    cases = []
    for u, os_ in users.items():
        hist, val = os_[:-2], val_of[u]
        ages = [a + (val.days_since_prior or 0.0) for a in order_ages(hist)]
        recent: list[int] = []
        for o in reversed(hist):
            recent.extend(row[p] for p in o.items)
        vb = [row[p] for p in val.items]
        pairs = [(a, {q for q in vb if aisles[q] != aisles[a]}) for a in vb]
        pairs = [(a, t) for a, t in pairs if t]
        if pairs:
            cases.append((history_counts([o.items for o in hist], ages), list(dict.fromkeys(recent))[:history_cap], pairs))

    def affinity(form: str, hl: float, c: tuple) -> dict[int, float]:
        if form == "ids":
            return shopper_affinity(c[1])
        now = 10_000 * DAY_MS  # any "now": ages are relative to it
        return count_affinity((row[p], decayed_count(n, now - int(first * DAY_MS), now - int(last * DAY_MS), now,
                                                     hl if form == "decayed" else 0.0))
                              for p, (n, first, last) in c[0].items())

    def recall(form: str, hl: float, w: float) -> float:
        rs = []
        for c in cases:
            rank = personal_ranker(base, affinity(form, hl, c), w, aisles, kmax)
            rs += [len(set(rank(a)[:5]) & t) / len(t) for a, t in c[2]]
        return float(np.mean(rs))

    grid = []
    for form, hls in (("ids", [0.0]), ("counts", [0.0]), ("decayed", list(TUNE_HALF_LIVES))):
        for hl in hls:
            for w in TUNE_WEIGHTS:
                grid.append({"form": form, "half_life_days": hl, "weight": w, "val_r5": recall(form, hl, w)})
                print(json.dumps(grid[-1]), file=sys.stderr, flush=True)
    best = {f: max((g for g in grid if g["form"] == f), key=lambda g: g["val_r5"]) for f in ("ids", "counts", "decayed")}
    no_personal = float(np.mean([len(set(base(a)[:5]) & t) / len(t) for c in cases for a, t in c[2]]))
    return {"validation_shoppers": len(cases), "pairs": sum(len(c[2]) for c in cases),
            "base": "cooccurrence (orders minus test and validation baskets)", "no_personal_r5": no_personal,
            "grid": grid, "best": best}


def complement_baselines(data: Data, cases: list[dict[str, Any]], kmax: int = 20) -> dict[str, list[list[str]]]:
    """Offline lists for the same anchors from the orders the served artifact was built from (every order but
    the target ones): raw co-occurrence, and co-occurrence + the shopper's own purchase counts."""
    targets = {c["user_id"]: None for c in cases}
    last = {u: max(o.order_number for o in os_) for u, os_ in next_basket_users(data.orders).items() if u in targets}
    ids = sorted(data.products)
    row = {p: i for i, p in enumerate(ids)}
    aisles = [data.products[p][1] for p in ids]
    baskets = [[row[p] for p in o.items] for o in data.orders if not (o.user_id in last and o.order_number == last[o.user_id])]
    counts = np.bincount(np.asarray([i for b in baskets for i in b], dtype=np.int64), minlength=len(ids))
    co = cooccurrence_ranker(baskets, counts, aisles, True, kmax)
    out: dict[str, list[list[str]]] = {"cooccurrence": [], "personal_cooccurrence": [], "personal_cooccurrence_w075": []}
    for c in cases:
        a = row[c["anchor"]]
        out["cooccurrence"].append([ids[i] for i in co(a)])
        for name, (w, d) in (("personal_cooccurrence", PERSONAL_BASELINE),
                             ("personal_cooccurrence_w075", PERSONAL_BASELINE_PREVIOUS)):
            pers = personal_ranker(co, user_frequency([[row[p] for p in o] for o in c["history"]], d), w, aisles, kmax)
            out[name].append([ids[i] for i in pers(a)])
    return out


def request_counts(case: dict[str, Any], now_s: float, limit: int = 200) -> list[Any]:
    """The case's history as a caller would send it: ``recent_item_counts`` (count, first and last purchase as
    times before ``now_s``), the ``limit`` items with the largest decayed count (the server's default half-life)."""
    from bundlerec import item_count
    from bundlerec_server.bundling import COUNT_HALF_LIFE_DAYS, decayed_count

    day = 86400.0
    ranked = sorted(case["counts"].items(), key=lambda kv: (-decayed_count(
        kv[1][0], -int(kv[1][1] * 86_400_000), -int(kv[1][2] * 86_400_000), 0, COUNT_HALF_LIFE_DAYS), kv[0]))
    return [item_count(p, n, last_seen=now_s - last * day, first_seen=now_s - first * day)
            for p, (n, first, last) in ranked[:limit]]


EVENTS_USER_PREFIX = "bq:"


async def record_histories(target: str, data: Data, cases: list[dict[str, Any]], timeout: float) -> int:
    """Records every case's earlier orders as PURCHASE events of user ``bq:<user_id>`` (one event per order line,
    timestamped by the order's age before now), so Recommend with only the user id reads them back."""
    from google.protobuf import timestamp_pb2

    from bundlerec import AsyncClient, pb

    users = next_basket_users(data.orders)
    now = time.time()
    events = []
    for c in cases:
        orders = users[c["user_id"]][:-1]
        ages = [a + (users[c["user_id"]][-1].days_since_prior or 0.0) for a in order_ages(orders)]
        for o, age in zip(orders, ages, strict=True):
            ts = timestamp_pb2.Timestamp()
            ts.FromNanoseconds(int((now - age * 86400.0) * 1e9))
            events += [pb.Event(user_id=EVENTS_USER_PREFIX + c["user_id"], item_id=p, type=pb.EVENT_TYPE_PURCHASE,
                                timestamp=ts) for p in o.items]
    async with AsyncClient(target, timeout=max(timeout, 60.0)) as client:
        accepted = 0
        for i in range(0, len(events), 5000):
            accepted += (await client.record_events(events[i:i + 5000])).accepted
    return accepted


async def served_complements(target: str, cases: list[dict[str, Any]], history: bool | str, items_per_bundle: int,
                             concurrency: int, timeout: float) -> list[list[str] | None]:
    """The complements of the served bundle anchored on each case's item ([] when no bundle is anchored on
    it; None on an error), without history (False), with the shopper's ``recent_item_ids`` (True or "ids"),
    with their ``recent_item_counts`` ("counts") or with only their user id ("events": :func:`record_histories`)."""
    from bundlerec import AsyncClient, BundleRecError

    sem = asyncio.Semaphore(concurrency)
    out: list[list[str] | None] = [None] * len(cases)
    async with AsyncClient(target, timeout=timeout) as client:
        await client.health()

        async def one(i: int, c: dict[str, Any]) -> None:
            async with sem:
                try:
                    stream = client.recommend(c["query"], recent_item_ids=c["recent"] if history in (True, "ids") else [],
                                              user_id=EVENTS_USER_PREFIX + c["user_id"] if history == "events" else "",
                                              recent_item_counts=request_counts(c, time.time()) if history == "counts" else [],
                                              max_bundles=10, max_items_per_bundle=items_per_bundle)
                    bundles = [b async for b in stream]
                except BundleRecError:
                    return
            anchored = [b for b in bundles if b.items[0].item_id == c["anchor"]]
            out[i] = [it.item_id for it in anchored[0].items[1:]] if anchored else []

        await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
    return out


def run_complements_rpc(target: str, data: Data, max_users: int, concurrency: int = 4, timeout: float = 10.0,
                        draws: int = 1000, k: int = 5, events: bool = False) -> dict[str, Any]:
    """Complements' Recall@k through Recommend (query = an item of the shopper's held-out basket, the bundle
    anchored on it, k complements asked) without and with history, against the offline baselines on the same
    anchors; all / repeat (bought before) / explore targets; paired bootstrap over shoppers."""
    cases = complement_cases(data, max_users)
    lists: dict[str, list[list[str] | None]] = dict(complement_baselines(data, cases))
    lists["served"] = asyncio.run(served_complements(target, cases, False, k + 1, concurrency, timeout))
    lists["served_history"] = asyncio.run(served_complements(target, cases, "ids", k + 1, concurrency, timeout))
    lists["served_counts"] = asyncio.run(served_complements(target, cases, "counts", k + 1, concurrency, timeout))
    recorded = None
    if events:
        recorded = asyncio.run(record_histories(target, data, cases, timeout))
        lists["served_events"] = asyncio.run(served_complements(target, cases, "events", k + 1, concurrency, timeout))
    ok = [i for i in range(len(cases)) if all(v[i] is not None for v in lists.values())]
    groups = np.arange(len(ok))
    weights = bootstrap_weights(len(ok), draws, seed=2)
    rec: dict[str, dict[str, np.ndarray]] = {}
    for name, ls in lists.items():
        r: dict[str, list[float]] = {"r5": [], "repeat5": [], "explore5": [], "r5_found": []}
        for i in ok:
            c, got = cases[i], set((ls[i] or [])[:k])
            seen = set(c["seen"])
            # the same recall over the cases whose anchored bundle was served (retrieval found the anchor)
            r["r5_found"].append(len(got & set(c["targets"])) / len(c["targets"]) if lists["served_history"][i]
                                 else float("nan"))
            for key, t in (("r5", set(c["targets"])), ("repeat5", set(c["targets"]) & seen),
                           ("explore5", set(c["targets"]) - seen)):
                r[key].append(len(got & t) / len(t) if t else float("nan"))
        rec[name] = {key: np.asarray(v, dtype=np.float64) for key, v in r.items()}
    methods = {}
    for name, r in rec.items():
        methods[name] = {key: mean_ci(v, groups, weights) for key, v in r.items()}
        methods[name]["ratio_vs_personal_cooccurrence"] = paired_ratio(r["r5"], rec["personal_cooccurrence"]["r5"],
                                                                       groups, weights)
        methods[name]["ratio_found_vs_personal_cooccurrence"] = paired_ratio(
            r["r5_found"], rec["personal_cooccurrence"]["r5_found"], groups, weights)
    found = np.mean([bool(lists["served"][i]) for i in ok]) if ok else None
    return {"cases": len(cases), "scored": len(ok), "k": k, "anchor_bundle_found": float(found) if ok else None,
            "events_recorded": recorded,
            "personal_baseline": {"weight": PERSONAL_BASELINE[0], "decay": PERSONAL_BASELINE[1]},
            "methods": methods,
            "target": {"rule": "served R@5 with history >= 1.1 x personal_cooccurrence",
                       "ratio_ids": methods["served_history"]["ratio_vs_personal_cooccurrence"]["ratio"],
                       "ratio_counts": methods["served_counts"]["ratio_vs_personal_cooccurrence"]["ratio"]}}


# -------------------------------------------------------------------------------------------- report

TARGETS = {"ratio_low": 0.97, "stretch": 1.1, "coverage": 0.98}


def targets_check(view: dict[str, Any], method: str = "learned") -> dict[str, Any]:
    """Issue 11's targets for the served-list candidate ``method`` on one view."""
    m = view["methods"].get(method)
    if m is None:
        return {}
    ref, pop = view["methods"]["cooccurrence"], view["methods"]["popularity"]
    ratio = m["ratio_vs_cooccurrence"]["r5"]
    lt = m["ratio_vs_cooccurrence"]["long_tail"]

    def ge(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and a >= b

    return {
        "method": method,
        "r5_ratio_vs_cooccurrence": ratio,
        "ratio_ci_not_below_0.97": bool(ratio["ci95"]) and ge(ratio["ci95"][0], TARGETS["ratio_low"]),
        "r5_at_least_popularity": ge(m["r5"]["mean"], pop["r5"]["mean"]),
        "stretch_1.1x": ge(ratio["ratio"], TARGETS["stretch"]),
        "long_tail_not_below_cooccurrence": ge(m["long_tail"]["mean"], ref["long_tail"]["mean"]),
        "long_tail_ratio": lt,
        "long_tail_top_ratio": m["ratio_vs_cooccurrence"]["long_tail_top"],
        "coverage_at_least_0.98": bool(m["coverage"] >= TARGETS["coverage"]),
    }


def _ci(x: dict[str, Any] | None, digits: int = 4) -> str:
    if not x or x.get("mean") is None:
        return "-"
    lo, hi = x["ci95"]
    return f"{x['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _ratio(x: dict[str, Any] | None) -> str:
    if not x or x.get("ratio") is None:
        return "-"
    return f"{x['ratio']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"


def markdown_tables(res: dict[str, Any]) -> str:
    """The tables of docs/bundles.md (one per view, then personalization)."""
    lines = []
    for label, view in res.get("views", {}).items():
        sp = view["split"]
        lines += [f"**{label} split** — {sp['train']} train orders ({sp['fit']} fit + {sp['val']} validation), "
                  f"{sp['test']} test baskets ({sp['test_baskets_with_history']} of returning shoppers), "
                  f"{view['pairs']} (basket, anchor) pairs; 95 % intervals from {view['bootstrap_draws']} "
                  "bootstrap resamples of test baskets.", "",
                  "| method | R@5 | × co-occurrence (R@5) | R@10 | R@20 | NDCG@10 | hit@10 | long-tail R@10 | "
                  "× co-occurrence (long tail) | long tail within the top 20 | coverage | mean pop. top-5 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in view["methods"].items():
            lines.append(f"| {name} | {_ci(m['r5'])} | {_ratio(m['ratio_vs_cooccurrence']['r5'])} | {_ci(m['r10'])} | "
                         f"{_ci(m['r20'])} | {_ci(m['ndcg10'])} | {_ci(m['hit10'])} | {_ci(m['long_tail'])} | "
                         f"{_ratio(m['ratio_vs_cooccurrence']['long_tail'])} | {_ci(m.get('long_tail_top'))} | "
                         f"{m['coverage']:.3f} | {m['pop5'] or 0:.0f} |")
        lines += ["", "| method | R@5 head (≥ 100) | middle (10–99) | tail (1–9) | unseen | returning shoppers | first order |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in view["methods"].items():
            f, s = m["by_anchor_frequency"], m.get("by_shopper", {})
            cells = [f[b]["r5"] for b in ("head", "middle", "tail", "unseen")] + [s.get(k, {}).get("r5") for k in
                                                                                 ("returning", "first_order")]
            lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
        lines.append("")
    per = res.get("personalization")
    if per:
        lines += [f"**personalization** (user split, {per['test_baskets']} test baskets of returning shoppers, "
                  f"{per['pairs']} pairs)", "",
                  "| method | R@5 | × personal co-occurrence | R@10 | repeat R@5 | explore R@5 |", "|---|---|---|---|---|---|"]
        for name, m in per["methods"].items():
            lines.append(f"| {name} | {_ci(m['r5'])} | {_ratio(m['ratio_vs_personal_cooccurrence']['r5'])} | "
                         f"{_ci(m['r10'])} | {_ci(m['repeat5'])} | {_ci(m['explore5'])} |")
    return "\n".join(lines) + "\n"


def print_report(res: dict[str, Any], file=sys.stdout) -> None:
    print(markdown_tables(res), file=file)
    for label, view in res.get("views", {}).items():
        t = targets_check(view)
        if t:
            print(f"[{label}] targets: {json.dumps({k: v for k, v in t.items() if isinstance(v, bool)})}", file=file)
    nb = res.get("next_basket")
    if nb:
        print(f"\nnext basket ({nb['scored']}/{nb['users']} users scored, errors {nb['errors']}): "
              f"recall plain {_fmt(nb['recall_plain'])}, personalized {_fmt(nb['recall_personalized'])}, "
              f"diff {nb['diff_mean']:+.4f} (95% CI {nb['diff_ci95'][0]:+.4f} .. {nb['diff_ci95'][1]:+.4f}), "
              f"wins/ties/losses {nb['wins']}/{nb['ties']}/{nb['losses']}", file=file)


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def _bars(ax, names: Sequence[str], stats: Sequence[dict[str, Any]], title: str, color=None) -> None:
    vals = [s["mean"] or 0.0 for s in stats]
    err = np.asarray([[v - (s["ci95"] or [v, v])[0] for v, s in zip(vals, stats)],
                      [(s["ci95"] or [v, v])[1] - v for v, s in zip(vals, stats)]])
    bars = ax.barh(names, vals, xerr=err, color=color, capsize=2)
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=8)
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = res.get("views", {})
    per = res.get("personalization")
    rows = max(len(views) + (1 if per else 0), 1)  # one row of three panels per view, then personalization
    fig, grid = plt.subplots(rows, 3, figsize=(15.0, 4.4 * rows), squeeze=False)
    axes = list(grid.ravel())
    for label, view in views.items():
        names = list(view["methods"])
        ms = [view["methods"][n] for n in names]
        colors = ["#3b7dd8" if n == "learned" else "#999999" for n in names]
        _bars(axes.pop(0), names, [m["r5"] for m in ms], f"{label} split: Recall@5 (other aisles), 95 % CI", colors)
        ax = axes.pop(0)
        rat = [m["ratio_vs_cooccurrence"]["r5"] for m in ms]
        _bars(ax, names, [{"mean": r["ratio"], "ci95": r["ci95"]} for r in rat],
              f"{label} split: Recall@5 / co-occurrence (paired CI)", colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(TARGETS["ratio_low"], color="r", lw=0.8, ls="--")
        ax = axes.pop(0)
        y = np.arange(len(names))
        for j, (key, lab) in enumerate((("long_tail", "head removed from candidates"),
                                        ("long_tail_top", "head removed from the top 20"))):
            ax.barh(y + (j - 0.5) * 0.4, [(m.get(key) or {}).get("mean") or 0.0 for m in ms], 0.4, label=lab)
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{label} split: long-tail Recall@10", fontsize=9)
        ax.legend(fontsize=7)
    if per:
        ax = axes.pop(0)
        names = list(per["methods"])
        x = np.arange(len(names))
        for j, (key, lab) in enumerate((("r5", "R@5"), ("repeat5", "repeat R@5"), ("explore5", "explore R@5"))):
            vals = [per["methods"][n][key]["mean"] or 0.0 for n in names]
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=lab)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"personalization ({per['test_baskets']} returning shoppers)", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes:  # the personalization row's unused panels
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                   help="merge the views of earlier runs (e.g. one process per view) instead of running")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown")
    p.add_argument("--views", default="user,order", help="comma list of: user (latest order per shopper), order (hash)")
    p.add_argument("--no-learned", action="store_true", help="skip the LambdaRank re-ranker")
    p.add_argument("--no-personalization", action="store_true")
    p.add_argument("--leave-shopper-out", action="store_true",
                   help="ablation: the ranker's label baskets' features leave out their own shopper's other baskets")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--kmax", type=int, default=20, help="list length (the served top_k)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--test-pct", type=float, default=20.0)
    p.add_argument("--salt", default=SALT)
    p.add_argument("--target", help="HOST:PORT of a bundlerec server for the next-basket check")
    p.add_argument("--max-users", type=int, default=300)
    p.add_argument("--query-from", choices=("aisle", "head"), default="aisle")
    p.add_argument("--max-bundles", type=int, default=10)
    p.add_argument("--items-per-bundle", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--complements-target", metavar="HOST:PORT",
                   help="complements' Recall@5 through Recommend (bundle anchored on a held-out basket item), "
                        "without and with history, vs co-occurrence (+ the shopper's purchase counts)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--record-events", action="store_true",
                   help="with --complements-target: also record each shopper's earlier orders as PURCHASE events "
                        "(the server needs --events-db) and score Recommend with only the user id")
    p.add_argument("--tune-history", action="store_true",
                   help="only tune the served personal mix (weight, count half-life) on validation baskets of "
                        "training orders, print the grid (and --json), then exit")
    p.add_argument("--prepare-artifact-data", type=Path, metavar="DIR",
                   help="only write the restricted instacart folder for the --target artifact, then exit")
    args = p.parse_args(argv)

    if args.from_json:
        res = merge_results([json.loads(f.read_text()) for f in args.from_json])
        return write_outputs(res, args)
    if args.data_dir is None:
        p.error("--data-dir is required (unless --from-json)")
    data = load_instacart(args.data_dir)
    if args.prepare_artifact_data:
        info = prepare_artifact_data(data, args.data_dir, args.prepare_artifact_data)
        print(json.dumps(info))
        return 0
    if args.tune_history:
        tuned = tune_history(data)
        print(json.dumps(tuned["best"], indent=1), f"no personalization: {tuned['no_personal_r5']:.4f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"tune_history": tuned}, indent=2))
        return 0
    if args.complements_target:
        t0 = time.perf_counter()
        out = run_complements_rpc(args.complements_target, data, args.max_users, args.concurrency, args.timeout,
                                  args.draws, events=args.record_events)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps({n: {k: v["mean"] for k, v in m.items() if "mean" in v} for n, m in out["methods"].items()},
                         indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"complements_rpc": out}, indent=2))
        return 0
    from bundlerec_export.splits import user_level_split

    pr = prepare(data)
    res: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"products_in_catalog": data.all_products, "products_ordered": len(data.products),
                 "orders": len(data.orders), "dropped_lines": data.dropped_lines},
        "views": {},
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for label in [v.strip() for v in args.views.split(",") if v.strip()]:
        split = user_level_split(pr.users, pr.numbers) if label == "user" else order_level_split(data, args.test_pct, args.salt)
        res["views"][label], ctx = run_view(pr, split, label, args.kmax, args.draws, not args.no_learned, args.progress, log,
                                            leave_shopper_out=args.leave_shopper_out)
        res["views"][label]["targets"] = targets_check(res["views"][label])
        if label == "user" and not args.no_personalization:
            res["personalization"] = run_personalization(pr, ctx, args.kmax, args.draws, log)
    if args.target:
        cases = next_basket_cases(data, args.max_users, args.query_from, salt=args.salt)
        t0 = time.perf_counter()
        res["next_basket"] = asyncio.run(run_next_basket(args.target, cases, args.max_bundles,
                                                         args.items_per_bundle, args.concurrency, args.timeout))
        res["next_basket"]["seconds"] = round(time.perf_counter() - t0, 2)
        res["next_basket"]["examples"] = [{k: c[k] for k in ("user_id", "query", "query_item")} for c in cases[:5]]
    return write_outputs(res, args)


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs: views and personalization from whichever run has them (later wins)."""
    out: dict[str, Any] = {"config": [p.get("config") for p in parts], "data": parts[0].get("data"), "views": {}}
    for part in parts:
        out["views"].update(part.get("views", {}))
        for key in ("personalization", "next_basket"):
            if key in part:
                out[key] = part[key]
    return out


def write_outputs(res: dict[str, Any], args: argparse.Namespace) -> int:
    print_report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_tables(res))
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundle quality on Instacart orders: complement completion (offline) and next-basket personalization (server).

    python -m benchmarks.bundle_quality --data-dir /work/shared/data/instacart \
        --json runs/bundle_quality.json --plot runs/bundle_quality.png [--target 127.0.0.1:50071 --max-users 300]

    # the artifact for --target (catalog = products that appear in the orders; the users' target orders left
    # out of its order files, so their next basket never feeds the complements it is scored against):
    python -m benchmarks.bundle_quality --data-dir /work/shared/data/instacart --prepare-artifact-data /tmp/bq-data
    bundlerec-export --dataset instacart --data-dir /tmp/bq-data --out artifacts/instacart-bq --no-progress
    bundlerec-server --artifact artifacts/instacart-bq --port 50071

1. **Bundle completion** (no server). Orders are split by a stable hash of ``order_id`` (sha1, ``--test-pct``
   default 20 % test). Complements are mined on the TRAIN orders with the project's own
   ``bundlerec_export.complements.mine_cooccurrence`` and the build's defaults (``BuildConfig``: min_support,
   top_k, shrinkage, user-level evidence, category = aisle, cross-aisle only). For every TEST basket and every
   item of it taken as the anchor, Recall@K (K = 3, 5, 10) = |top-K of the method ∩ targets| / |targets|,
   macro-averaged over (basket, anchor) pairs that have at least one target. Two target definitions:

   * ``other_aisle`` (headline, fair to a cross-category method): targets = the basket's other items in an
     aisle different from the anchor's; EVERY method's candidates are restricted the same way (other aisles).
   * ``all``: targets = all the basket's other items; baselines unrestricted, complements as built (cross-aisle).

   Methods: ``complements`` (NPMI, shrunk, user-level), ``cooccurrence`` (top-K by number of train baskets
   shared with the anchor; ties: item popularity, then row), ``popularity_department`` (the K most popular
   train items of the anchor's department, anchor excluded), ``popularity_global``. Popularity = train baskets
   containing the item. A method with no candidate for an anchor scores 0 for it (counted in ``pairs_empty``,
   distinct anchors in ``anchors_empty``); ``recall_covered`` averages over the pairs where it had candidates.
   ``complements_user_level`` (diagnostic): the same mining with user-level evidence
   (``--basket-level-evidence`` in the build), to show what the user-level unit costs or buys.

2. **Next-basket personalization** (``--target``). Users with >= 3 orders (whole orders.csv): the last order
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
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KS = (3, 5, 10)
VARIANTS = ("other_aisle", "all")
METHODS = ("complements", "cooccurrence", "popularity_department", "popularity_global", "complements_user_level")
SALT = "bundle-quality"
TARGET_RATIO = 1.5  # issue 5: complements Recall@5 >= 1.5 x popularity-within-department


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
    meta: dict[str, tuple[str, int]] = {}
    with open(data_dir / "orders.csv", newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            meta[row["order_id"].strip()] = (row["user_id"].strip(), int(row.get("order_number") or 0))
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
        user, number = meta.get(oid, ("", 0))
        orders.append(Order(oid, user, number, list(dict.fromkeys(p for _, p in sorted(its, key=lambda t: t[0])))))
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


@dataclass
class MethodScore:
    recall_sum: dict[int, float] = field(default_factory=dict)
    covered_sum: dict[int, float] = field(default_factory=dict)
    pairs: int = 0
    pairs_empty: int = 0
    anchors_empty: set[int] = field(default_factory=set)

    def as_dict(self, ks: Sequence[int]) -> dict[str, Any]:
        covered = self.pairs - self.pairs_empty
        return {
            "recall": {str(k): (self.recall_sum.get(k, 0.0) / self.pairs if self.pairs else None) for k in ks},
            "recall_covered": {str(k): (self.covered_sum.get(k, 0.0) / covered if covered else None) for k in ks},
            "pairs": self.pairs, "pairs_empty": self.pairs_empty,
            "pair_coverage": covered / self.pairs if self.pairs else None,
            "anchors_empty": len(self.anchors_empty),
        }


def targets_of(basket: Sequence[int], anchor: int, aisles: Sequence[str], variant: str) -> set[int]:
    """The basket's other items; for ``other_aisle`` only those in a different (or unknown) aisle."""
    if variant == "all":
        return {r for r in basket if r != anchor}
    if variant == "other_aisle":
        aa = aisles[anchor]
        return {r for r in basket if r != anchor and (not aa or not aisles[r] or aisles[r] != aa)}
    raise ValueError(f"unknown variant {variant!r}")


def evaluate_completion(test_baskets: Iterable[Sequence[int]], rankers: dict[str, Ranker],
                        aisles: Sequence[str], variant: str, ks: Sequence[int] = KS) -> dict[str, Any]:
    """Macro-averaged Recall@k over (basket, anchor) pairs with >= 1 target; per method, plus pair counts."""
    scores = {name: MethodScore() for name in rankers}
    pairs = skipped = 0
    anchors: set[int] = set()
    for basket in test_baskets:
        basket = list(dict.fromkeys(basket))
        for anchor in basket:
            targets = targets_of(basket, anchor, aisles, variant)
            if not targets:
                skipped += 1
                continue
            pairs += 1
            anchors.add(anchor)
            for name, rank in rankers.items():
                ranked = [int(r) for r in rank(anchor)]
                s = scores[name]
                s.pairs += 1
                if not ranked:
                    s.pairs_empty += 1
                    s.anchors_empty.add(anchor)
                for k in ks:
                    rec = recall_at_k(ranked, targets, k) or 0.0
                    s.recall_sum[k] = s.recall_sum.get(k, 0.0) + rec
                    if ranked:
                        s.covered_sum[k] = s.covered_sum.get(k, 0.0) + rec
    return {"variant": variant, "pairs": pairs, "pairs_without_target": skipped, "anchors": len(anchors),
            "methods": {name: s.as_dict(ks) for name, s in scores.items()}}


def build_defaults() -> dict[str, Any]:
    """The complement settings of ``BuildConfig`` (so the benchmark follows the build's defaults)."""
    from bundlerec_export.build import BuildConfig

    f = {x.name: x.default for x in dataclasses.fields(BuildConfig)}
    return {k: f[k] for k in ("min_support", "top_k", "shrinkage", "user_level_evidence", "min_users")}


def run_completion(data: Data, test_pct: float, ks: Sequence[int] = KS, salt: str = SALT) -> dict[str, Any]:
    from bundlerec_export import complements as cmp

    t0 = time.perf_counter()
    ids = sorted(data.products, key=lambda p: int(p) if p.isdigit() else p)
    row = {p: i for i, p in enumerate(ids)}
    aisles = [data.products[p][1] for p in ids]
    departments = [data.products[p][2] for p in ids]
    n = len(ids)
    train, test = [], []
    for o in data.orders:
        (test if split_of_order(o.order_id, test_pct, salt) == "test" else train).append(o)
    train_b = [[row[p] for p in o.items] for o in train]
    test_b = [[row[p] for p in o.items] for o in test]
    d = build_defaults()
    users = [o.user_id for o in train] if d["user_level_evidence"] else None
    support_users = [o.user_id for o in train]
    comp, stats = cmp.mine_cooccurrence(train_b, n, aisles, users=users, min_support=d["min_support"],
                                        top_k=d["top_k"], shrinkage=d["shrinkage"], support_users=support_users,
                                        min_users=d["min_users"])
    # diagnostic: the same mining with user-level evidence (the build's --user-level-evidence)
    comp_b, stats_b = cmp.mine_cooccurrence(train_b, n, aisles, users=support_users, min_support=d["min_support"],
                                            top_k=d["top_k"], shrinkage=d["shrinkage"])
    t_mine = time.perf_counter() - t0
    counts = cmp.item_counts(train_b, n)
    kmax = max(ks)
    results = {}
    for variant in VARIANTS:
        cross = variant == "other_aisle"
        rankers = {
            "complements": complements_ranker(comp),
            "cooccurrence": cooccurrence_ranker(train_b, counts, aisles, cross, kmax),
            "popularity_department": popularity_ranker(counts, departments, aisles, cross, kmax),
            "popularity_global": popularity_ranker(counts, None, aisles, cross, kmax),
            "complements_user_level": complements_ranker(comp_b),
        }
        results[variant] = evaluate_completion(test_b, rankers, aisles, variant, ks)
    train_items = set(np.flatnonzero(counts).tolist())
    test_anchor_rows = {r for b in test_b for r in b}
    head = results["other_aisle"]["methods"]
    r5c, r5p = head["complements"]["recall"]["5"], head["popularity_department"]["recall"]["5"]
    return {
        "split": {"hash": "sha1(salt:order_id)", "salt": salt, "test_pct": test_pct, "train_orders": len(train),
                  "test_orders": len(test), "train_user_count": len({o.user_id for o in train}),
                  "test_items_unseen_in_train": len(test_anchor_rows - train_items)},
        "complement_settings": {**d, "category": "aisle", "cross_category_only": True, "method": stats.method,
                                "evidence_unit": stats.unit, "evidence_units": stats.units,
                                "pairs": stats.pairs, "anchors_with_complements": stats.anchors,
                                "user_level_diagnostic": {"pairs": stats_b.pairs, "anchors": stats_b.anchors}},
        "catalog_items": n,
        "variants": results,
        "target": {"rule": f"complements Recall@5 >= {TARGET_RATIO} x popularity_department (other_aisle)",
                   "ratio": (r5c / r5p) if r5p else None,
                   "met": bool(r5p and r5c >= TARGET_RATIO * r5p)},
        "seconds": round(time.perf_counter() - t0, 2), "mining_seconds": round(t_mine, 2),
    }


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
        cases.append({"user_id": u, "order_id": target.order_id, "targets": list(target.items),
                      "history": history, "query": query_for(data.products[pick], query_from), "query_item": pick})
    return cases


async def run_next_basket(target: str, cases: list[dict[str, Any]], max_bundles: int, items_per_bundle: int,
                          concurrency: int, timeout: float) -> dict[str, Any]:
    from bundlerec import AsyncClient, BundleRecError

    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = [{} for _ in cases]
    errors: dict[str, int] = {}

    async with AsyncClient(target, timeout=timeout) as client:
        await client.health()

        async def call(case: dict[str, Any], recent: list[str]) -> tuple[set[str], bool] | None:
            try:
                stream = client.recommend(case["query"], recent_item_ids=recent, max_bundles=max_bundles,
                                          max_items_per_bundle=items_per_bundle)
                got = {it.item_id async for b in stream for it in b.items}
                return got, bool(stream.summary and stream.summary.personalized)
            except BundleRecError as exc:
                key = getattr(exc, "code", None)
                key = getattr(key, "name", None) or str(key or type(exc).__name__)
                errors[key] = errors.get(key, 0) + 1
                return None

        async def one(i: int, case: dict[str, Any]) -> None:
            async with sem:
                plain = await call(case, [])
                pers = await call(case, case["history"])
            targets = set(case["targets"])
            rec = {}
            for name, res in (("plain", plain), ("personalized", pers)):
                if res is None:
                    rec[name] = None
                    continue
                got, flag = res
                rest = targets - {case["query_item"]}
                rec[name] = {"recall": len(got & targets) / len(targets), "items": len(got), "flag": flag,
                             "recall_rest": len(got & rest) / len(rest) if rest else None}
            out[i] = rec

        await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))

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
    }


# -------------------------------------------------------------------------------------------- report


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def print_report(res: dict[str, Any], ks: Sequence[int] = KS, file=sys.stdout) -> None:
    comp = res["completion"]
    sp = comp["split"]
    print(f"bundle completion: {sp['train_orders']} train / {sp['test_orders']} test orders "
          f"(sha1 split, {sp['test_pct']}% test); complements: {comp['complement_settings']['pairs']} pairs for "
          f"{comp['complement_settings']['anchors_with_complements']} anchors "
          f"({comp['complement_settings']['evidence_unit']}-level)", file=file)
    for variant in VARIANTS:
        v = comp["variants"][variant]
        print(f"\n[{variant}] {v['pairs']} (basket, anchor) pairs, {v['anchors']} distinct anchors, "
              f"{v['pairs_without_target']} pairs without target skipped", file=file)
        head = f"{'method':24s}" + "".join(f"  R@{k:<4d}" for k in ks) + "  coverage  anchors_empty  R@5|covered"
        print(head, file=file)
        for name, m in v["methods"].items():
            print(f"{name:24s}" + "".join(f"  {_fmt(m['recall'][str(k)])}" for k in ks)
                  + f"  {_fmt(m['pair_coverage'])}    {m['anchors_empty']:>10d}  {_fmt(m['recall_covered']['5'])}",
                  file=file)
    t = comp["target"]
    ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}"
    print(f"\ntarget {t['rule']}: ratio {ratio} -> {'MET' if t['met'] else 'NOT met'}", file=file)
    nb = res.get("next_basket")
    if nb:
        print(f"\nnext basket ({nb['scored']}/{nb['users']} users scored, errors {nb['errors']}): "
              f"recall plain {_fmt(nb['recall_plain'])}, personalized {_fmt(nb['recall_personalized'])}, "
              f"diff {nb['diff_mean']:+.4f} (95% CI {nb['diff_ci95'][0]:+.4f} .. {nb['diff_ci95'][1]:+.4f}), "
              f"wins/ties/losses {nb['wins']}/{nb['ties']}/{nb['losses']}; "
              f"hit rate {_fmt(nb['hit_rate_plain'])} -> {_fmt(nb['hit_rate_personalized'])} "
              f"-> {'MET' if nb['target']['met'] else 'NOT met'}", file=file)
        r = nb["rest"]
        if r["scored"]:
            print(f"  without the query's own item ({r['scored']} users): recall plain {_fmt(r['recall_plain'])}, "
                  f"personalized {_fmt(r['recall_personalized'])}, diff {r['diff_mean']:+.4f} "
                  f"(se {r['diff_se']:.4f}); returned items plain {nb['mean_items_plain']:.1f}, "
                  f"personalized {nb['mean_items_personalized']:.1f}", file=file)


def plot(res: dict[str, Any], path: Path, ks: Sequence[int] = KS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = res.get("next_basket")
    panels = len(VARIANTS) + (1 if nb else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    axes = np.atleast_1d(axes)
    for ax, variant in zip(axes, VARIANTS):
        v = res["completion"]["variants"][variant]
        names = list(v["methods"])
        width = 0.8 / len(names)
        x = np.arange(len(ks))
        for j, name in enumerate(names):
            vals = [v["methods"][name]["recall"][str(k)] or 0.0 for k in ks]
            bars = ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
            ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(x, [f"R@{k}" for k in ks])
        ax.set_title(f"bundle completion, targets: {variant}\n({v['pairs']} pairs)", fontsize=9)
        ax.set_ylabel("macro recall")
        ax.set_ylim(0, max(0.05, ax.get_ylim()[1] * 1.15))
        ax.legend(fontsize=7)
    if nb:
        ax = axes[-1]
        vals = [nb["recall_plain"] or 0.0, nb["recall_personalized"] or 0.0]
        bars = ax.bar(["without history", "with history"], vals, color=["#999999", "#3b7dd8"])
        ax.bar_label(bars, fmt="%.4f", fontsize=8)
        ax.set_title(f"next basket recall ({nb['scored']} users)\n"
                     f"diff {nb['diff_mean']:+.4f}, 95% CI {nb['diff_ci95'][0]:+.4f}..{nb['diff_ci95'][1]:+.4f}",
                     fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--test-pct", type=float, default=20.0)
    p.add_argument("--salt", default=SALT)
    p.add_argument("--target", help="HOST:PORT of a bundlerec server for the next-basket check")
    p.add_argument("--max-users", type=int, default=300)
    p.add_argument("--query-from", choices=("aisle", "head"), default="aisle")
    p.add_argument("--max-bundles", type=int, default=10)
    p.add_argument("--items-per-bundle", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--prepare-artifact-data", type=Path, metavar="DIR",
                   help="only write the restricted instacart folder for the --target artifact, then exit")
    args = p.parse_args(argv)

    data = load_instacart(args.data_dir)
    if args.prepare_artifact_data:
        info = prepare_artifact_data(data, args.data_dir, args.prepare_artifact_data)
        print(json.dumps(info))
        return 0
    res: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"products_in_catalog": data.all_products, "products_ordered": len(data.products),
                 "orders": len(data.orders), "dropped_lines": data.dropped_lines},
        "completion": run_completion(data, args.test_pct, KS, args.salt),
    }
    if args.target:
        cases = next_basket_cases(data, args.max_users, args.query_from, salt=args.salt)
        t0 = time.perf_counter()
        res["next_basket"] = asyncio.run(run_next_basket(args.target, cases, args.max_bundles,
                                                         args.items_per_bundle, args.concurrency, args.timeout))
        res["next_basket"]["seconds"] = round(time.perf_counter() - t0, 2)
        res["next_basket"]["examples"] = [{k: c[k] for k in ("user_id", "query", "query_item")} for c in cases[:5]]
    print_report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

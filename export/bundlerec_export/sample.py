"""Derive a small, real, deterministic Instacart sample (the demo data and the test slice).

Method (seeded, so the same source and parameters give byte-identical files):

1. shuffle the users of ``orders.csv`` with ``numpy.random.default_rng(seed)`` and take whole users (all
   their orders, so histories stay intact) until at least ``--orders`` orders are taken;
2. count, over those orders, the baskets each product occurs in; keep products with at least
   ``--min-count`` occurrences (so every kept product can have co-occurrence evidence), and, with
   ``--max-products``, only the most frequent ones (ties by product id);
3. write ``products.csv`` (kept products, source order), ``orders.csv`` (taken orders still holding a kept
   product, source order) and ``order_items.csv`` (their lines for kept products, source order), with the
   source columns unchanged.

Usage::

    python -m bundlerec_export.sample --src ../shared/data/instacart --out data/demo/instacart
    python -m bundlerec_export.sample --src ../shared/data/instacart --out tests/data/instacart_slice \
        --orders 1500 --max-products 300 --seed 7
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import numpy as np

DEMO_DEFAULTS = {"orders": 6000, "min_count": 2, "max_products": None, "seed": 20240601}


def derive(src: Path, out: Path, *, orders: int = 6000, min_count: int = 2, max_products: int | None = None,
           seed: int = 20240601) -> dict[str, int]:
    src, out = Path(src), Path(out)
    with open(src / "orders.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        orders_header = next(reader)
        order_rows = list(reader)
    uid = orders_header.index("user_id")
    oid = orders_header.index("order_id")
    by_user: dict[str, list[str]] = {}
    for row in order_rows:
        by_user.setdefault(row[uid], []).append(row[oid])
    users = sorted(by_user, key=lambda u: (len(u), u))
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    for i in rng.permutation(len(users)):
        if len(taken) >= orders:
            break
        taken.update(by_user[users[i]])

    with open(src / "order_items.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        items_header = next(reader)
        ioid, ipid = items_header.index("order_id"), items_header.index("product_id")
        lines = [row for row in reader if row[ioid] in taken]
    counts: Counter[str] = Counter()
    for pid in {(r[ioid], r[ipid]) for r in lines}:
        counts[pid[1]] += 1
    keep = [p for p, c in counts.items() if c >= min_count]
    if max_products is not None:
        keep = sorted(keep, key=lambda p: (-counts[p], int(p) if p.isdigit() else p))[:max_products]
    keep_set = set(keep)
    lines = [r for r in lines if r[ipid] in keep_set]
    kept_orders = {r[ioid] for r in lines}

    out.mkdir(parents=True, exist_ok=True)
    with open(src / "products.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        prod_header = next(reader)
        ppid = prod_header.index("product_id")
        products = [row for row in reader if row[ppid] in keep_set]
    _write(out / "products.csv", prod_header, products)
    _write(out / "orders.csv", orders_header, [r for r in order_rows if r[oid] in kept_orders])
    _write(out / "order_items.csv", items_header, lines)
    return {"products": len(products), "orders": len(kept_orders), "order_items": len(lines)}


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, required=True, help="instacart folder (products/orders/order_items.csv)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--orders", type=int, default=DEMO_DEFAULTS["orders"], help="orders to take (whole users)")
    p.add_argument("--min-count", type=int, default=DEMO_DEFAULTS["min_count"], help="min baskets per product")
    p.add_argument("--max-products", type=int, default=DEMO_DEFAULTS["max_products"])
    p.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    a = p.parse_args(argv)
    stats = derive(a.src, a.out, orders=a.orders, min_count=a.min_count, max_products=a.max_products, seed=a.seed)
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

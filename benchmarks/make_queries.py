"""Derives short grocery queries from Instacart product and aisle names (deterministic).

    python -m benchmarks.make_queries --products /work/shared/data/instacart/products.csv \
        --out benchmarks/queries/instacart.txt [--n 400] [--seed 13]

Queries are what shoppers type: 1–3 word head terms. From each product name the last one or two
words (the head noun phrase, e.g. "Chocolate Sandwich Cookies" -> "sandwich cookies", "cookies"),
and the first three words of some names (brand + type); plus every aisle name. Head terms are
weighted by how many products share them, so frequent grocery nouns dominate as they would in a log.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np

_TOKEN = re.compile(r"[a-z][a-z'&-]*")
_STOP = {"and", "with", "of", "in", "the", "for", "a", "to", "&", "or", "no", "oz", "fl", "lb", "ct", "pack"}
# words that end product names but are not what a shopper searches for on their own
_NOT_HEAD = {"style", "taste", "level", "original", "organic", "natural", "free", "size", "flavor", "flavored",
             "classic", "blend", "mix", "pouch", "pouches", "count", "value", "family", "plus", "light", "lite",
             "fresh", "large", "small", "medium", "whole", "regular", "extra", "variety", "assorted", "select",
             "premium", "pure", "unsweetened", "reduced", "fat", "low", "sodium", "gluten", "whenever", "max",
             "ultra", "minis", "mini", "bites", "bags", "bag", "box", "jar", "can", "bottle", "packs", "roll"}


def words(name: str) -> list[str]:
    return [w for w in _TOKEN.findall(name.lower()) if w not in _STOP and len(w) > 1]


def make_queries(products_csv: Path, n: int = 400, seed: int = 13) -> list[str]:
    heads: Counter[str] = Counter()
    aisles: set[str] = set()
    with open(products_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            w = words(row["product_name"])
            if row.get("aisle") and row["aisle"] != "missing":
                aisles.add(row["aisle"].strip().lower())
            if not w:
                continue
            if w[-1] not in _NOT_HEAD:
                heads[w[-1]] += 1
            if len(w) >= 2 and not (w[-1] in _NOT_HEAD and w[-2] in _NOT_HEAD):
                heads[" ".join(w[-2:])] += 1
            if len(w) >= 4:
                heads[" ".join(w[:3])] += 1
    rng = np.random.default_rng(seed)
    terms = [t for t, c in heads.items() if c >= 3]  # drop one-off fragments
    weights = np.array([heads[t] for t in terms], dtype=np.float64) ** 0.5
    n_aisle = min(len(aisles), n // 4)
    chosen = list(rng.choice(sorted(aisles), size=n_aisle, replace=False))
    picks = rng.choice(len(terms), size=min(len(terms), n - n_aisle), replace=False, p=weights / weights.sum())
    chosen += [terms[i] for i in picks]
    out = list(dict.fromkeys(chosen))
    rng.shuffle(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_queries")
    p.add_argument("--products", type=Path, default=Path("/work/shared/data/instacart/products.csv"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "queries" / "instacart.txt")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=13)
    args = p.parse_args(argv)
    queries = make_queries(args.products, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {len(queries)} grocery queries derived from Instacart product/aisle names by "
              f"benchmarks/make_queries.py (seed {args.seed}); one per line\n")
    args.out.write_text(header + "\n".join(queries) + "\n", encoding="utf-8")
    print(f"wrote {len(queries)} queries to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

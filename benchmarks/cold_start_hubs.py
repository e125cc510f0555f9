"""Hubs and substitutes of the cold-start lists of whole catalogs without orders, and the anti-hub correction.

    # Home Depot (the artifact's titles; base-MiniLM embeddings cached in <artifact>.work) and Icecat (full catalogs)
    python -m benchmarks.cold_start_hubs catalogs --homedepot runs/hd --served /work/main/artifacts/homedepot \
        --icecat ../shared/data/icecat --json docs/results/cold-start-hubs.json
    # the same corrections on Instacart cold anchors (content-only rows of benchmarks/cold_start_eval.py)
    python -m benchmarks.cold_start_hubs instacart --data-dir ../shared/data/instacart \
        --embeddings runs/emb_instacart.npy --json docs/results/cold-start-hubs-instacart.json

Catalogs: every item's list (top 20) under each correction; substitute share of the top 3 of 50 seeded anchors by
the rule (title cluster ~250, cos >= 0.8, Jaccard >= 0.5) and by a stricter check (cluster ~50, cos >= 0.7,
Jaccard >= 0.4), both in the base-MiniLM space; hubness (``cold_start.hubness``): distinct items in the 150 top-3
slots, the most frequent item's count over all top-10 lists, N10 skewness, coverage. Instacart: the eval's split,
cold products and cached models; Recall@5/10/20 of the content-only lists with and without each correction,
paired ratio to the uncorrected list (1,000 bootstrap draws of test baskets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundlerec_export import cold_start as cs

VARIANTS: dict[str, cs.HubCorrection | None] = {
    "two_tower": None,
    "no_prior": cs.HubCorrection(prior_weight=0.0),
    "csls_k10": cs.HubCorrection(csls_k=10),
    "csls_k10_half": cs.HubCorrection(csls_k=10, csls_weight=0.5),
    "csls_k50": cs.HubCorrection(csls_k=50),
}
KMAX = 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def catalog_report(name: str, titles: list[str], emb: np.ndarray, variants: Sequence[str], served: Any = None,
                   n_anchors: int = 50, listed: int = 20, seed: int = 0) -> dict[str, Any]:
    model = cs.load_default_model()
    n = len(titles)
    anchors = np.sort(np.random.default_rng(seed).choice(n, size=min(n_anchors, n), replace=False))
    t0 = time.perf_counter()
    groups = cs.substitute_groups(emb, None)
    fine = cs.substitute_groups(emb, None, cluster_size=50)
    log(f"{name}: {n} items, clusters in {time.perf_counter() - t0:.1f} s")
    lists: dict[str, Any] = {}
    out: dict[str, Any] = {"catalog": name, "items": n, "anchors": len(anchors), "variants": {}}
    if served is not None:
        lists["served_before"] = served
    for v in variants:
        t1 = time.perf_counter()
        lists[v] = cs.cold_start_complements(emb, None, titles, model, top_k=KMAX, hub=VARIANTS[v], groups=groups)
        log(f"{name} {v}: lists in {time.perf_counter() - t1:.1f} s")
        out["variants"][v] = {"seconds": round(time.perf_counter() - t1, 1)}
    for v, comp in lists.items():
        entry = out["variants"].setdefault(v, {})
        entry["substitute_rule"] = cs.substitute_share(comp, groups, emb, titles, anchors, k=3)
        entry["substitute_stricter"] = cs.substitute_share(comp, fine, emb, titles, anchors, k=3, dup_cosine=0.7,
                                                           dup_jaccard=0.4)
        hub = cs.hubness(comp, anchors, k=3, k_occ=10)
        hub["top_items"] = [[titles[i], c] for i, c in hub["top_items"]]
        entry["hubness"] = hub
    out["rows"] = [{"anchor": titles[a], **{v: [titles[c] for c in comp.of(int(a))[0][:3].tolist()]
                                            for v, comp in lists.items()}} for a in anchors[:listed].tolist()]
    return out


def catalogs(args: argparse.Namespace) -> dict[str, Any]:
    from bundlerec_export.base_space import base_embeddings
    from bundlerec_server.artifact import Complements, ItemTable

    res: dict[str, Any] = {"catalogs": []}
    if args.homedepot:
        art = Path(args.homedepot)
        titles = list(ItemTable.read(art / "items.jsonl").titles)
        emb, info = base_embeddings(titles, art.parent / f"{art.name}.work")
        log(f"homedepot base embeddings: {info}")
        served = Complements.read(Path(args.served) / "complements.npz") if args.served else None
        res["catalogs"].append(catalog_report("homedepot", titles, emb, args.variants, served))
    if args.icecat:
        from bundlerec_export.datasets import load_dataset

        ds = load_dataset("icecat", Path(args.icecat), None, None)
        titles = [item.title for item in ds.items]
        emb, info = base_embeddings(titles, Path(args.icecat_work))
        log(f"icecat base embeddings: {info}")
        res["catalogs"].append(catalog_report("icecat", titles, emb, args.variants))
    return res


def instacart(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bundle_quality import bootstrap_weights
    from benchmarks.cold_start_eval import _cached_train, cold_records, cold_split, csr_rank, recall_figures

    data = cold_split(args)
    pr, emb, train, test, anchors = data.pr, data.emb, data.train, data.test, data.anchors
    cfg = cs.TrainConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, lr=args.lr, anchor_power=args.anchor_power,
                         min_support=args.min_support)
    model, _ = _cached_train(emb, train, pr.aisles, cfg, args)
    weights = bootstrap_weights(len(test), args.draws, seed=args.seed)
    out: dict[str, Any] = {"anchors": int(len(anchors)), "methods": {}}
    for cats_label, cats in (("aisles", pr.aisles), ("no_categories", None)):
        comps = {v: cs.cold_start_complements(emb, cats, pr.titles, model, top_k=KMAX, anchors=anchors, hub=VARIANTS[v])
                 for v in args.variants}
        recs = cold_records({v: csr_rank(c) for v, c in comps.items()}, data)
        ref = recs["two_tower"]
        for v, rec in recs.items():
            hub = cs.hubness(comps[v], anchors[:50], k=3, k_occ=10)
            out["methods"][f"{cats_label}/{v}"] = {
                **recall_figures(rec, weights, uncorrected=ref),
                "hubness": {k: hub[k] for k in ("distinct", "slots", "max_occurrences", "skewness", "coverage")},
            }
            m = out["methods"][f"{cats_label}/{v}"]
            log(f"{cats_label}/{v}: R@5 {m['r5']['mean']:.4f} {m['r5']['ci95']} x {m['ratio_vs_uncorrected']['r5']}"
                f" max N10 {hub['max_occurrences']} distinct {hub['distinct']}/{hub['slots']}")
    return out


def _short(title: str, n: int = 45) -> str:
    title = title.replace("|", "/")
    return title if len(title) <= n else title[: n - 1] + "…"


def markdown(res: dict[str, Any], listed: Sequence[str] = ("served_before", "two_tower", "no_prior")) -> str:
    """The catalogs' figures and listings as markdown (docs/cold-start.md)."""
    lines: list[str] = []
    for cat in res["catalogs"]:
        lines += [f"#### {cat['catalog']} ({cat['items']:,} items, {cat['anchors']} seeded anchors)", "",
                  "| lists | substitutes in top 3, rule | stricter | distinct in top-3 slots | max N10 (whole catalog)"
                  " | N10 skewness | items in any top 10 | most frequent in top 10 |", "|---|---|---|---|---|---|---|---|"]
        for v, e in cat["variants"].items():
            h = e["hubness"]
            top = "; ".join(f"{_short(t, 30)} ({c})" for t, c in h["top_items"][:2])
            lines.append(f"| {v} | {e['substitute_rule']['substitute']:.1%} | {e['substitute_stricter']['substitute']:.1%} | "
                         f"{h['distinct']} / {h['slots']} | {h['max_occurrences']} | {h['skewness']:.1f} | "
                         f"{h['coverage']:.1%} | {top} |")
        cols = [v for v in listed if v in cat["rows"][0]]
        lines += ["", f"| anchor | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
        for row in cat["rows"]:
            lines.append(f"| {_short(row['anchor'], 55)} | "
                         + " | ".join("; ".join(_short(t, 38) for t in row[v]) or "—" for v in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("catalogs")
    c.add_argument("--homedepot", help="Home Depot artifact (titles; base embeddings cached in <artifact>.work)")
    c.add_argument("--served", help="artifact whose complements.npz is today's served list (row 'served_before')")
    c.add_argument("--icecat", help="Icecat data folder (products.jsonl)")
    c.add_argument("--icecat-work", default="runs/icecat.work", help="cache of Icecat's base embeddings")
    c.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    i = sub.add_parser("instacart")
    i.add_argument("--data-dir", default="../shared/data/instacart")
    i.add_argument("--embeddings", default="runs/emb_instacart.npy")
    i.add_argument("--embed-model", default="runs/model")
    i.add_argument("--cache-dir", default="runs")
    i.add_argument("--cold-pct", type=float, default=20.0)
    i.add_argument("--dim", type=int, default=64)
    i.add_argument("--epochs", type=int, default=40)
    i.add_argument("--lr", type=float, default=0.03)
    i.add_argument("--anchor-power", type=float, default=1.0)
    i.add_argument("--min-support", type=int, default=2)
    i.add_argument("--draws", type=int, default=1000)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    for q in (c, i):
        q.add_argument("--json", type=Path)
    r = sub.add_parser("render", help="markdown of a catalogs JSON")
    r.add_argument("json", type=Path)
    r.add_argument("--listed", nargs="+", default=["served_before", "two_tower", "no_prior"])
    args = p.parse_args(argv)
    if args.cmd == "render":
        print(markdown(json.loads(args.json.read_text()), args.listed))
        return 0
    res = catalogs(args) if args.cmd == "catalogs" else instacart(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(json.dumps(res if args.cmd == "instacart" else
                     [{k: v for k, v in r.items() if k != "rows"} for r in res["catalogs"]], indent=1,
                     ensure_ascii=False)[:20000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

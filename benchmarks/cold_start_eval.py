"""Cold-start complements on Instacart with the anchors' orders hidden (split by product), on held-out baskets.

    python -m benchmarks.cold_start_eval --data-dir ../shared/data/instacart \
        --embeddings runs/emb_instacart.npy --json docs/results/cold-start.json --plot docs/img/cold-start.png

Protocol
* Orders: the user-level split (``splits.user_level_split``): TEST = each shopper's latest order, TRAIN = the rest.
* Cold products: a seeded random ``--cold-pct`` (20 %) of the catalog (products that appear in an order). ALL
  their order lines are removed from TRAIN: the model, popularity and every count see no order of them.
* Pairs: every (TEST basket, cold anchor in it) with >= 1 target; targets = the basket's other items in
  another aisle; every list is restricted to other aisles and cut at 20 (the served rule).
* Methods, on the same pairs: ``cold_start`` (content-only two-tower model, what a catalog without orders
  gets; aisles as categories), ``cold_start_no_categories`` (same model, categories unknown: substitutes by
  title clusters, as for Home Depot / Icecat), ``cold_start_pop`` (the model with a popularity prior on
  the candidates that have TRAIN orders: new items in a catalog with orders), ``popularity`` (global, other
  aisles), ``content_fallback`` (today: ``complements.related_from_index``'s rule, exact: cosine band
  0.45-0.85, other aisles, best by cosine).
* Anchor-context rows (no order of the anchor, only its aisle / title; weights tuned on validation):
  ``aisle_context`` (log1p(orders_c) + beta * log(P(c | aisle of a) / P(c)), ``cold_start.AisleContext``),
  ``cold_start_pop_aisle_context`` (content + w_pop * log1p(orders_c) + w_ctx * that lift),
  ``neighbour_context`` (the lift of P(c | the anchor's k nearest warm titles of its aisle), backed off to
  P(c | aisle), ``cold_start.NeighbourContext``), ``learned_never_ordered`` (what the build served a
  never-ordered item of a catalog with orders: the learned ranker's shared per-aisle list, mined on TRAIN).
* Recall@5/10/20 means over pairs, 95 % intervals from ``--draws`` bootstrap resamples of test baskets,
  paired ratio to popularity (and to ``learned_never_ordered``). Substitute share of the top 5 (before the other-aisle cut): same aisle, or a
  near-duplicate title (cosine >= 0.8 or token Jaccard >= 0.5).

Embeddings: ``--embeddings`` (rows = ``products.csv`` order, the MiniLM fp32 ONNX encoder of the build; made
with ``--embed-model DIR`` holding ``fp32.onnx`` + ``tokenizer.json`` when missing).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bundle_quality import (
    bootstrap_weights,
    load_instacart,
    mean_ci,
    pair_records,
    paired_ratio,
    popularity_ranker,
    prepare,
)
from bundlerec_export import cold_start as cs
from bundlerec_export.splits import user_level_split

KMAX = 20


def embed_titles(titles: Sequence[str], model_dir: Path, cache: Path) -> np.ndarray:
    """Title embeddings with the build's encoder (mean-pooled, normalised), cached as ``.npy``."""
    if cache.is_file():
        return np.load(cache)
    from bundlerec_server.encoder import Encoder

    enc = Encoder(model_dir / "fp32.onnx", model_dir / "tokenizer.json", max_length=128, provider="cpu")
    emb = enc.encode_many(list(titles), batch_size=64).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, emb)
    return emb


def catalog_rows(products_csv: Path) -> dict[str, int]:
    with open(products_csv, newline="", encoding="utf-8-sig") as fh:
        return {row["product_id"].strip(): k for k, row in enumerate(csv.DictReader(fh))}


def other_aisle(rank, aisles: Sequence[str]):
    def ranked(anchor: int) -> list[int]:
        return [int(r) for r in rank(anchor) if aisles[int(r)] != aisles[anchor]][:KMAX]
    return ranked


def csr_rank(comp):
    def ranked(anchor: int) -> list[int]:
        return comp.of(anchor)[0].tolist()
    return ranked


def content_fallback(emb: np.ndarray, aisles: Sequence[str], anchors: np.ndarray, band=(0.45, 0.85)):
    """``related_from_index``'s rule, exact: neighbours with lo <= cos <= hi, other aisles, best by cosine."""
    codes = cs.category_codes(aisles, len(emb))
    lists: dict[int, list[int]] = {}
    for s in range(0, len(anchors), 512):
        rows = anchors[s : s + 512]
        cos = emb[rows] @ emb.T
        cos[(cos < band[0]) | (cos > band[1])] = -np.inf
        cos[(codes[rows][:, None] == codes[None, :]) & (codes[None, :] >= 0)] = -np.inf
        cos[np.arange(len(rows)), rows] = -np.inf
        top = np.argsort(-cos, axis=1)[:, :KMAX]
        for r, row in enumerate(rows.tolist()):
            lists[row] = [int(c) for c in top[r] if np.isfinite(cos[r, c])]
    return lambda anchor: lists.get(anchor, [])


@dataclass
class ColdSplit:
    """The protocol's data: user-level split, a seeded ``cold_pct`` % of products made cold (every order line of
    them removed from TRAIN), the test baskets' cold anchors, and the products' title embeddings."""

    pr: Any
    split: Any
    emb: np.ndarray
    cold: np.ndarray
    train: list[list[int]]
    test: list[list[int]]
    anchors: np.ndarray
    rng: np.random.Generator


def cold_split(args: argparse.Namespace) -> ColdSplit:
    pr = prepare(load_instacart(args.data_dir))
    n = len(pr.ids)
    full = np.asarray(embed_titles(_names(args.data_dir), Path(args.embed_model), Path(args.embeddings)))
    rows = catalog_rows(Path(args.data_dir) / "products.csv")
    split = user_level_split(pr.users, pr.numbers)
    rng = np.random.default_rng(args.seed)
    cold = np.zeros(n, dtype=bool)
    cold[rng.choice(n, size=int(round(args.cold_pct / 100 * n)), replace=False)] = True
    test = [pr.baskets[i] for i in split.test]
    return ColdSplit(pr, split, full[[rows[p] for p in pr.ids]], cold,
                     [[r for r in pr.baskets[i] if not cold[r]] for i in split.train], test,
                     np.unique([r for b in test for r in b if cold[r]]), rng)


def cold_records(rankers: dict[str, Any], cs_: ColdSplit) -> dict[str, dict[str, np.ndarray]]:
    """Per method, the pair records of the test baskets' cold anchors (lists restricted to other aisles)."""
    cold_set = set(cs_.anchors.tolist())
    out = {}
    for name, rank in rankers.items():
        rec = pair_records(cs_.test, other_aisle(lambda a, rank=rank: rank(a) if a in cold_set else [], cs_.pr.aisles),
                           cs_.pr.aisles, "other_aisle")
        keep = np.isin(rec["anchor"], cs_.anchors)
        out[name] = {k: v[keep] for k, v in rec.items()}
    return out


def recall_figures(rec: dict[str, np.ndarray], weights: np.ndarray, **refs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Recall@{5, 10, 20} with 95 % intervals, and the paired ratio to each of ``refs`` (``ratio_vs_<name>``)."""
    ks = (5, 10, 20)
    return {**{f"r{k}": mean_ci(rec[f"r{k}"], rec["basket"], weights) for k in ks},
            **{f"ratio_vs_{name}": {f"r{k}": paired_ratio(rec[f"r{k}"], ref[f"r{k}"], rec["basket"], weights)
                                    for k in ks} for name, ref in refs.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = cold_split(args)
    pr, split, emb, cold, train, test, anchors, rng = (data.pr, data.split, data.emb, data.cold, data.train, data.test,
                                                       data.anchors, data.rng)
    n = len(pr.ids)
    counts = np.zeros(n)
    for b in train:
        counts[np.unique(np.asarray(b, dtype=np.int64))] += 1
    logger_info(f"{n} products, {cold.sum()} cold, {len(train)} train / {len(test)} test baskets, "
                f"{len(anchors)} cold anchors in test")
    common = {"dim": args.dim, "epochs": args.epochs, "seed": args.seed, "lr": args.lr,
              "anchor_power": args.anchor_power, "min_support": args.min_support}
    cfg = cs.TrainConfig(**common)
    model, meta = _cached_train(emb, train, pr.aisles, cfg, args)
    logger_info(f"model trained in {meta['seconds']} s, loss {meta['loss'][0]} -> {meta['loss'][-1]}")
    pcfg = cs.TrainConfig(**common, use_popularity=True)
    pmodel, pmeta = _cached_train(emb, train, pr.aisles, pcfg, args)
    logger_info(f"popularity-prior model: gamma {pmodel.gamma:.3f}")
    t1 = time.perf_counter()
    comp = cs.cold_start_complements(emb, pr.aisles, pr.titles, model, top_k=KMAX, anchors=anchors)
    list_s = time.perf_counter() - t1
    comp_nocat = cs.cold_start_complements(emb, None, pr.titles, model, top_k=KMAX, anchors=anchors)
    comp_pop = cs.cold_start_complements(emb, pr.aisles, pr.titles, pmodel, top_k=KMAX, anchors=anchors,
                                         popularity=counts)
    aisle_prior = cs.group_prior_from_orders(train, pr.aisles)
    comp_pop_aisle = cs.cold_start_complements(emb, pr.aisles, pr.titles, pmodel, top_k=KMAX, anchors=anchors,
                                               popularity=counts, group_prior=aisle_prior)
    # every tuned weight is chosen on VALIDATION baskets (each shopper's latest train order) with a cold anchor:
    # cold anchors never enter training, so those pairs are unseen by the model
    val = [pr.baskets[i] for i in split.val]
    val_anchors = np.unique([r for b in val for r in b if cold[r]])

    def val_r5(comp_fn) -> float:
        vcomp = comp_fn(val_anchors)
        vrec = pair_records(val, other_aisle(csr_rank(vcomp), pr.aisles), pr.aisles, "other_aisle")
        return float(vrec["r5"][np.isin(vrec["anchor"], val_anchors)].mean())

    def with_gamma(m: cs.ColdStartModel, gamma: float) -> cs.ColdStartModel:
        return cs.ColdStartModel(m.w_anchor, m.w_comp, m.w_bias, m.b0, gamma, m.meta)

    def lists(m: cs.ColdStartModel, rows: np.ndarray, ctx: cs.AisleContext | None = None,
              candidates: np.ndarray | None = None) -> Any:
        return cs.cold_start_complements(emb, pr.aisles, pr.titles, m, top_k=KMAX, anchors=rows,
                                         popularity=counts, context=ctx, candidates=candidates)

    # (1) content + w_pop * log1p(orders of the candidate)
    grid: dict[str, float] = {str(w): val_r5(lambda rows, w=w: lists(with_gamma(model, w), rows)) for w in args.pop_grid}
    best = float(max(grid, key=lambda k: grid[k]))
    logger_info(f"validation R@5 by popularity weight: {grid} -> {best}")
    comp_tuned = lists(with_gamma(model, best), anchors)
    zero = np.zeros((emb.shape[1], 1), np.float32)
    backoff = cs.ColdStartModel(zero, zero, np.zeros(emb.shape[1], np.float32), gamma=1.0)  # no content at all
    comp_backoff = cs.cold_start_complements(emb, pr.aisles, pr.titles, backoff, top_k=KMAX, anchors=anchors,
                                             popularity=counts, group_prior=aisle_prior)
    # (2) aisle-conditioned item score, no content: log1p(orders_c) + beta * log(P(c | aisle of a) / P(c)).
    # Validation lifts come from the FIT baskets (train minus the validation baskets), so a validation basket
    # is not its own evidence; the test lists use all of TRAIN
    fit = [[r for r in pr.baskets[i] if not cold[r]] for i in split.fit]
    ordered = counts > 0
    ctx_grid: dict[str, float] = {}
    for alpha in args.ctx_alpha_grid:
        vctx = cs.aisle_context_from_orders(fit, pr.aisles, alpha=alpha)
        for beta in args.ctx_beta_grid:
            ctx_grid[f"{alpha}/{beta}"] = val_r5(lambda rows, c=vctx.with_weight(beta): lists(backoff, rows, c, ordered))
    best_ctx = max(ctx_grid, key=lambda k: ctx_grid[k])
    alpha_best, beta_best = (float(x) for x in best_ctx.split("/"))
    logger_info(f"validation R@5 by alpha/beta: {ctx_grid} -> {best_ctx}")
    context = cs.aisle_context_from_orders(train, pr.aisles, alpha=alpha_best)
    comp_ctx = lists(backoff, anchors, context.with_weight(beta_best), ordered)
    # (3) content + w_pop * log1p(orders_c) + w_ctx * lift (alpha from (2))
    vctx = cs.aisle_context_from_orders(fit, pr.aisles, alpha=alpha_best)
    mix_grid: dict[str, float] = {}
    for w_pop in args.mix_pop_grid:
        for w_ctx in args.mix_ctx_grid:
            mix_grid[f"{w_pop}/{w_ctx}"] = val_r5(
                lambda rows, m=with_gamma(model, w_pop), c=vctx.with_weight(w_ctx): lists(m, rows, c))
    best_mix = max(mix_grid, key=lambda k: mix_grid[k])
    mix_pop, mix_ctx = (float(x) for x in best_mix.split("/"))
    logger_info(f"validation R@5 by w_pop/w_ctx: {mix_grid} -> {best_mix}")
    comp_mix = lists(with_gamma(model, mix_pop), anchors, context.with_weight(mix_ctx))
    # (3b) title-neighbour context, no content model: log1p(orders_c) + beta * log(P(c | N(a)) / P(c)), N(a) = the
    # anchor's k nearest warm titles of its aisle, smoothed toward P(c | aisle) (alpha from (2))
    nb_grid: dict[str, float] = {}
    vnb = cs.neighbour_context_from_orders(emb, fit, pr.aisles, k=args.nb_k,
                                           base=cs.aisle_context_from_orders(fit, pr.aisles, alpha=alpha_best))
    for alpha in args.ctx_alpha_grid:
        for beta in args.ctx_beta_grid:
            nb_grid[f"{alpha}/{beta}"] = val_r5(
                lambda rows, c=vnb.with_params(alpha, beta): lists(backoff, rows, c, ordered))
    best_nb = max(nb_grid, key=lambda k: nb_grid[k])
    nb_alpha, nb_beta = (float(x) for x in best_nb.split("/"))
    logger_info(f"validation R@5 by neighbour alpha/beta: {nb_grid} -> {best_nb}")
    neighbours = cs.neighbour_context_from_orders(emb, train, pr.aisles, k=args.nb_k, alpha=nb_alpha, weight=nb_beta,
                                                  base=context)
    comp_nb = lists(backoff, anchors, neighbours, ordered)
    # (4) what the build serves a never-ordered item today: the learned ranker's shared per-aisle list
    learned = _learned_lists(train, [pr.users[i] for i in split.train], [pr.numbers[i] for i in split.train], n,
                             pr.titles, pr.aisles) if args.learned else None
    rankers = {
        "cold_start": csr_rank(comp),
        "cold_start_no_categories": csr_rank(comp_nocat),
        "cold_start_pop": csr_rank(comp_pop),
        "cold_start_pop_aisle_prior": csr_rank(comp_pop_aisle),
        "cold_start_pop_tuned": csr_rank(comp_tuned),
        "aisle_backoff": csr_rank(comp_backoff),
        "aisle_context": csr_rank(comp_ctx),
        "cold_start_pop_aisle_context": csr_rank(comp_mix),
        "neighbour_context": csr_rank(comp_nb),
        **({"learned_never_ordered": csr_rank(learned)} if learned is not None else {}),
        "popularity": popularity_ranker(counts, None, pr.aisles, True, KMAX),
        "content_fallback": content_fallback(emb, pr.aisles, anchors),
    }
    weights = bootstrap_weights(len(test), args.draws, seed=args.seed)
    groups_aisle = cs.category_codes(pr.aisles, n)
    methods: dict[str, Any] = {}
    recs = cold_records(rankers, data)
    ref = recs["popularity"]
    refs = {"popularity": ref, **({"learned_never_ordered": recs["learned_never_ordered"]}
                                  if "learned_never_ordered" in recs else {})}
    for name, rec in recs.items():
        sub = cs.substitute_share(_comp_of(rankers[name], n, anchors), groups_aisle, emb, pr.titles, anchors, k=5)
        methods[name] = {
            **recall_figures(rec, weights, **refs),
            "substitute_share_top5": sub,
            "empty_pairs": float(rec["empty"].mean()) if len(rec["empty"]) else None,
        }
    samples = {pr.titles[a]: [pr.titles[c] for c in comp.of(int(a))[0][:3].tolist()]
               for a in rng.choice(anchors, size=min(12, len(anchors)), replace=False).tolist()}
    return {
        "protocol": {"split": "user-level (test = latest order per shopper)", "cold_pct": args.cold_pct,
                     "seed": args.seed, "products": n, "cold_products": int(cold.sum()),
                     "cold_anchors_in_test": int(len(anchors)), "pairs": int(len(ref["r5"])),
                     "train_baskets": len(train), "test_baskets": len(test), "draws": args.draws, "kmax": KMAX,
                     "targets": "other-aisle items of the test basket", "lists": "other aisles, top 20"},
        "model": {k: v for k, v in meta.items()},
        "popularity_model": {"gamma": pmodel.gamma, "seconds": pmeta["seconds"]},
        "popularity_weight_validation": {"val_cold_anchors": int(len(val_anchors)), "r5_by_weight": grid,
                                         "chosen": best},
        "aisle_context_validation": {"r5_by_alpha_beta": ctx_grid, "chosen": {"alpha": alpha_best, "beta": beta_best},
                                     "lifts_from": "fit baskets (train minus validation)"},
        "neighbour_context_validation": {"k": args.nb_k, "r5_by_alpha_beta": nb_grid,
                                         "chosen": {"alpha": nb_alpha, "beta": nb_beta},
                                         "backoff": "P(c | aisle), alpha from aisle_context"},
        "mix_validation": {"r5_by_wpop_wctx": mix_grid, "chosen": {"w_pop": mix_pop, "w_ctx": mix_ctx,
                                                                   "alpha": alpha_best}},
        "list_seconds": round(list_s, 2),
        "methods": methods,
        "samples": samples,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _learned_lists(train: list[list[int]], users: list[str], numbers: list[int], n: int, titles: Sequence[str],
                   aisles: Sequence[str]) -> Any:
    """The build's learned complements (``complement_ranker.rank_complements``, build config) mined on TRAIN."""
    from bundlerec_export.complement_ranker import RankerConfig, rank_complements

    comp, report = rank_complements(train, n, users=users, order_numbers=numbers, titles=list(titles),
                                    aisles=list(aisles), cfg=RankerConfig(top_k=KMAX, cross_aisle=True))
    logger_info(f"learned ranker on TRAIN in {report['timings_s']['total']} s")
    return comp


def _cached_train(emb: np.ndarray, train: list[list[int]], aisles: Sequence[str], cfg: cs.TrainConfig,
                  args: argparse.Namespace) -> tuple[cs.ColdStartModel, dict[str, Any]]:
    """Trains (or reloads from ``--cache-dir``, keyed by the config and the split) the eval's model."""
    import hashlib

    key = hashlib.sha256(json.dumps([cfg.__dict__, args.cold_pct, args.seed, len(train)], sort_keys=True).encode())
    path = Path(args.cache_dir) / f"cold_start_eval_{key.hexdigest()[:12]}.npz"
    if path.is_file():
        model = cs.ColdStartModel.load(path)
        return model, model.meta
    model, meta = cs.train_cold_start(emb, train, aisles, cfg, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model, meta


def _names(data_dir: str) -> list[str]:
    with open(Path(data_dir) / "products.csv", newline="", encoding="utf-8-sig") as fh:
        return [row["product_name"] for row in csv.DictReader(fh)]


def _catalog_titles(name: str, root: Path) -> dict[str, str]:
    if name == "homedepot":
        with open(root / "homedepot" / "products.csv", newline="", encoding="utf-8-sig") as fh:
            return {r["product_id"]: r["title"] for r in csv.DictReader(fh)}
    with open(root / "icecat" / "products.jsonl", encoding="utf-8") as fh:
        return {str(r["id"]): r["title"] for r in map(json.loads, fh)}


def _comp_of(rank, n: int, anchors: np.ndarray):
    """A ranker's lists for ``anchors`` as a Complements-like object (for :func:`cold_start.substitute_share`)."""
    from bundlerec_server.artifact import Complements

    counts = np.zeros(n, dtype=np.int64)
    cols = []
    for a in anchors.tolist():
        lst = [int(c) for c in rank(a)][:KMAX]
        counts[a] = len(lst)
        cols.extend(lst)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Complements(indptr, np.asarray(cols, np.int32), np.ones(len(cols), np.float32), np.zeros(len(cols), np.int32))


def logger_info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes[:2], ("r5", "r10")):
        stats = [res["methods"][m][key] for m in names]
        vals = [s["mean"] for s in stats]
        err = np.asarray([[v - s["ci95"][0] for v, s in zip(vals, stats)], [s["ci95"][1] - v for v, s in zip(vals, stats)]])
        bars = ax.barh(names, vals, xerr=err, capsize=2,
                       color=["#3b7dd8" if m.startswith("cold") else "#999999" for m in names])
        ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=8)
        ax.set_title(f"cold anchors: Recall@{key[1:]} (other aisles), 95 % CI", fontsize=9)
        ax.invert_yaxis()
    sub = [res["methods"][m]["substitute_share_top5"]["substitute"] or 0 for m in names]
    bars = axes[2].barh(names, sub, color="#d8743b")
    axes[2].bar_label(bars, fmt="%.3f", fontsize=7)
    axes[2].axvline(0.10, color="r", ls="--", lw=0.8)
    axes[2].set_title("substitutes in top 5 (same aisle or near-dup.)", fontsize=9)
    axes[2].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    learned = any("ratio_vs_learned_never_ordered" in m for m in res["methods"].values())
    lines = ["| method | R@5 | × popularity (R@5) | R@10 | × popularity (R@10) | R@20 | × popularity (R@20) | "
             + ("× learned never-ordered (R@5) | " if learned else "") + "substitutes in top 5 |",
             "|---|---|---|---|---|---|---|" + ("---|" if learned else "") + "---|"]

    def ci(s: dict[str, Any]) -> str:
        return f"{s['mean']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"

    def rt(s: dict[str, Any]) -> str:
        return f"{s['ratio']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"

    for name, m in res["methods"].items():
        vs = m["ratio_vs_popularity"]
        extra = f"{rt(m['ratio_vs_learned_never_ordered']['r5'])} | " if learned else ""
        lines.append(f"| {name} | {ci(m['r5'])} | {rt(vs['r5'])} | {ci(m['r10'])} | {rt(vs['r10'])} | {ci(m['r20'])} | "
                     f"{rt(vs['r20'])} | {extra}{m['substitute_share_top5']['substitute']:.3f} |")
    return "\n".join(lines)


def train_full(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped model: content-only, trained on ALL Instacart orders and products (aisles as categories)."""
    data = load_instacart(args.data_dir)
    pr = prepare(data)
    full = np.asarray(embed_titles(_names(args.data_dir), Path(args.embed_model), Path(args.embeddings)))
    rows = catalog_rows(Path(args.data_dir) / "products.csv")
    emb = full[[rows[p] for p in pr.ids]]
    cfg = cs.TrainConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, lr=args.lr,
                         anchor_power=args.anchor_power, min_support=args.min_support)
    model, meta = cs.train_cold_start(emb, pr.baskets, pr.aisles, cfg, progress=True)
    model.meta.update({"trained_on": "instacart: all orders, products that appear in an order",
                       "encoder": "sentence-transformers/all-MiniLM-L6-v2 (fp32 ONNX, mean pooled, normalised)",
                       "command": "python -m benchmarks.cold_start_eval --save-model " + str(args.save_model)})
    args.save_model.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.save_model)
    return meta


def catalog_samples(name: str, path: Path, titles_of: dict[str, str], model: cs.ColdStartModel, n_anchors: int = 50,
                    seed: int = 0, top: int = 3) -> dict[str, Any]:
    """``path`` = ``.npz`` (emb, ids) of a catalog (or a seeded sample of it); 50 seeded anchors -> top 3, the
    content fallback's top 3 beside them, and substitute shares (categories unknown: title clusters)."""
    z = np.load(path)
    emb, ids = z["emb"], [str(i) for i in z["ids"]]
    titles = [titles_of[i] for i in ids]
    t0 = time.perf_counter()
    anchors = np.sort(np.random.default_rng(seed).choice(len(ids), size=min(n_anchors, len(ids)), replace=False))
    comp = cs.cold_start_complements(emb, None, titles, model, top_k=KMAX, anchors=anchors)
    seconds = time.perf_counter() - t0
    groups = cs.substitute_groups(emb, None)
    fine = cs.substitute_groups(emb, None, cluster_size=50)
    nocat = [""] * len(ids)
    fallback = _comp_of(content_fallback(emb, nocat, anchors), len(ids), anchors)
    shares = {}
    for label, c in (("cold_start", comp), ("content_fallback", fallback)):
        shares[label] = {
            "rule (cluster ~250 or cos >= 0.8 or Jaccard >= 0.5)": cs.substitute_share(c, groups, emb, titles, anchors, k=top),
            "stricter (cluster ~50 or cos >= 0.7 or Jaccard >= 0.4)": cs.substitute_share(
                c, fine, emb, titles, anchors, k=top, dup_cosine=0.7, dup_jaccard=0.4)}
    rows = [{"anchor": titles[a], "cold_start": [titles[c] for c in comp.of(int(a))[0][:top].tolist()],
             "content_fallback": [titles[c] for c in fallback.of(int(a))[0][:top].tolist()]} for a in anchors.tolist()]
    return {"catalog": name, "items": len(ids), "anchors": len(anchors), "seconds": round(seconds, 2),
            "substitute_share_top3": shares, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/instacart")
    p.add_argument("--embeddings", default="runs/emb_instacart.npy")
    p.add_argument("--embed-model", default="runs/model", help="folder with fp32.onnx + tokenizer.json")
    p.add_argument("--cold-pct", type=float, default=20.0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--anchor-power", type=float, default=1.0)
    p.add_argument("--min-support", type=int, default=2)
    p.add_argument("--pop-grid", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0])
    p.add_argument("--ctx-alpha-grid", type=float, nargs="+", default=[10.0, 100.0, 1000.0])
    p.add_argument("--ctx-beta-grid", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    p.add_argument("--mix-pop-grid", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0, 20.0, 50.0])
    p.add_argument("--mix-ctx-grid", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0, 10.0, 20.0])
    p.add_argument("--nb-k", type=int, default=20, help="title neighbours of the neighbour context")
    p.add_argument("--no-learned", dest="learned", action="store_false",
                   help="skip the learned ranker's never-ordered lists (the build's current serving)")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--cache-dir", default="runs", help="trained eval models are cached here")
    p.add_argument("--save-model", type=Path, help="train the shipped model on all orders and save it here")
    p.add_argument("--samples", nargs=2, action="append", metavar=("NAME", "NPZ"), default=[],
                   help="catalog sample (homedepot|icecat, .npz with emb + ids): 50 anchors -> top 3")
    p.add_argument("--model", type=Path, default=cs.MODEL_FILE)
    args = p.parse_args(argv)
    if args.save_model:
        print(json.dumps(train_full(args), indent=1))
        return 0
    if args.samples:
        model = cs.ColdStartModel.load(args.model)
        res = {"samples": [catalog_samples(name, Path(npz), _catalog_titles(name, Path(args.data_dir).parent), model) for name, npz in args.samples]}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        print(json.dumps([{k: v for k, v in s.items() if k != "rows"} for s in res["samples"]], indent=1))
        return 0
    res = run(args)
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

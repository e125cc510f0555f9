"""Retrieval quality of a RUNNING bundlerec server, through its Search RPC.

    python -m benchmarks.quality --target 127.0.0.1:50051 --judgments /work/shared/data/homedepot/judgments.csv \
        [--split test|dev|train|all] [--k 10] [--mode dense --mode lexical --mode hybrid --mode default] \
        [--rerank off --rerank on] [--target 127.0.0.1:50061 --label reference ...] --json runs/quality.json \
        --plot runs/quality.png

Judgments: any CSV with columns ``query,product_id,relevance`` (graded; Home Depot 1.0–3.0). Queries are
grouped by their normalised form and assigned to train/dev/test by ``bundlerec_export.evaluation.split_of``.
Every (target, mode, rerank) is one run: the split's queries go through ``Search(query, k, retrieval_mode, rerank)``
with a small bounded concurrency; hit ids are scored with NDCG@k / Recall@k / MRR@k (see
``bundlerec_export.evaluation``). A query whose call fails counts as an empty ranking (and is counted under
``errors``); a mode the server rejects for every query (FAILED_PRECONDITION / UNIMPLEMENTED /
INVALID_ARGUMENT) is reported as unsupported. Several runs are shown side by side: table, JSON, bar chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bundlerec_export import evaluation as metrics

MODES = {"default": 0, "dense": 1, "lexical": 2, "hybrid": 3}
RERANKS = {"default": 0, "on": 1, "off": 2}  # bundlerec.v1.Rerank
UNSUPPORTED = {"FAILED_PRECONDITION", "UNIMPLEMENTED", "INVALID_ARGUMENT"}


def read_judgments(path: str | Path) -> dict[str, tuple[str, dict[str, float]]]:
    """normalised query -> (query as first written, {product_id: relevance}); duplicates keep the max."""
    return metrics.by_normalized_query(metrics.read_judgments(path))


def select_split(judgments: dict[str, tuple[str, dict[str, float]]], split: str) -> list[tuple[str, dict[str, float]]]:
    keys = sorted(judgments)
    if split != "all":
        keys = [k for k in keys if metrics.split_of(k) == split]
    return [judgments[k] for k in keys]


async def run_search(target: str, queries: list[tuple[str, dict[str, float]]], mode: int, k: int,
                     concurrency: int, timeout: float, rerank: int = 0) -> dict[str, Any]:
    import grpc

    from bundlerec.v1 import bundlerec_pb2 as pb
    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    sem = asyncio.Semaphore(concurrency)
    rankings: list[list[str]] = [[] for _ in queries]
    titles: list[list[str]] = [[] for _ in queries]
    codes: list[str] = ["OK"] * len(queries)
    latencies: list[float] = [float("nan")] * len(queries)
    outcomes: Counter[int] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pbg.BundleRecommenderStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)

        async def one(i: int, query: str) -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    resp = await stub.Search(pb.SearchRequest(query=query[:512], k=k, retrieval_mode=mode,
                                                              rerank=rerank), timeout=timeout)
                    outcomes[resp.rerank] += 1
                    rankings[i] = [h.item_id for h in resp.hits]
                    titles[i] = [h.title for h in resp.hits]
                except grpc.aio.AioRpcError as exc:
                    codes[i] = exc.code().name
                latencies[i] = (time.perf_counter() - t) * 1e3

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, q) for i, (q, _) in enumerate(queries)))
        elapsed = time.perf_counter() - t0
    names = {v: pb.RerankOutcome.Name(v).removeprefix("RERANK_OUTCOME_").lower() for v in pb.RerankOutcome.values()}
    return {"rankings": rankings, "titles": titles, "codes": codes, "latencies_ms": latencies, "elapsed_s": elapsed,
            "rerank_outcomes": {names[v]: n for v, n in sorted(outcomes.items())}}


def evaluate(queries: list[tuple[str, dict[str, float]]], rankings: list[list[str]], k: int) -> tuple[dict, list]:
    per_query = [metrics.query_metrics(r, judged, k) for (_, judged), r in zip(queries, rankings, strict=True)]
    return metrics.aggregate(per_query), per_query


def losses(queries: list[tuple[str, dict[str, float]]], worse: dict[str, Any], better: dict[str, Any], n: int,
           k: int, catalog: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The ``n`` queries where run ``worse`` loses most NDCG@k to run ``better`` (ties by query), with both
    rankings' titles and the query's best-judged products."""
    out = []
    for i, (query, judged) in enumerate(queries):
        a, b = worse["per_query_ndcg"][i], better["per_query_ndcg"][i]
        if a is None or b is None or b <= a:
            continue
        best = sorted(judged.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        out.append({"query": query, "ndcg": round(a, 4), "ndcg_other": round(b, 4), "loss": round(b - a, 4),
                    "ranking": [f"{pid} [{judged.get(pid, '-')}] {t}" for pid, t in zip(worse["rankings"][i], worse["titles"][i], strict=True)],
                    "ranking_other": [f"{pid} [{judged.get(pid, '-')}] {t}" for pid, t in zip(better["rankings"][i], better["titles"][i], strict=True)],
                    "judged_best": [f"{pid} [{rel}] {(catalog or {}).get(pid, '')}" for pid, rel in best]})
    out.sort(key=lambda r: (-r["loss"], r["query"]))
    return out[:n]


def write_losses(path: Path, rows: list[dict[str, Any]], worse: str, better: str, k: int) -> None:
    lines = [f"# {len(rows)} queries where '{worse}' loses most NDCG@{k} to '{better}'", ""]
    for r in rows:
        lines += [f"## {r['query']!r}: NDCG@{k} {r['ndcg']:.3f} vs {r['ndcg_other']:.3f} (-{r['loss']:.3f})",
                  f"{worse}:", *(f"  {t}" for t in r["ranking"][:5]), f"{better}:",
                  *(f"  {t}" for t in r["ranking_other"][:5]), "best judged:", *(f"  {t}" for t in r["judged_best"]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


def _read_catalog(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return {row["product_id"]: row["title"] for row in csv.DictReader(fh)}


def _f(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def print_table(runs: list[dict[str, Any]], k: int) -> None:
    head = f"{'run':<28} {'queries':>7} {'NDCG@' + str(k):>8} {'Recall@' + str(k):>9} {'MRR@' + str(k):>8}" \
           f" {'no-rel':>6} {'errors':>6} {'qps':>6} {'p50 ms':>7} {'p99 ms':>7}"
    print(head)
    print("-" * len(head))
    for r in runs:
        if r.get("unsupported"):
            print(f"{r['run']:<28} unsupported: {r['unsupported']}")
            continue
        a = r["aggregate"]
        lat = r.get("latency_ms", {})
        print(f"{r['run']:<28} {a['queries']:>7} {_f(a['ndcg']):>8} {_f(a['recall']):>9} {_f(a['mrr']):>8}"
              f" {a['recall_excluded']:>6} {sum(r['errors'].values()):>6} {r['qps']:>6.1f}"
              f" {_f(lat.get('p50')):>7} {_f(lat.get('p99')):>7}")


def plot_bars(runs: list[dict[str, Any]], k: int, out: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in runs if not r.get("unsupported")]
    names = ["ndcg", "recall", "mrr"]
    fig, ax = plt.subplots(figsize=(max(6, 2 + 1.6 * len(runs)), 4.5))
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(names))
    for i, r in enumerate(runs):
        vals = [r["aggregate"][n] or 0.0 for n in names]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=r["run"])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, [f"NDCG@{k}", f"Recall@{k}", f"MRR@{k}"])
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", required=True, help="HOST:PORT; repeat to compare servers")
    p.add_argument("--label", action="append", default=[], help="name of each --target, in order")
    p.add_argument("--judgments", required=True, type=Path)
    p.add_argument("--split", choices=["train", "dev", "test", "all"], default="test")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", action="append", choices=list(MODES), help="repeat to compare (default: default)")
    p.add_argument("--rerank", action="append", choices=list(RERANKS),
                   help="cross-encoder re-ranking per call; repeat to compare (default: the server's default)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline (s)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N queries of the split")
    p.add_argument("--health-timeout", type=float, default=60.0)
    p.add_argument("--per-query", action="store_true", help="include per-query metrics in the JSON")
    p.add_argument("--losses", type=Path, help="write the queries where --losses-of loses most to --losses-vs here "
                                               "(text, and JSON next to it)")
    p.add_argument("--losses-of", default="", help="run name that loses (default: the first 'default' mode run)")
    p.add_argument("--losses-vs", default="", help="run name it loses to (default: the first 'lexical' mode run)")
    p.add_argument("--losses-n", type=int, default=30)
    p.add_argument("--catalog", type=Path, help="products CSV product_id,title: titles of the judged products")
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if not 1 <= args.k <= 100:
        p.error("--k must be 1..100 (the API's limit)")
    modes = args.mode or ["default"]
    reranks = args.rerank or ["default"]
    labels = args.label + [t for t in args.target[len(args.label):]]
    try:
        judgments = read_judgments(args.judgments)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    queries = select_split(judgments, args.split)
    if args.limit:
        queries = queries[: args.limit]
    if not queries:
        print(f"no queries in split {args.split}", file=sys.stderr)
        return 2
    print(f"{len(queries)} {args.split} queries of {len(judgments)} in {args.judgments}")

    from benchmarks.load import machine_info, wait_for_health

    runs = []
    for target, label in zip(args.target, labels, strict=True):
        try:
            wait_for_health(target, args.health_timeout)
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        for mode, rerank in [(m, r) for m in modes for r in reranks]:
            name = label if len(modes) == 1 else (f"{label} {mode}" if len(args.target) > 1 else mode)
            if len(reranks) > 1:
                name += f" rerank {rerank}"
            res = asyncio.run(run_search(target, queries, MODES[mode], args.k, args.concurrency, args.timeout,
                                         RERANKS[rerank]))
            errors = Counter(c for c in res["codes"] if c != "OK")
            lat = sorted(x for x in res["latencies_ms"] if x == x)
            run: dict[str, Any] = {"run": name, "target": target, "label": label, "mode": mode, "rerank": rerank,
                                   "errors": dict(errors), "elapsed_s": res["elapsed_s"],
                                   "qps": len(queries) / res["elapsed_s"] if res["elapsed_s"] else 0.0,
                                   "rerank_outcomes": res["rerank_outcomes"],
                                   "latency_ms": {f"p{q}": round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 2)
                                                  for q in (50, 90, 99)} if lat else {}}
            if errors and sum(errors.values()) == len(queries) and set(errors) <= UNSUPPORTED:
                run["unsupported"] = ",".join(sorted(errors))
            else:
                agg, per_query = evaluate(queries, res["rankings"], args.k)
                run["aggregate"] = agg
                run["per_query_ndcg"] = [m["ndcg"] for m in per_query]
                run["rankings"], run["titles"] = res["rankings"], res["titles"]
                if args.per_query:
                    run["per_query"] = [{"query": q, **m} for (q, _), m in zip(queries, per_query, strict=True)]
            runs.append(run)
    print()
    print_table(runs, args.k)
    if args.losses:
        ok = [r for r in runs if "aggregate" in r]
        worse = next((r for r in ok if r["run"] == args.losses_of or (not args.losses_of and r["mode"] == "default")), None)
        better = next((r for r in ok if r["run"] == args.losses_vs or (not args.losses_vs and r["mode"] == "lexical")), None)
        if worse is None or better is None:
            print("error: --losses needs both runs (see --losses-of / --losses-vs)", file=sys.stderr)
            return 2
        rows = losses(queries, worse, better, args.losses_n, args.k, _read_catalog(args.catalog))
        write_losses(args.losses, rows, worse["run"], better["run"], args.k)
        print(f"wrote {args.losses}: {len(rows)} queries where {worse['run']} loses most to {better['run']}")
    for r in runs:  # the JSON keeps per-query figures only with --per-query
        for key in ("per_query_ndcg", "rankings", "titles"):
            r.pop(key, None)
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "n_queries": len(queries), "metric_notes": metrics.__doc__, "machine": machine_info(), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot_bars(runs, args.k, args.plot, f"{args.judgments.parent.name or args.judgments.stem} "
                                           f"{args.split} split ({len(queries)} queries)")
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense retrieval alone, by exact cosine over a whole catalog, for several bi-encoder checkpoints in one run.

Each ``--model NAME=DIR`` (a Hugging Face folder: a fine-tune's output) embeds every title of the artifact's catalog
(fp32 torch, mean pooling + L2 as served, titles at the served ``max_item_tokens``) and the split's queries (at the
served ``query_truncate_tokens``), ranks the catalog by exact cosine and is scored with the ``make eval`` code path
(``bundlerec_export.evaluation``: queries grouped by normalised form, split by ``split_of``, NDCG@10 / Recall@10 /
MRR@10). ``NAME=artifact`` reuses the artifact's own ``embeddings.npy`` for the catalog (its encoder folder for the
queries) after checking that torch reproduces a sample of it. No server, no HNSW, no quality prior.

    python -m benchmarks.dense_exact --artifact artifacts/homedepot --judgments J --split test \\
        --model served=artifact --model student=runs/ft-distill --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bundlerec_export import evaluation as metrics


def catalog(artifact: Path) -> tuple[list[str], list[str]]:
    ids, titles = [], []
    with open(artifact / "items.jsonl", encoding="utf-8") as fh:
        for line in fh:
            it = json.loads(line)
            ids.append(str(it["id"]))
            titles.append(str(it["title"]))
    return ids, titles


def top_k(q: np.ndarray, d: np.ndarray, k: int) -> list[np.ndarray]:
    """Rows of the ``k`` best cosines per query, best first (ties by row)."""
    out = []
    for s in range(0, len(q), 256):
        sc = q[s:s + 256] @ d.T
        for row in sc:
            cand = np.argpartition(-row, k)[:k]
            out.append(cand[np.lexsort((cand, -row[cand]))])
    return out


def run(artifact: Path, judgments: Path, split: str, models: list[tuple[str, str]], k: int = 10,
        threads: int = 2, check_rows: int = 300) -> dict[str, Any]:
    import torch

    from bundlerec_export.finetune import embed_many, load_model

    torch.set_num_threads(threads)
    manifest = json.loads((artifact / "manifest.json").read_text())
    enc = manifest.get("encoder", {})
    item_tokens = int(enc.get("max_item_tokens", 128))
    query_tokens = int(enc.get("query_truncate_tokens", 64))
    ids, titles = catalog(artifact)
    grouped = metrics.by_normalized_query(metrics.read_judgments(judgments))
    keys = sorted(key for key in grouped if split == "all" or metrics.split_of(key) == split)
    queries = [grouped[key] for key in keys]
    out: dict[str, Any] = {"artifact": str(artifact), "split": split, "queries": len(queries), "catalog": len(ids),
                           "k": k, "item_tokens": item_tokens, "query_tokens": query_tokens, "runs": {}}
    for name, path in models:
        t0 = time.perf_counter()
        reuse = path == "artifact"
        folder = Path(enc["base_model_path"]) if reuse else Path(path)
        tok, model = load_model(folder)
        info: dict[str, Any] = {"model": str(folder)}
        if reuse:
            d = np.load(artifact / "embeddings.npy").astype(np.float32)
            sample = np.linspace(0, len(ids) - 1, min(check_rows, len(ids))).astype(int)
            again = embed_many(model, tok, [titles[i] for i in sample], item_tokens, 64)
            info["catalog"] = "artifact embeddings.npy"
            info["parity_min_cosine"] = float(np.min(np.sum(again * d[sample], axis=1)))
        else:
            d = embed_many(model, tok, titles, item_tokens, 128, progress=True, desc=f"{name} catalog")
            info["catalog"] = "torch fp32"
        qv = embed_many(model, tok, [q for q, _ in queries], query_tokens, 128)
        rankings = [[ids[r] for r in rows] for rows in top_k(qv, d, k)]
        agg = metrics.aggregate(metrics.query_metrics(r, j, k) for (_, j), r in zip(queries, rankings, strict=True))
        info.update(aggregate=dict(agg), seconds=round(time.perf_counter() - t0, 1))
        out["runs"][name] = info
        print(f"{name}: NDCG@{k} {agg['ndcg']:.4f}  Recall@{k} {agg['recall']:.4f}  MRR@{k} {agg['mrr']:.4f}"
              f"  ({info['seconds']} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dense_exact", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--split", default="test", choices=("train", "dev", "test", "all"))
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (an HF folder) or NAME=artifact")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    models = []
    for m in args.model:
        name, sep, path = m.partition("=")
        if not sep or not name or not path:
            p.error(f"--model {m!r}: NAME=DIR or NAME=artifact")
        models.append((name, path))
    res = run(args.artifact, args.judgments, args.split, models, args.k, args.threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

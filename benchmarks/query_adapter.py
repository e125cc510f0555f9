"""A query-side adapter trained against the whole catalog (issue 15's dense target; tried, not kept).

The served encoder is frozen; only a map applied to the query vector is learned, q' = normalise(q + f(q)) with f
linear (initialised to 0, so training starts at the served model) or a small MLP, against the artifact's own
catalog embeddings. The loss is a softmax over *every* catalog item (54,667 on Home Depot: all of them negatives,
not a batch's), with the TRAIN queries' judged gains as the target distribution. Dev NDCG@10 of exact cosine
retrieval is printed per epoch; the test split is never read. Catalog embeddings are not recomputed, so a run takes
minutes, not a fine-tune's half hour (docs/ranking.md, "A query-side adapter").

    python -m benchmarks.query_adapter --artifact artifacts/homedepot --judgments J [--kind linear|mlp] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit
from bundlerec_export import evaluation as metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.query_adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    p.add_argument("--hidden", type=int, default=768, help="MLP width")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, i.e. towards the served model")
    p.add_argument("--temperature", type=float, default=0.05, help="the fine-tune's")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="dev NDCG@10 per epoch (PNG)")
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    engine = Engine(args.artifact, Settings(artifact=args.artifact, provider="cpu"))  # the served query encoder
    ids = engine.catalog.ids
    row_of = {x: i for i, x in enumerate(ids)}
    judged_by_query = metrics.by_normalized_query(metrics.read_judgments(args.judgments))
    names = sorted(q for q in judged_by_query if metrics.split_of(q) in ("train", "dev"))
    judged = [judged_by_query[q][1] for q in names]
    t0 = time.time()
    written = [judged_by_query[q][0] for q in names]
    queries = torch.from_numpy(np.concatenate([engine.encoder.encode(written[i:i + 32]) for i in range(0, len(written), 32)]))
    print(f"encoded {len(names)} TRAIN and dev queries in {time.time() - t0:.1f} s", flush=True)
    items = torch.from_numpy(np.array(engine.embeddings))
    dev = np.array([i for i, q in enumerate(names) if metrics.split_of(q) == "dev"])
    train, targets = [], []
    for i, q in enumerate(names):
        gains = [(row_of[pid], rel - 1.0) for pid, rel in judged[i].items() if pid in row_of and rel > 1.0]
        if metrics.split_of(q) == "train" and gains:
            w = torch.tensor([g for _, g in gains], dtype=torch.float32)
            train.append(i)
            targets.append((torch.tensor([r for r, _ in gains]), w / w.sum()))

    dim = queries.shape[1]
    net: Any = (torch.nn.Linear(dim, dim, bias=False) if args.kind == "linear" else
                torch.nn.Sequential(torch.nn.Linear(dim, args.hidden), torch.nn.GELU(), torch.nn.Linear(args.hidden, dim)))
    last = net if args.kind == "linear" else net[2]
    torch.nn.init.zeros_(last.weight)  # starts as the identity: the served model
    if last.bias is not None:
        torch.nn.init.zeros_(last.bias)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def adapt(q: Any) -> Any:
        return torch.nn.functional.normalize(q + net(q), dim=-1)

    def dev_ndcg() -> float:
        with torch.no_grad():
            scores = adapt(queries[dev]) @ items.T
            top = torch.topk(scores, 10, dim=1).indices.numpy()
        vals = [metrics.ndcg_at_k([ids[r] for r in t], judged[i]) for i, t in zip(dev, top, strict=True)]
        return float(np.mean([v for v in vals if v is not None]))

    curve = [{"epoch": 0, "dev_ndcg@10": round(dev_ndcg(), 4)}]
    print(json.dumps(curve[-1]), flush=True)
    for epoch in range(1, args.epochs + 1):
        order = np.random.RandomState(args.seed + epoch).permutation(len(train))
        total, t0 = 0.0, time.time()
        for s in range(0, len(order), args.batch):
            batch = order[s:s + args.batch]
            logp = torch.log_softmax(adapt(queries[[train[j] for j in batch]]) @ items.T / args.temperature, dim=1)
            loss = -torch.stack([(logp[k, targets[j][0]] * targets[j][1]).sum() for k, j in enumerate(batch)]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        curve.append({"epoch": epoch, "loss": round(total / len(order), 4), "dev_ndcg@10": round(dev_ndcg(), 4),
                      "seconds": round(time.time() - t0, 1)})
        print(json.dumps(curve[-1]), flush=True)
    best = max(curve, key=lambda r: r["dev_ndcg@10"])
    emit({"artifact": str(args.artifact), "settings": {k: str(v) for k, v in vars(args).items()},
          "train_queries": len(train), "dev_queries": len(dev), "curve": curve, "best": best}, args.json, echo=False)
    print(f"served model (epoch 0) {curve[0]['dev_ndcg@10']}, best {best['dev_ndcg@10']} at epoch {best['epoch']}")
    if args.plot:
        plot(curve, f"{args.kind} adapter, lr {args.lr}, temperature {args.temperature}", args.plot)
    return 0


def plot(curve: list[dict[str, Any]], label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([r["epoch"] for r in curve], [r["dev_ndcg@10"] for r in curve], marker="o", label=label)
    ax.axhline(curve[0]["dev_ndcg@10"], color="grey", linestyle="--", label="served model (no adapter)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev NDCG@10, dense alone (exact cosine)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

"""``bundlerec-export``: build a serving artifact from a dataset.

Examples::

    bundlerec-export --dataset instacart --data-dir data/demo/instacart --out artifacts/demo
    bundlerec-export --dataset homedepot --data-dir ../shared/data/homedepot --out artifacts/homedepot
    bundlerec-export --dataset csv --catalog catalog.csv [--orders orders.csv] --out artifacts/mine
    scripts/in_netns.sh bundlerec-export --ray --dataset instacart --data-dir data/demo/instacart --out artifacts/demo

Encoder fine-tuning: ``--dataset homedepot`` fine-tunes the encoder on ``<data-dir>/judgments.csv`` first (ON by
default; ``--no-finetune`` builds with the base model); ``--finetune [JUDGMENTS]`` turns it on for other datasets.
The fine-tuned model is cached next to the artifact (``<out>.work/finetuned-<key>``) and reused by a rebuild.

Generic catalogs: CSV columns (or JSONL keys) ``id,title[,category][,price]``; orders CSV
``basket_id,item_id[,user_id]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from bundlerec_export.config import COLD_START_SPACES, COMPLEMENT_METHODS, BuildConfig, defaults
from bundlerec_export.datasets import DATASETS, DatasetError
from bundlerec_export.offline import ensure_offline


def _parser() -> argparse.ArgumentParser:
    d = defaults()  # every default comes from BuildConfig
    p = argparse.ArgumentParser(prog="bundlerec-export", description="Build a bundlerec serving artifact.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", type=Path, help="dataset folder (instacart, homedepot, icecat)")
    src.add_argument("--catalog", type=Path, help="catalog file for --dataset csv/jsonl")
    p.add_argument("--orders", type=Path, help="orders CSV basket_id,item_id[,user_id] (csv/jsonl only)")
    p.add_argument("--out", required=True, type=Path, help="artifact folder (replaced atomically on success)")
    p.add_argument("--base-model", type=Path, help="Hugging Face model folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--limit", type=int, default=d["limit"], help="keep only the first N items")
    p.add_argument("--min-int8-cosine", type=float, default=d["min_int8_cosine"],
                   help="fail below this int8 mean cosine to fp32")
    p.add_argument("--agreement-sample", type=int, default=d["agreement_sample"], help="titles used to measure agreement")
    p.add_argument("--complements", choices=COMPLEMENT_METHODS, default=d["complements"],
                   help="learned: LambdaRank re-ranked complements (orders with shopper ids; else npmi); "
                        "npmi: NPMI co-occurrence mining")
    p.add_argument("--min-support", type=int, default=d["min_support"], help="baskets a complement pair needs")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="complements kept per item")
    p.add_argument("--shrinkage", type=float, default=d["shrinkage"], help="NPMI shrinkage: score *= c/(c+shrinkage)")
    p.add_argument("--min-users", type=int, default=d["min_users"],
                   help="distinct shoppers a complement pair needs (basket evidence)")
    p.add_argument("--user-level-evidence", action="store_true", default=d["user_level_evidence"],
                   help="count co-occurrence once per user instead of per basket")
    p.add_argument("--related-band", type=float, nargs=2, default=d["related_band"], metavar=("LO", "HI"),
                   help="cosine band of content-based related items (datasets without baskets)")
    p.add_argument("--cold-start-space", choices=COLD_START_SPACES, default=d["cold_start_space"],
                   help="embeddings the cold-start model reads (catalogs without orders): base = the base MiniLM's "
                        "(titles embedded again when the encoder is fine-tuned), served = the served encoder's")
    p.add_argument("--no-cold-start-hub", action="store_false", dest="cold_start_hub", default=d["cold_start_hub"],
                   help="no anti-hub correction of the cold-start lists (catalogs without orders or categories)")
    p.add_argument("--ef-search", type=int, default=d["ef_search"])
    p.add_argument("--hnsw-m", type=int, default=d["hnsw_m"],
                   help="HNSW links per node (higher: better recall, bigger index)")
    p.add_argument("--batch-size", type=int, default=d["embed_batch_size"], dest="embed_batch_size",
                   help="catalog embedding batch size")
    p.add_argument("--ray", action="store_true", default=d["ray"],
                   help="embed the catalog on Ray Data (an ONNX Runtime actor pool): RAY_ADDRESS's cluster, else a "
                        "local Ray started in-process; run it in a private network namespace (scripts/in_netns.sh)")
    p.add_argument("--ray-address", default=d["ray_address"], metavar="ADDR",
                   help="Ray cluster to embed on (ray://HOST:10001 or HOST:6379); implies --ray")
    p.add_argument("--ray-actors", type=int, default=d["ray_actors"], help="largest ONNX Runtime actor pool on Ray")
    p.add_argument("--ray-actor-cpus", type=float, default=d["ray_actor_cpus"], help="CPUs reserved per Ray actor")
    p.add_argument("--threads", type=int, default=d["threads"], help="ORT/hnswlib threads, and torch's for fine-tuning and distillation (0: library default; "
                        "part of the fine-tune's and the student's cache keys, so changing it trains them anew)")
    p.add_argument("--no-lexical", action="store_false", dest="lexical", default=d["lexical"],
                   help="skip the bm25s lexical index")
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--finetune", nargs="?", const="", default=None, metavar="JUDGMENTS",
                    help="fine-tune the encoder on a judgments CSV query,product_id,relevance first "
                         "(default file: <data-dir>/judgments.csv; on by default for homedepot)")
    ft.add_argument("--no-finetune", action="store_true", help="do not fine-tune (homedepot's default is to)")
    p.add_argument("--finetune-epochs", type=int, default=d["finetune_epochs"], help="fine-tuning epochs")
    p.add_argument("--finetune-cache", type=Path, help="folder of cached fine-tuned models (default <out>.work)")
    p.add_argument("--student-layers", type=_layers, default=d["student_layers"], metavar="I,J,...",
                   help="serve a shallower student keeping these layers of the encoder (e.g. 0,2,4 of MiniLM's 6), "
                        "distilled on its vectors (bundlerec_export.shrink; ~25 min for Home Depot on 2 cores, cached)")
    p.add_argument("--student-texts", type=Path, default=None, metavar="FILE",
                   help="more texts for the student's distillation, one a line (e.g. a query log)")
    p.add_argument("--student-epochs", type=int, default=None, help="distillation epochs (default 5)")
    p.add_argument("--student-finetune-epochs", type=int, default=d["student_finetune_epochs"],
                   help="the student's own fine-tune on the judgments when the teacher was fine-tuned (0: none)")
    p.add_argument("--publish-milvus", default=d["publish_milvus"], metavar="URI",
                   help="after the build, publish the vectors to Milvus (milvus://host:port[?alias=NAME]) and point "
                        "the alias at the new version's collection (see bundlerec_export.milvus_publish)")
    p.add_argument("--ranker-judgments", type=Path, default=None,
                   help="judgments CSV for the learned hybrid ranker and the serving tuning (default: the fine-tuning's)")
    p.add_argument("--no-ranker", action="store_false", dest="ranker", default=d["ranker"],
                   help="do not train the learned hybrid ranker (bundlerec_export.train_ranker)")
    p.add_argument("--cross-encoder", action=argparse.BooleanOptionalAction, default=d["cross_encoder"],
                   help="train the re-ranking cross-encoder over the served top (bundlerec_export.cross_encoder, about "
                        "15 min on 2 cores; cached); served by default only if it wins on dev")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


# BuildConfig fields set from the option of the same name (dest)
_CONFIG_OPTIONS = ("dataset", "out", "data_dir", "catalog", "orders", "base_model", "limit", "min_int8_cosine",
                   "agreement_sample", "complements", "min_support", "top_k", "shrinkage", "user_level_evidence", "min_users",
                   "ef_search", "hnsw_m", "embed_batch_size", "ray", "ray_address", "ray_actors", "ray_actor_cpus",
                   "threads", "lexical", "finetune_epochs", "finetune_cache", "publish_milvus", "ranker", "ranker_judgments", "cross_encoder",
                   "cold_start_space", "cold_start_hub", "student_layers", "student_texts", "student_finetune_epochs")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated layer numbers, e.g. 0,2,4") from None


def config_from_args(args: argparse.Namespace, judgments: Path | None) -> BuildConfig:
    return BuildConfig(**{name: getattr(args, name) for name in _CONFIG_OPTIONS},
                       related_band=(args.related_band[0], args.related_band[1]),
                       student_options={} if args.student_epochs is None else {"epochs": args.student_epochs},
                       progress=not args.no_progress and not args.quiet, finetune_judgments=judgments)


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # The root logger stays at WARNING: onnxruntime's quantizer logs one INFO line per tensor on it.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bundlerec_export", "bundlerec_server"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets DEBUG on itself


def _fmt_agree(entry: dict[str, Any]) -> str:
    c = entry.get("cosine_to_fp32")
    if c is None:
        return f"n/a ({(entry.get('reason') or '')[:80]})"
    return f"mean {c['mean']:.4f} / min {c['min']:.4f} (n={c['n']})"


def _finetune_judgments(args: argparse.Namespace) -> Path | None:
    """The judgments file to fine-tune on, or None: homedepot defaults to <data-dir>/judgments.csv."""
    if args.no_finetune:
        return None
    if args.finetune:
        return Path(args.finetune)
    if args.finetune == "" or (args.dataset == "homedepot" and args.base_model is None):
        if args.data_dir is None:
            _parser().error("--finetune without a file needs --data-dir (its judgments.csv)")
        return Path(args.data_dir) / "judgments.csv"
    return None


def main(argv: list[str] | None = None) -> int:
    ensure_offline()
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if args.dataset in ("csv", "jsonl") and args.catalog is None and args.data_dir is None:
        _parser().error("--dataset csv/jsonl needs --catalog FILE")
    if args.orders is not None and args.dataset not in ("csv", "jsonl"):
        _parser().error("--orders applies to --dataset csv/jsonl only")

    judgments = _finetune_judgments(args)
    if judgments is not None and not judgments.is_file():
        _parser().error(f"fine-tuning: {judgments} not found (give --finetune FILE, or --no-finetune)")
    if judgments is not None and args.base_model is not None:
        _parser().error("--base-model and fine-tuning exclude each other (add --no-finetune)")

    from bundlerec_export.build import BuildError, build
    from bundlerec_export.onnx_export import ExportError

    cfg = config_from_args(args, judgments)
    try:
        result = build(cfg)
    except (DatasetError, BuildError, ExportError) as exc:
        print(f"bundlerec-export: error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    size = sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file())
    print(f"artifact   {m['artifact_version']} -> {result.path} ({size / 1e6:.1f} MB)")
    print(f"items      {m['item_count']} (dim {m['embedding_dim']}, skipped {m['skipped_items']['empty_title']})")
    c = m["complements"]
    print(f"complements {c['pairs']} pairs for {c.get('anchors', 0)} items ({c['method']})")
    for name, entry in m["models"].items():
        if name != "fp32":
            print(f"agreement  {name}: {_fmt_agree(entry)}")
    enc = m["encoder"]
    if enc.get("fine_tuned"):
        tr = enc["training"]
        dev = ", ".join(f"{e['epoch']}: {e['ndcg@10']:.4f}" for e in tr["dev_per_epoch"] if e.get("ndcg@10") is not None)
        cached = " (cached)" if tr.get("reused_from_cache") else ""
        print(f"fine-tuned {enc['base_model']} in {tr['seconds']['total']:.0f} s{cached}; dev NDCG@10 per epoch {dev}")
    st = enc.get("student")
    if st:
        cos = ", ".join(f"{c:.4f}" for c in st["val_cosine"] if c is not None)
        cached = " (cached)" if st["reused_from_cache"] else ""
        print(f"student    layers {st['layers']} of {st['teacher']}{cached}; held-out cosine to the teacher per epoch {cos}")
    ce = m.get("cross_encoder")
    if ce:
        dev = ce["dev"]
        print(f"re-ranker  cross-encoder over the top {ce['depth']}: dev NDCG@10 {dev['served']['ndcg']:.4f} -> "
              f"{dev['reranked']['ndcg']:.4f} (blend {ce['blend']}); {'on' if ce['wins_on_dev'] else 'off'} by default")
    print("seconds    " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

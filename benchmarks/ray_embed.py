"""Catalog embedding time: the single-process embed stage vs Ray Data's actor pool (``bundlerec_export.ray_embed``).

Run it in a private network namespace (Ray binds every interface otherwise)::

    scripts/in_netns.sh python -m benchmarks.ray_embed --data-dir data/demo/instacart --models tiny minilm

For each model the fp32 graph is exported once into ``--work`` (reused later), then the build's ``embed_stage``
embeds every catalog title in this process and on a local Ray started in-process (the ``--ray`` path: Ray's
start and shutdown are in its wall time; ``ray_pipeline_s`` is the dataset run alone; Ray actors run one ORT
thread per reserved CPU, at least one; ``--threads`` sets the single-process run's). Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _model_root(work: Path, model: str) -> Path:
    """Folder holding ``model/fp32.onnx`` + tokenizer for ``model`` ("tiny" or "minilm"), exported on first use."""
    from bundlerec_export import onnx_export as ox
    from bundlerec_export.tiny import make_tiny_bert
    from bundlerec_server.artifact import MODEL_FILES

    root = work / model
    if not (root / MODEL_FILES["fp32"]).is_file():
        base = make_tiny_bert(work / "tiny-bert") if model == "tiny" else ox.default_base_model()
        ox.export_fp32(base, (root / MODEL_FILES["fp32"]).parent)
    return root


def measure(titles: list[str], root: Path, batch_size: int, actors: int, actor_cpus: float, threads: int = 0) -> dict:
    from bundlerec_export.build import embed_stage
    from bundlerec_export.config import BuildConfig

    seconds, embs, how = {}, {}, {}
    for engine in ("single-process", "ray"):
        cfg = BuildConfig(dataset="bench", out=root, embed_batch_size=batch_size, progress=False,
                          ray=engine == "ray", ray_actors=actors, ray_actor_cpus=actor_cpus, threads=threads)
        t0 = time.perf_counter()
        embs[engine], part = embed_stage(root, titles, cfg)
        seconds[engine] = round(time.perf_counter() - t0, 2)
        how[engine] = part["embed"]
    a, b = embs["single-process"], embs["ray"]
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"items": len(titles), "batch_size": batch_size, "single_process_threads": threads,
            "single_process_s": seconds["single-process"],
            "ray_wall_s": seconds["ray"], "ray_pipeline_s": how["ray"]["seconds"], "ray_actors_used": how["ray"]["actors"],
            "ray_max_actors": actors, "actor_cpus": actor_cpus, "min_cosine": round(float(cosine.min()), 8),
            "bit_identical": bool(np.array_equal(a, b))}


def main(argv: list[str] | None = None) -> int:
    from bundlerec_export.datasets import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="instacart")
    p.add_argument("--data-dir", type=Path, default=Path("data/demo/instacart"))
    p.add_argument("--models", nargs="+", choices=("tiny", "minilm"), default=["tiny"])
    p.add_argument("--work", type=Path, default=Path("/tmp/bundlerec-ray-embed-bench"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="ORT threads of the single-process run (0: ORT's default)")
    args = p.parse_args(argv)
    titles = [item.title for item in load_dataset(args.dataset, args.data_dir).items]
    for model in args.models:
        root = _model_root(args.work, model)
        print(json.dumps({"model": model, **measure(titles, root, args.batch_size, args.actors, args.actor_cpus,
                                                             args.threads)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

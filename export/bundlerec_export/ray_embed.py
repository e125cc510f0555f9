"""Catalog embedding on Ray Data: the build's ``embed`` stage spread over an ONNX Runtime actor pool.

The titles become a Ray dataset (``ray.data.from_pandas``) that ``map_batches`` sends through a pool of actors,
each holding one serving :class:`bundlerec_server.encoder.Encoder` on the fp32 graph, loaded once per actor. The
arithmetic is the single-process path's (``Encoder.encode_many``): the same length-sorted batches of
``batch_size`` titles, each run as one ``Encoder.encode`` call, so every row sees the same batch mates and the same
padding width. Every block is a whole number of those batches and every row carries its batch number; the actor
encodes each batch number's rows as one call, so a batch stays whole however Ray cuts its input. The driver
writes the results back by the row index column (never by block order) and checks that every row came back once.

The graph and tokenizer travel through Ray's object store, so actors on other machines need no shared filesystem,
only the same Python packages (``bundlerec-server``: onnxruntime, tokenizers). ``address`` (or ``RAY_ADDRESS``)
connects to a running cluster; without one a local Ray is started in-process and shut down afterwards. A Ray
already initialised by the caller is used as it is and left running.

Ray binds every interface of the machine: run it in a private network namespace (``scripts/in_netns.sh``) unless
the machine belongs to a cluster meant to be reached (docs/ray.md).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RayEmbedError", "RayEmbedOptions", "embed_titles", "length_batches"]

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MAX_BATCHES_PER_BLOCK = 16
BLOCKS_PER_ACTOR = 4  # enough blocks to keep every actor busy and balance the tail


class RayEmbedError(RuntimeError):
    """Ray returned rows that do not cover the catalog exactly once."""


@dataclass(frozen=True)
class RayEmbedOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started in-process
    max_actors: int = 2  # the pool grows from 1 to this many actors
    actor_cpus: float = 0.5  # CPUs Ray reserves per actor (<= 0.5 keeps the read tasks schedulable on 2 cores)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_actors < 1:
            raise ValueError("max_actors must be positive")
        if self.actor_cpus <= 0:
            raise ValueError("actor_cpus must be positive")

    @property
    def threads(self) -> int:
        """ONNX Runtime threads per actor: the CPUs Ray reserved for it (at least one)."""
        return max(1, int(self.actor_cpus))


def length_batches(titles: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row order, batch number per position): ``Encoder.encode_many``'s length-sorted batches."""
    order = np.argsort([len(t) for t in titles], kind="stable")
    return order, np.arange(len(titles)) // batch_size


class _EncodeActor:
    """Ray Data UDF: one serving ``Encoder`` per actor; each batch number's rows are encoded as one batch."""

    def __init__(self, shipped: list[Any], max_length: int, threads: int) -> None:
        import ray

        from bundlerec_server.encoder import Encoder

        files: dict[str, bytes] = ray.get(shipped[0])
        self._dir = tempfile.TemporaryDirectory(prefix="bundlerec-ray-embed-")
        for name, data in files.items():
            Path(self._dir.name, name).write_bytes(data)
        self.encoder = Encoder(Path(self._dir.name, MODEL_FILE), Path(self._dir.name, TOKENIZER_FILE),
                               max_length=max_length, provider="cpu", intra_op_threads=threads)
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        numbers = batch["batch"]
        cuts = [0, *(np.flatnonzero(np.diff(numbers)) + 1).tolist(), len(numbers)]
        titles = [str(t) for t in batch["title"]]
        emb = np.concatenate([self.encoder.encode(titles[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)])
        return {"row": batch["row"], "batch": numbers, "embedding": emb,
                "worker": np.full(len(numbers), self.worker, dtype=object)}


def embed_titles(model: Path, tokenizer: Path, titles: list[str], *, max_length: int, batch_size: int,
                 options: RayEmbedOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of ``titles`` (float32, input order) computed on Ray, and the manifest's ``embed`` entry."""
    import ray

    if not titles:
        raise ValueError("no titles to embed")
    started = _ensure_ray(options.address)
    try:
        t0 = time.perf_counter()
        emb, info = _run(model, tokenizer, titles, max_length, batch_size, options)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["cluster"] = "started in-process" if started else "connected"
    finally:
        if started:
            ray.shutdown()
    return emb, info


def _ensure_ray(address: str | None) -> bool:
    """Connects to ``address`` / ``RAY_ADDRESS`` or starts a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


def _run(model: Path, tokenizer: Path, titles: list[str], max_length: int, batch_size: int,
         options: RayEmbedOptions) -> tuple[np.ndarray, dict[str, Any]]:
    import pandas as pd
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = options.progress
    n = len(titles)
    order, numbers = length_batches(titles, batch_size)
    batches = math.ceil(n / batch_size)
    per_block = min(MAX_BATCHES_PER_BLOCK, max(1, math.ceil(batches / (BLOCKS_PER_ACTOR * options.max_actors))))
    rows_per_block = per_block * batch_size
    frames = [pd.DataFrame({"row": order[s : s + rows_per_block], "batch": numbers[s : s + rows_per_block],
                            "title": [titles[i] for i in order[s : s + rows_per_block]]})
              for s in range(0, n, rows_per_block)]
    shipped = ray.put({MODEL_FILE: Path(model).read_bytes(), TOKENIZER_FILE: Path(tokenizer).read_bytes()})
    ds = ray.data.from_pandas(frames).map_batches(
        _EncodeActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=options.max_actors),
        num_cpus=options.actor_cpus,
        fn_constructor_kwargs={"shipped": [shipped], "max_length": max_length, "threads": options.threads},
    )
    out: np.ndarray | None = None
    seen = np.zeros(n, dtype=np.int64)
    workers: set[str] = set()
    for part in ds.iter_batches(batch_format="numpy", batch_size=None):
        rows = part["row"].astype(np.int64)
        if out is None:
            out = np.zeros((n, part["embedding"].shape[1]), dtype=np.float32)
        out[rows] = part["embedding"]
        np.add.at(seen, rows, 1)
        workers.update(str(w) for w in part["worker"])
    if out is None or not np.all(seen == 1):
        missing, repeated = int(np.sum(seen == 0)), int(np.sum(seen > 1))
        raise RayEmbedError(f"Ray returned {int(seen.sum())} rows for {n} titles ({missing} missing, {repeated} repeated)")
    info = {"engine": "ray", "ray_version": ray.__version__, "actors": len(workers), "max_actors": options.max_actors,
            "actor_cpus": options.actor_cpus, "intra_op_threads": options.threads, "batch_size": batch_size,
            "blocks": len(frames), "order": "row index column"}
    return out, info

"""Dense retrieval in process (hnswlib) vs in Milvus (Lite, a separate server process on loopback), side by side
on one artifact: publish time, top-10 overlap, p50/p99 of the dense search alone and of whole Recommend calls.

    python -m benchmarks.milvus_bench --artifact artifacts/demo --out runs/milvus_bench
    python -m benchmarks.milvus_bench --milvus-uri milvus://host:19530     # a running Milvus instead of Lite

Dense search: the engine's ``dense`` (k 10, anchor pool as served) with precomputed query vectors, unfiltered and
with a category filter. Recommend: sequential calls (one at a time, dense retrieval) against two server processes,
``--vector-backend hnsw`` and ``--vector-backend milvus://...``. Prints the figures and writes
``milvus_bench.json`` and ``milvus_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import load_queries, machine_info
from benchmarks.procs import REPO, ServerProcess, free_port

K = 10
START_TIMEOUT_S = 60.0


class MilvusLite:
    """``python -m milvus_lite server --host 127.0.0.1 --port P`` in a temporary data folder (a context manager:
    always stopped and removed)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bundlerec-milvus-"))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> MilvusLite:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.dir / "data"),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"Milvus Lite did not start on 127.0.0.1:{self.port}: {output}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MilvusLite:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {"n": int(ms.size), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean())}


def exact_rows(engine: Any, vec: np.ndarray, allowed: Any) -> set[int]:
    """Brute force over the rows ``allowed`` lets through: the best anchor-pool rows by cosine, then the top
    10 by cosine x quality (what both backends approximate)."""
    rows = np.flatnonzero(allowed.anchors(np.arange(len(engine.catalog))))
    sims = np.asarray(engine.embeddings[rows], dtype=np.float32) @ vec
    pool = np.argsort(-sims, kind="stable")[: max(K, engine.settings.anchor_pool)]
    scores = sims[pool] * engine.catalog.quality[rows[pool]]
    return {int(r) for r in rows[pool][np.argsort(-scores, kind="stable")[:K]]}


def dense_side_by_side(artifact: Path, uri: str, queries: list[str]) -> dict[str, Any]:
    from bundlerec_server.domain import Filters
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    base = Settings(artifact=artifact, provider="cpu", intra_op_threads=1)
    local, remote = Engine(artifact, base), Engine(artifact, base.replace(vector_backend=uri))
    vecs = local.encoder.encode(queries)
    codes = np.bincount(local.catalog.category_codes)
    names = {code: name for name, code in local.catalog.codes_by_name.items()}
    one_category = Filters(include_categories=frozenset([names[int(np.argmax(codes))]]))  # the largest category
    out: dict[str, Any] = {"queries": len(queries), "k": K, "anchor_pool": base.anchor_pool, "ef": local.ef,
                           "filtered_by": sorted(one_category.include_categories)}
    for label, filters in (("unfiltered", Filters()), ("one_category", one_category)):
        allowed = local.allow(filters)
        lat: dict[str, list[float]] = {"hnswlib": [], "milvus": []}
        overlap, recall = [], {"hnswlib": [], "milvus": []}
        for vec in vecs:
            exact = exact_rows(local, vec, allowed)
            rows = {}
            for backend, engine in (("hnswlib", local), ("milvus", remote)):
                t0 = time.perf_counter()
                hits = engine.dense(vec, K, allowed)
                lat[backend].append(time.perf_counter() - t0)
                rows[backend] = {h.row for h in hits}
                recall[backend].append(len(rows[backend] & exact) / max(1, len(exact)))
            overlap.append(len(rows["hnswlib"] & rows["milvus"]) / max(1, len(rows["hnswlib"])))
        out[label] = {"overlap_at_10": float(np.mean(overlap)), "overlap_min": float(np.min(overlap)),
                      "exact_recall_at_10": {b: float(np.mean(r)) for b, r in recall.items()},
                      "hnswlib_ms": summary_ms(lat["hnswlib"]), "milvus_ms": summary_ms(lat["milvus"])}
    return out


def recommend_side_by_side(artifact: Path, uri: str, queries: list[str], calls: int, log_dir: Path) -> dict[str, Any]:
    from bundlerec import Client

    out: dict[str, Any] = {"calls": calls}
    for label, backend in (("hnswlib", "hnsw"), ("milvus", uri)):
        port = free_port()
        argv = [sys.executable, "-m", "bundlerec_server", "--artifact", str(artifact), "--host", "127.0.0.1",
                "--port", str(port), "--provider", "cpu", "--vector-backend", backend, "--retrieval-mode", "dense"]
        with ServerProcess(argv, log_dir / f"server-{label}.log", target=f"127.0.0.1:{port}", name=label) as srv:
            srv.wait_serving(120)
            with Client(srv.target, timeout=10.0) as c:
                for q in queries[:20]:  # warm-up
                    list(c.recommend(q))
                samples, bundles = [], 0
                for i in range(calls):
                    t0 = time.perf_counter()
                    stream = c.recommend(queries[i % len(queries)])
                    bundles += len(list(stream))
                    samples.append(time.perf_counter() - t0)
        out[label] = {**summary_ms(samples), "bundles_per_call": bundles / calls}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("dense search", result["dense"]["unfiltered"], "_ms"),
              ("dense, 1 category", result["dense"]["one_category"], "_ms"),
              ("Recommend call", result["recommend"], "")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (title, data, suffix) in zip(axes, groups, strict=True):
        x = np.arange(2)
        for j, (backend, color) in enumerate((("hnswlib", "#4c72b0"), ("milvus", "#dd8452"))):
            d = data[backend + suffix]
            ax.bar(x + (j - 0.5) * 0.38, [d["p50"], d["p99"]], 0.38, label=backend, color=color)
        ax.set_xticks(x, ["p50", "p99"])
        ax.set_title(title)
        ax.set_ylabel("ms")
    axes[0].legend()
    m = result["machine"]
    fig.suptitle(f"{result['artifact_version']} ({result['items']} items): in-process hnswlib vs Milvus Lite "
                 f"(loopback) — load avg {m['loadavg'][0]:.1f} on {m['usable_cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.milvus_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "demo")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "milvus_bench")
    p.add_argument("--milvus-uri", default="", help="a running Milvus (default: start Milvus Lite on loopback)")
    p.add_argument("--queries", type=Path, default=None, help="query file (default benchmarks/queries/instacart.txt)")
    p.add_argument("--n-queries", type=int, default=300, help="queries for the dense comparison")
    p.add_argument("--calls", type=int, default=300, help="Recommend calls per backend")
    p.add_argument("--index-type", choices=("HNSW", "HNSW_SQ"), default="HNSW")
    args = p.parse_args(argv)
    from bundlerec_export.milvus_publish import publish

    args.out.mkdir(parents=True, exist_ok=True)
    queries = load_queries(args.queries)[: args.n_queries]
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    lite = None if args.milvus_uri else MilvusLite().start()
    try:
        uri = args.milvus_uri or (lite.uri if lite else "")
        published = publish(args.artifact, uri, index_type=args.index_type)
        result: dict[str, Any] = {
            "artifact_version": manifest["artifact_version"], "items": manifest["item_count"],
            "dim": manifest["embedding_dim"], "milvus": "Milvus Lite (separate process, loopback)" if lite else uri,
            "index_type": args.index_type, "publish_s": published.seconds,
        }
        result["dense"] = dense_side_by_side(args.artifact, uri, queries)
        result["recommend"] = recommend_side_by_side(args.artifact, uri, queries, args.calls, args.out)
    finally:
        if lite is not None:
            lite.stop()
    result["machine"] = machine_info()
    (args.out / "milvus_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "milvus_bench.png")
    d, r = result["dense"], result["recommend"]
    print(f"artifact {result['artifact_version']} ({result['items']} items, dim {result['dim']}); "
          f"published in {result['publish_s']:.1f} s ({args.index_type})")
    for label in ("unfiltered", "one_category"):
        ex = d[label]["exact_recall_at_10"]
        print(f"dense {label:12s}: top-10 overlap {d[label]['overlap_at_10']:.3f} (min {d[label]['overlap_min']:.1f}), "
              f"recall vs exact hnswlib {ex['hnswlib']:.3f} milvus {ex['milvus']:.3f}; "
              f"hnswlib p50 {d[label]['hnswlib_ms']['p50']:.2f} / p99 {d[label]['hnswlib_ms']['p99']:.2f} ms; "
              f"milvus p50 {d[label]['milvus_ms']['p50']:.2f} / p99 {d[label]['milvus_ms']['p99']:.2f} ms")
    print(f"Recommend ({r['calls']} calls, sequential): hnswlib p50 {r['hnswlib']['p50']:.1f} / p99 {r['hnswlib']['p99']:.1f} ms; "
          f"milvus p50 {r['milvus']['p50']:.1f} / p99 {r['milvus']['p99']:.1f} ms")
    print(f"load average {result['machine']['loadavg']} on {result['machine']['usable_cores']} cores; "
          f"wrote {args.out / 'milvus_bench.json'} and {args.out / 'milvus_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

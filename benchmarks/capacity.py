"""Capacity plan: measure the vector index and the event store on synthetic data, extrapolate to 10M/100M items.

    python -m benchmarks.capacity --sizes 100000,1000000 --dim 384 --out runs/capacity \
        --json docs/results/capacity.json --plot docs/img/capacity.png

Parts (``--parts``, default all):
  hnsw    hnswlib fp32 (the export's M / ef_construction, space "cosine"): build time, file and RSS bytes
          per item (RSS read from a fresh process that loads the file), load time, single-query latency
          p50/p99 and recall@10 against exact brute force at several ef (the served ef among them).
  milvus  Milvus Lite as a separate server process on 127.0.0.1: HNSW_SQ (SQ8) and IVF_SQ8 — insert and
          index time, server RSS and disk per item, query p50/p99, recall@10. Skipped (with the reason in
          the JSON) when pymilvus / milvus-lite are not installed.
  events  event store: durable events/s (batched inserts, acknowledged after COMMIT), bytes per row, and the
          history read p50/p99 for users with 20-200 rows; SQLite as the server runs it (WAL,
          synchronous=FULL, the server's schema) and PostgreSQL (a temporary cluster started here, or
          ``--pg-dsn``). PostgreSQL is skipped (reason in the JSON) when no binary exists.

Each measurement is cached as ``<out>/parts/<part>-<size>.json``; ``--reuse`` takes cached ones instead of
re-measuring (so a long 1M build can run alone and be merged later). The extrapolation and the one-machine
limit are computed from the measured points (see :func:`extrapolate`).

Synthetic vectors (:func:`synthetic`): a Gaussian mixture around ``centres`` random unit directions with
Zipf-distributed cluster sizes, L2-normalised. Real sentence embeddings of a catalog are clustered (products
of a category lie close together, categories vary a lot in size); uniform random 384-d vectors are all
nearly orthogonal to each other, have no meaningful nearest neighbours, and make HNSW recall collapse — a
measurement on them says nothing about a catalog. The noise scale puts the cosine of two items of the same
cluster near 0.6 and of an item to its centre near 0.8, about what MiniLM gives for products of one
category. Row blocks are seeded by (seed, block), so the first 100k vectors of the 1M set are the 100k set.

All servers listen on 127.0.0.1 only. Timings are taken on a shared machine; the load average is recorded
beside each one, and times are upper bounds (rates lower bounds) for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1024**3
BLOCK = 10_000  # rows per seeded block of the synthetic generator
INTRINSIC = 12  # directions of spread per cluster (sentence embeddings have a low intrinsic dimension)
DEFAULT_EFS = (32, 64, 128)
NODE_RAM_GIB = (64, 128)
NODE_USABLE = 0.75  # fraction of a node's RAM the index may take (OS, encoder, gRPC, page cache get the rest)
NODE_FIXED_GIB = 4.0  # the server's own memory beside the index (encoder sessions, BM25, complements, Python)
RELOAD_COPIES = 2  # a hot reload loads the new index before the old one is dropped


# --- synthetic data ------------------------------------------------------------------------------------
def _centres(dim: int, centres: int, seed: int, intrinsic: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit centres, Zipf cluster weights, and per cluster ``intrinsic`` random unit directions of spread."""
    rng = np.random.default_rng([seed, 0xC3])
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    basis = rng.standard_normal((centres, intrinsic, dim)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=2, keepdims=True)
    w = 1.0 / np.arange(1, centres + 1)  # Zipf(1): a few big categories, a long tail
    return c, w / w.sum(), basis


def synthetic(n: int, dim: int = 384, centres: int = 2000, seed: int = 0, noise: float = 0.75,
              stream: int = 0, start: int = 0, intrinsic: int = INTRINSIC) -> np.ndarray:
    """Rows ``start`` .. ``start + n`` of a deterministic sequence of L2-normalised float32 draws from a
    Gaussian mixture (so a set is a prefix of any larger one and can be generated in pieces).

    A row is its centre + a spread of norm ≈ ``noise``: 90 % of the variance along the cluster's
    ``intrinsic`` directions, 10 % isotropic. ``stream`` separates independent draws of the same mixture
    (0: the catalog, 1: queries)."""
    c, w, basis = _centres(dim, centres, seed, intrinsic)
    low = np.float32(noise * math.sqrt(0.9 / intrinsic))
    iso = np.float32(noise * math.sqrt(0.1 / dim))
    first = start // BLOCK * BLOCK
    out = np.empty((start + n - first, dim), dtype=np.float32)
    for b0 in range(0, len(out), BLOCK):
        rows = min(BLOCK, len(out) - b0)
        rng = np.random.default_rng([seed, stream, (first + b0) // BLOCK])
        which = rng.choice(len(c), size=BLOCK, p=w)[:rows]
        z = rng.standard_normal((BLOCK, intrinsic), dtype=np.float32)[:rows] * low
        x = c[which] + rng.standard_normal((BLOCK, dim), dtype=np.float32)[:rows] * iso
        order = np.argsort(which, kind="stable")
        cut = np.flatnonzero(np.diff(which[order])) + 1
        for idx in np.split(order, cut):  # one small matmul per cluster present in the block
            x[idx] += z[idx] @ basis[which[idx[0]]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[b0:b0 + rows] = x
    return out[start - first:]


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int = 10, chunk: int = 100_000) -> np.ndarray:
    """Ids of the ``k`` largest inner products (= cosine on normalised rows) per query, best first."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.empty((len(queries), 0), dtype=np.int64)
    for s in range(0, len(data), chunk):
        sims = queries @ data[s:s + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + s], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_i


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k."""
    if len(found) != len(truth):
        raise ValueError("found and truth differ in length")
    hits = [len(set(map(int, f[:k])) & set(map(int, t[:k]))) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


# --- small helpers -----------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += rss_bytes(p)
            for t in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (t / "children").read_text().split()]
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def latency_ms(fn: Callable[[int], Any], count: int, warmup: int = 10) -> dict[str, float]:
    """p50/p99/mean of ``fn(i)`` for i in range(count), in ms, after ``warmup`` untimed calls."""
    for i in range(min(warmup, count)):
        fn(i)
    times = []
    for i in range(count):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    a = np.asarray(times)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "n": count}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[capacity {time.strftime('%H:%M:%S')} load {loadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def stamp(result: dict[str, Any], t0: float) -> dict[str, Any]:
    """Adds the wall time and the load averages seen at the end of a measurement."""
    result["wall_s"] = round(time.monotonic() - t0, 2)
    result["loadavg_after"] = loadavg()
    return result


# --- hnswlib -------------------------------------------------------------------------------------------
def export_defaults() -> dict[str, int]:
    """M, ef_construction and the ef floor the export builds with (its BuildConfig), when importable."""
    try:
        from bundlerec_export.config import defaults
    except ImportError:
        return {"M": 16, "ef_construction": 200, "ef_search": 64, "source": "fallback"}
    d = defaults()
    return {"M": d["hnsw_m"], "ef_construction": d["ef_construction"], "ef_search": d["ef_search"],
            "source": "bundlerec_export.config.BuildConfig"}


_LOAD_PROBE = """
import sys, time, json, hnswlib
def rss():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS:'):
            return int(l.split()[1]) * 1024
path, dim, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r0 = rss(); t = time.perf_counter()
idx = hnswlib.Index(space='cosine', dim=dim); idx.load_index(path, max_elements=n)
print(json.dumps({'load_s': time.perf_counter() - t, 'rss_delta': rss() - r0}))
"""


def grow_hnsw(sizes: Sequence[int], vectors: Callable[[int, int], np.ndarray], queries: np.ndarray, workdir: Path,
              m: int, ef_construction: int, efs: Sequence[int], served_ef: int, threads: int,
              on_point: Callable[[dict[str, Any]], None], step: int = 50_000) -> None:
    """One hnswlib build up to ``max(sizes)``, measured at each size on the way (``on_point`` per size).

    Inserting the first n rows of the sequence is the same work as building an index of those n rows, so the
    time to reach n is the build time of an n-item index; the file size, RSS and load time come from the
    index saved and reloaded (``max_elements=n``) at that point, and the queries run on it as it stands. A
    run stopped early keeps every point it reached. ``vectors(start, n)`` gives rows start .. start+n."""
    import hnswlib

    sizes = sorted(sizes)
    dim = queries.shape[1]
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=sizes[-1], M=m, ef_construction=ef_construction, random_seed=0)
    data = np.empty((0, dim), dtype=np.float32)
    progress: list[list[float]] = []
    built_s = 0.0
    t0 = time.monotonic()
    lb = loadavg()
    for n in sizes:
        while len(data) < n:
            s = len(data)
            chunk = vectors(s, min(step, n - s))
            data = np.concatenate([data, chunk])
            t = time.perf_counter()
            index.add_items(chunk, np.arange(s, s + len(chunk)), num_threads=threads)
            built_s += time.perf_counter() - t
            progress.append([len(data), round(built_s, 1), loadavg()[0]])
            log(f"hnsw build {len(data)}/{sizes[-1]} ({built_s:.0f} s)")
        res: dict[str, Any] = {"engine": "hnswlib", "precision": "fp32", "n": n, "dim": dim, "M": m,
                               "ef_construction": ef_construction, "threads": threads, "loadavg_before": lb,
                               "build_s": round(built_s, 2), "loadavg_build": loadavg(), "build_progress": list(progress)}
        on_point(stamp(_hnsw_point(index, data, queries, workdir, efs, served_ef, res), t0))
        lb = loadavg()


def _hnsw_point(index: Any, data: np.ndarray, queries: np.ndarray, workdir: Path, efs: Sequence[int],
                served_ef: int, res: dict[str, Any]) -> dict[str, Any]:
    n, dim = data.shape
    truth = exact_topk(data, queries, 10)
    path = workdir / f"hnsw-{n}.bin"
    index.save_index(str(path))
    res["file_bytes"] = path.stat().st_size
    res["file_bytes_per_item"] = round(path.stat().st_size / n, 1)
    probe = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(path), str(dim), str(n)],
                           capture_output=True, text=True, check=True, timeout=600)
    loaded = json.loads(probe.stdout)
    res["load_s"] = round(loaded["load_s"], 3)
    res["rss_bytes"] = loaded["rss_delta"]
    res["rss_bytes_per_item"] = round(loaded["rss_delta"] / n, 1)
    path.unlink()
    k = truth.shape[1]
    res["by_ef"] = {}
    for ef in efs:
        index.set_ef(max(ef, k))
        labels, _ = index.knn_query(queries, k=k, num_threads=1)
        lat = latency_ms(lambda i: index.knn_query(queries[i:i + 1], k=k, num_threads=1), len(queries))
        res["by_ef"][str(ef)] = {"recall_at_10": round(recall_at_k(labels, truth, k), 4), **lat}
    index.set_ef(served_ef)
    res["served"] = {"ef": served_ef, "k": 64,
                     **latency_ms(lambda i: index.knn_query(queries[i:i + 1], k=64, num_threads=1), len(queries))}
    res["brute_force"] = latency_ms(lambda i: data @ queries[i], min(len(queries), 50), warmup=2)
    return res


# --- Milvus Lite -----------------------------------------------------------------------------------------
def milvus_available() -> str | None:
    """None when pymilvus and milvus-lite import, else the reason."""
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as e:
        return f"pymilvus / milvus-lite not installed ({e}); pip install pymilvus==3.0.2 milvus-lite==3.2.2"
    return None


@contextlib.contextmanager
def milvus_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A Milvus Lite server process on 127.0.0.1 (its data under ``workdir``); yields (uri, process)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    logf = open(workdir / "milvus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str((workdir / "data").resolve())],
                            cwd=workdir, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Milvus Lite did not start; see {workdir / 'milvus.log'}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


MILVUS_INDEXES: dict[str, tuple[dict[str, Any], Callable[[int], dict[str, Any]]]] = {
    # name: (index params, search params for the served ef / a comparable nprobe)
    "HNSW_SQ8": ({"index_type": "HNSW_SQ", "params": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"}},
                 lambda ef: {"ef": ef}),
    "IVF_SQ8": ({"index_type": "IVF_SQ8", "params": {"nlist": 1024}}, lambda ef: {"nprobe": 32}),
}


def measure_milvus(data: np.ndarray, truth: np.ndarray, queries: np.ndarray, workdir: Path, kind: str,
                   served_ef: int) -> dict[str, Any]:
    from pymilvus import DataType, MilvusClient

    n, dim = data.shape
    index_params_d, search_params = MILVUS_INDEXES[kind]
    t0 = time.monotonic()
    res: dict[str, Any] = {"engine": "milvus-lite", "index": kind, "precision": "int8 (SQ8)", "n": n, "dim": dim,
                           **index_params_d, "loadavg_before": loadavg()}
    wd = workdir / f"milvus-{kind}-{n}"
    shutil.rmtree(wd, ignore_errors=True)
    with milvus_server(wd) as (uri, proc):
        client = MilvusClient(uri=uri)
        res["server_rss_idle_bytes"] = tree_rss_bytes(proc.pid)
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
        client.create_collection("capacity", schema=schema)
        t = time.perf_counter()
        for s in range(0, n, 5000):
            e = min(n, s + 5000)
            client.insert("capacity", [{"id": i, "vec": data[i]} for i in range(s, e)])
        client.flush("capacity")
        res["insert_s"] = round(time.perf_counter() - t, 2)
        ip = client.prepare_index_params()
        ip.add_index(field_name="vec", metric_type="COSINE", **index_params_d)
        t = time.perf_counter()
        client.create_index("capacity", ip)
        client.load_collection("capacity")
        res["index_load_s"] = round(time.perf_counter() - t, 2)
        res["loadavg_build"] = loadavg()
        res["server_rss_bytes"] = tree_rss_bytes(proc.pid)
        res["server_rss_bytes_per_item"] = round((res["server_rss_bytes"] - res["server_rss_idle_bytes"]) / n, 1)
        res["disk_bytes"] = dir_bytes(wd)
        res["disk_bytes_per_item"] = round(res["disk_bytes"] / n, 1)
        k = truth.shape[1]
        sp = {"metric_type": "COSINE", "params": search_params(served_ef)}
        res["search_params"] = sp["params"]

        def search(i: int) -> list[int]:
            hits = client.search("capacity", data=[queries[i].tolist()], anns_field="vec", limit=k, search_params=sp)
            return [h["id"] for h in hits[0]]

        res["query"] = latency_ms(search, len(queries))
        found = [search(i) for i in range(len(queries))]
        res["recall_at_10"] = round(recall_at_k(found, truth, k), 4)
        client.close()
    shutil.rmtree(wd, ignore_errors=True)
    return stamp(res, t0)


# --- event stores ---------------------------------------------------------------------------------------
def event_rows(n: int, users: int, items: int, seed: int = 0) -> list[tuple[str, str, int, int]]:
    """``n`` synthetic events (user_id, item_id, type, ts_ms); user activity Zipf-like (a few heavy users)."""
    rng = np.random.default_rng([seed, 0xE7])
    w = 1.0 / np.arange(1, users + 1) ** 0.8
    u = rng.choice(users, size=n, p=w / w.sum())
    it = rng.integers(0, items, size=n)
    ty = rng.integers(1, 4, size=n)
    ts = 1_780_000_000_000 + np.arange(n) * 50
    return [(f"u{a}", f"i{b}", int(c), int(d)) for a, b, c, d in zip(u, it, ty, ts, strict=True)]


def history_users(rows: Sequence[tuple[str, str, int, int]], lo: int = 20, hi: int = 200) -> list[str]:
    """Users with ``lo``..``hi`` rows (the history reads are measured on them)."""
    users, counts = np.unique([r[0] for r in rows], return_counts=True)
    return [str(x) for x in users[(counts >= lo) & (counts <= hi)]]


def _history_reads(res: dict[str, Any], rows: Sequence[tuple[str, str, int, int]], read: Callable[[str], Any],
                   reads: int) -> None:
    """The history read's latency for users with 20-200 rows, and for the heaviest user."""
    users = history_users(rows)
    res["history_users"] = len(users)
    res["history_read"] = latency_ms(lambda i: read(users[i % len(users)]), reads)
    names, counts = np.unique([r[0] for r in rows], return_counts=True)
    heavy = str(names[counts.argmax()])
    res["history_read_heaviest"] = {"rows": int(counts.max()), **latency_ms(lambda i: read(heavy), min(reads, 200))}


def _rows_summary(rows: Sequence[tuple[str, str, int, int]]) -> dict[str, Any]:
    _, counts = np.unique([r[0] for r in rows], return_counts=True)
    return {"events": len(rows), "users": int(len(counts)), "rows_per_user_mean": round(float(counts.mean()), 1),
            "rows_per_user_p50": float(np.percentile(counts, 50)), "rows_per_user_max": int(counts.max())}


def _write_batches(commit_batch: Callable[[list], None], rows: list, batch: int) -> dict[str, Any]:
    """Writes ``rows`` as transactions of ``batch`` events, each acknowledged after its COMMIT returned."""
    t = time.perf_counter()
    for s in range(0, len(rows), batch):
        commit_batch(rows[s:s + batch])
    dt = time.perf_counter() - t
    return {"batch": batch, "events": len(rows), "events_per_s": round(len(rows) / dt, 1),
            "commits_per_s": round(math.ceil(len(rows) / batch) / dt, 1), "loadavg": loadavg()}


HISTORY_SQL = ("SELECT item_id FROM events WHERE user_id = {p} GROUP BY item_id "
               "ORDER BY MAX(ts_ms) DESC, MAX(id) DESC LIMIT 20")  # the server's history read (events.py)


def measure_sqlite(rows: list, batches: Sequence[int], workdir: Path, reads: int) -> dict[str, Any]:
    try:
        from bundlerec_server.events import SCHEMA
    except ImportError:
        SCHEMA = None  # noqa: N806
    t0 = time.monotonic()
    path = workdir / "events.sqlite"
    for p in workdir.glob("events.sqlite*"):
        p.unlink()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA or _PG_SCHEMA.replace("BIGSERIAL", "INTEGER").replace("BIGINT", "INTEGER"))
    sql = "INSERT INTO events (user_id, item_id, type, ts_ms, received_ms) VALUES (?, ?, ?, ?, ?)"

    def commit(chunk: list) -> None:
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, [(*r, now) for r in chunk])
        conn.execute("COMMIT")

    res: dict[str, Any] = {"engine": "sqlite", "settings": "WAL, synchronous=FULL", "schema": "server" if SCHEMA else "fallback",
                           "loadavg_before": loadavg(), **_rows_summary(rows)}
    res["writes"] = _write_batches_split(commit, rows, batches)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(p.stat().st_size for p in workdir.glob("events.sqlite*"))
    res["bytes_per_row"] = round(size / len(rows), 1)
    q = HISTORY_SQL.format(p="?")
    _history_reads(res, rows, lambda user: conn.execute(q, (user,)).fetchall(), reads)
    conn.close()
    return stamp(res, t0)


def _write_batches_split(commit: Callable[[list], None], rows: list, batches: Sequence[int]) -> list[dict[str, Any]]:
    """All rows get written once: an equal share for each batch size."""
    share = len(rows) // len(batches)
    return [_write_batches(commit, rows[i * share:(i + 1) * share], b) for i, b in enumerate(batches)]


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    type SMALLINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts_ms DESC, id DESC);
"""


def find_pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists():
            return d
    return None


@contextlib.contextmanager
def temp_postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (data and unix socket in a fresh folder of the system
    temp dir, which the ``postgres`` user can reach when we run as root); yields its DSN."""
    pg = find_pg_bin()
    if pg is None:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    base = Path(tempfile.mkdtemp(prefix="capacity-pg-"))
    port = free_port()
    as_root = os.geteuid() == 0

    def run(cmd: str) -> None:
        r = subprocess.run(["su", "postgres", "-c", cmd] if as_root else ["bash", "-c", cmd], capture_output=True,
                           text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{cmd.split()[0]} failed ({r.returncode}): {(r.stderr or r.stdout)[-400:]}")

    if as_root:
        shutil.chown(base, "postgres")
    data = base / "data"
    try:
        run(f"{pg}/initdb -D {data} -A trust -U postgres")
        run(f"{pg}/pg_ctl -D {data} -l {base}/pg.log -o '-p {port} -k {base} -c listen_addresses=127.0.0.1' -w start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run(f"{pg}/pg_ctl -D {data} -m fast -w stop")
        shutil.rmtree(base, ignore_errors=True)


def measure_postgres(rows: list, batches: Sequence[int], dsn: str, reads: int, writers: int = 8) -> dict[str, Any]:
    import psycopg

    t0 = time.monotonic()
    res: dict[str, Any] = {"engine": "postgresql", "settings": "synchronous_commit=on (default)",
                           "loadavg_before": loadavg(), **_rows_summary(rows)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        res["server_version"] = conn.info.server_version
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(_PG_SCHEMA)
        sql = "INSERT INTO events (user_id, item_id, type, ts_ms, received_ms) VALUES (%s, %s, %s, %s, %s)"

        def commit(chunk: list) -> None:
            now = int(time.time() * 1000)
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, [(*r, now) for r in chunk])

        res["writes"] = _write_batches_split(commit, rows, batches)
        conn.execute("VACUUM ANALYZE events")
        res["bytes_per_row"] = round(conn.execute("SELECT pg_total_relation_size('events')").fetchone()[0] / len(rows), 1)
        q = HISTORY_SQL.format(p="%s")
        _history_reads(res, rows, lambda user: conn.execute(q, (user,)).fetchall(), reads)
    if writers > 1:
        res["writes_concurrent"] = _write_concurrent(dsn, sql, rows, batches[-1] if len(batches) < 2 else batches[1], writers)
    return stamp(res, t0)


def _write_concurrent(dsn: str, sql: str, rows: list, batch: int, writers: int) -> dict[str, Any]:
    """``writers`` connections committing ``batch``-event transactions at once (group commit at work)."""
    import threading

    import psycopg

    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(writers)]
    share = [rows[i::writers] for i in range(writers)]

    def work(conn: Any, mine: list) -> None:
        for s in range(0, len(mine), batch):
            now = int(time.time() * 1000)
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, [(*r, now) for r in mine[s:s + batch]])

    threads = [threading.Thread(target=work, args=(c, m)) for c, m in zip(conns, share, strict=True)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    for c in conns:
        c.close()
    return {"writers": writers, "batch": batch, "events": len(rows), "events_per_s": round(len(rows) / dt, 1),
            "commits_per_s": round(sum(math.ceil(len(m) / batch) for m in share) / dt, 1), "loadavg": loadavg()}


# --- extrapolation --------------------------------------------------------------------------------------
def fit_linear(ns: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of y = slope * n + intercept; one point: through the origin."""
    if len(ns) == 1:
        return ys[0] / ns[0], 0.0
    slope, intercept = np.polyfit(np.asarray(ns, float), np.asarray(ys, float), 1)
    return float(slope), float(max(intercept, 0.0))


def extrapolate(points: Sequence[dict[str, float]], targets: Sequence[int]) -> list[dict[str, float]]:
    """Memory, build time and query latency at ``targets`` items from measured ``points``.

    Each point has ``n``, ``bytes`` (resident index bytes), ``build_s``, ``p50_ms``, ``p99_ms``. Models:
    memory = per-item bytes × N + overhead (least squares, intercept ≥ 0); build time ∝ N·log N (scaled
    from the largest point); query latency = a + b·ln N (fit on the points; one point: ∝ ln N)."""
    pts = sorted(points, key=lambda p: p["n"])
    ns = [p["n"] for p in pts]
    per_item, overhead = fit_linear(ns, [p["bytes"] for p in pts])
    last = pts[-1]
    out = []
    for n in targets:
        row = {"n": int(n), "bytes": per_item * n + overhead,
               "build_s": last["build_s"] * (n * math.log(n)) / (last["n"] * math.log(last["n"]))}
        for key in ("p50_ms", "p99_ms"):
            if len(pts) == 1:
                row[key] = last[key] * math.log(n) / math.log(last["n"])
            else:
                b, a = np.polyfit(np.log(ns), [p[key] for p in pts], 1)
                row[key] = float(a + max(b, 0.0) * math.log(n))
        out.append(row)
    return out


def max_items(bytes_per_item: float, overhead: float, ram_gib: float, usable: float = NODE_USABLE,
              fixed_gib: float = NODE_FIXED_GIB, copies: int = RELOAD_COPIES) -> int:
    """Largest catalog whose index (``copies`` of it at once, for a hot reload) fits a ``ram_gib`` node."""
    budget = ram_gib * GIB * usable - fixed_gib * GIB
    return max(0, int((budget / copies - overhead) / bytes_per_item))


def sq8_bytes_per_item(fp32_bytes_per_item: float, dim: int) -> float:
    """The same graph with 1-byte instead of 4-byte components (HNSW_SQ8 without a raw-vector refine copy)."""
    return fp32_bytes_per_item - 3 * dim


def event_plan(pg: dict[str, Any] | None, sqlite: dict[str, Any] | None, events_per_day: float) -> dict[str, Any]:
    """Storage per year at ``events_per_day`` and the headroom of one writer, from the measured stores."""
    plan: dict[str, Any] = {"events_per_day": events_per_day, "mean_events_per_s": round(events_per_day / 86400, 1),
                            "peak_factor": 10}
    for name, r in (("postgresql", pg), ("sqlite", sqlite)):
        if not r or "writes" not in r:
            continue
        best = max(w["events_per_s"] for w in [*r["writes"], *([r["writes_concurrent"]] if "writes_concurrent" in r else [])])
        single = min(w["events_per_s"] for w in r["writes"])
        plan[name] = {"bytes_per_row": r["bytes_per_row"], "gib_per_year": round(r["bytes_per_row"] * events_per_day * 365 / GIB, 1),
                      "max_events_per_s": best, "max_events_per_s_smallest_batch": single,
                      "peak_headroom": round(best / (plan["mean_events_per_s"] * plan["peak_factor"]), 2)}
    return plan


def plan(results: dict[str, Any], targets: Sequence[int], events_per_day: float) -> dict[str, Any]:
    """The extrapolation tables and the one-machine limits from the measured parts."""
    out: dict[str, Any] = {"targets": list(targets), "assumptions": {
        "memory": "resident bytes = per-item bytes x N + overhead (fit on the measured points)",
        "build": "build time grows as N log N, same threads (2); divide by threads/2 on a bigger node",
        "query": "single-query latency grows as a + b ln N (HNSW hops grow with log N), same ef",
        "node": f"index may use {NODE_USABLE:.0%} of RAM minus {NODE_FIXED_GIB:g} GiB for the rest of the server, "
                f"and {RELOAD_COPIES} copies are resident during a hot reload",
        "sq8": "SQ8 keeps the same graph and stores 1 byte instead of 4 per component (no fp32 refine copy)"}}
    hn = [r for r in results.get("hnsw", []) if "build_s" in r]
    if hn:
        dim = hn[0]["dim"]
        pts = [{"n": r["n"], "bytes": r["rss_bytes"], "build_s": r["build_s"],
                "p50_ms": r["served"]["p50_ms"], "p99_ms": r["served"]["p99_ms"]} for r in hn]
        per_item, overhead = fit_linear([p["n"] for p in pts], [p["bytes"] for p in pts])
        sq8 = sq8_bytes_per_item(per_item, dim)
        rows = extrapolate(pts, targets)
        for row in rows:
            row["sq8_bytes"] = sq8 * row["n"] + overhead
        out["hnsw"] = {"bytes_per_item_fp32": round(per_item, 1), "bytes_per_item_sq8_estimate": round(sq8, 1),
                       "overhead_bytes": round(overhead), "rows": rows,
                       "one_node_max_items": {f"{g}GiB": {
                           "fp32": max_items(per_item, overhead, g), "sq8": max_items(sq8, overhead, g),
                           "fp32_one_copy": max_items(per_item, overhead, g, copies=1),
                           "sq8_one_copy": max_items(sq8, overhead, g, copies=1)} for g in NODE_RAM_GIB}}
    out["events"] = event_plan(results.get("events", {}).get("postgres"), results.get("events", {}).get("sqlite"), events_per_day)
    return out


# --- tables -------------------------------------------------------------------------------------------------
def _n(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _la(r: dict[str, Any], key: str = "loadavg_build") -> str:
    return f"{r.get(key, r.get('loadavg_after', [float('nan')]))[0]:.1f}"


def tables(results: dict[str, Any]) -> str:
    """The measured and extrapolated figures as Markdown tables (for docs/scaling.md and the README)."""
    out = ["| index | items | build / insert+index s | resident bytes/item | file or disk bytes/item | load s | "
           "p50 / p99 ms | recall@10 | load1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("hnsw", []):
        if "build_s" not in r:
            continue
        ef = str(r["served"]["ef"])
        out.append(f"| hnswlib fp32, ef {ef} (k 10 / served k 64) | {_n(r['n'])} | {r['build_s']:.0f} | {r['rss_bytes_per_item']:.0f} | "
                   f"{r['file_bytes_per_item']:.0f} | {r['load_s']:.2f} | {r['by_ef'][ef]['p50_ms']:.2f} / {r['by_ef'][ef]['p99_ms']:.2f} "
                   f"({r['served']['p50_ms']:.2f} / {r['served']['p99_ms']:.2f}) | {r['by_ef'][ef]['recall_at_10']:.3f} | {_la(r)} |")
    for r in results.get("milvus", []):
        if "query" not in r:
            out.append(f"| Milvus Lite {r.get('index')} | {_n(r.get('n', 0))} | not measured: {r.get('skipped') or r.get('error')} |||||||")
            continue
        out.append(f"| Milvus Lite {r['index']} {r['search_params']} | {_n(r['n'])} | {r['insert_s']:.0f} + {r['index_load_s']:.0f} | "
                   f"{r['server_rss_bytes_per_item']:.0f} (server RSS growth) | {r['disk_bytes_per_item']:.0f} | – | "
                   f"{r['query']['p50_ms']:.2f} / {r['query']['p99_ms']:.2f} (gRPC) | {r['recall_at_10']:.3f} | {_la(r)} |")
    ev = results.get("events", {})
    if ev:
        out += ["", "| event store | events/s by batch size (1 writer) | concurrent writers | bytes/row | "
                "history read p50 / p99 ms (20-200 rows) | heaviest user | load1 |", "|---|---|---|---|---|---|---|"]
        for name, r in ev.items():
            if "writes" not in r:
                out.append(f"| {name} | not measured: {r.get('skipped') or r.get('error')} ||||||")
                continue
            w = ", ".join(f"{x['batch']}: {x['events_per_s']:.0f}" for x in r["writes"])
            c = r.get("writes_concurrent")
            cc = f"{c['writers']} × batch {c['batch']}: {c['events_per_s']:.0f}" if c else "–"
            h = r["history_read"]
            hv = r.get("history_read_heaviest")
            hvs = f"{hv['rows']} rows: {hv['p50_ms']:.2f} / {hv['p99_ms']:.2f}" if hv else "–"
            out.append(f"| {name} ({r['settings']}) | {w} | {cc} | {r['bytes_per_row']:.0f} | {h['p50_ms']:.2f} / {h['p99_ms']:.2f} | "
                       f"{hvs} | {r['writes'][-1]['loadavg'][0]:.1f} |")
    pl = results.get("plan", {}).get("hnsw")
    if pl:
        out += ["", f"Extrapolation (fp32 {pl['bytes_per_item_fp32']:.0f} B/item measured, SQ8 {pl['bytes_per_item_sq8_estimate']:.0f} "
                "B/item estimated; build at 2 threads):", "",
                "| items | fp32 index GiB | SQ8 index GiB | build (2 threads) | p50 / p99 ms |", "|---|---|---|---|---|"]
        for r in pl["rows"]:
            out.append(f"| {_n(r['n'])} | {r['bytes'] / GIB:.1f} | {r['sq8_bytes'] / GIB:.1f} | {r['build_s'] / 3600:.1f} h | "
                       f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} |")
        out += ["", "| node RAM | most items, fp32 (2 copies: in-process reload / 1 copy: rolling reload) | most items, SQ8 |",
                "|---|---|---|"]
        for g, v in pl["one_node_max_items"].items():
            out.append(f"| {g} | {_n(v['fp32'])} / {_n(v['fp32_one_copy'])} | {_n(v['sq8'])} / {_n(v['sq8_one_copy'])} |")
    epl = results.get("plan", {}).get("events", {})
    for name in ("postgresql", "sqlite"):
        if name in epl:
            e = epl[name]
            out.append(f"\n{name}: {e['gib_per_year']} GiB a year at {epl['events_per_day']:.0e} events/day "
                       f"(mean {epl['mean_events_per_s']}/s); best measured {e['max_events_per_s']:.0f} events/s = "
                       f"{e['peak_headroom']}x a {epl['peak_factor']}x peak.")
    return "\n".join(out) + "\n"


def _colour(r: dict[str, Any]) -> str:
    return "C2" if r["index"].startswith("HNSW") else "C4"


def loads(tree: Any) -> list[float]:
    """Every 1-minute load average recorded anywhere in ``tree`` (keys starting with "loadavg")."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in ([v[0]] if k.startswith("loadavg") and isinstance(v, list) else loads(v))]
    if isinstance(tree, list):
        return [x for v in tree for x in loads(v)]
    return []


# --- plot -------------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_q) = plt.subplots(1, 2, figsize=(12, 4.6))
    hn = [r for r in results.get("hnsw", []) if "build_s" in r]
    ext = results.get("plan", {}).get("hnsw")
    if hn and ext:
        ns = [r["n"] for r in hn]
        xs = np.logspace(math.log10(min(ns)), math.log10(max(r["n"] for r in ext["rows"])), 40)
        per, ov, sq8 = ext["bytes_per_item_fp32"], ext["overhead_bytes"], ext["bytes_per_item_sq8_estimate"]
        ax_m.plot(ns, [r["rss_bytes"] / GIB for r in hn], "o", color="C0", label="hnswlib fp32, measured RSS")
        ax_m.plot(xs, (per * xs + ov) / GIB, "-", color="C0", alpha=0.6, label="fp32 extrapolated")
        ax_m.plot(xs, (sq8 * xs + ov) / GIB, "--", color="C1", alpha=0.8, label="SQ8 (same graph, int8 codes) estimate")
        for g, ls in zip(NODE_RAM_GIB, (":", "-."), strict=True):
            budget = (g * NODE_USABLE - NODE_FIXED_GIB) / RELOAD_COPIES
            ax_m.axhline(budget, color="grey", ls=ls, lw=1, label=f"{g} GiB node: index budget (2 copies)")
        mil = [r for r in results.get("milvus", []) if "server_rss_bytes" in r]
        for r in mil:
            ax_m.plot([r["n"]], [max(r["server_rss_bytes"] - r["server_rss_idle_bytes"], 0) / GIB], "s", color=_colour(r),
                      label=f"Milvus Lite {r['index']} server RSS growth")
        ax_q.plot(ns, [r["served"]["p50_ms"] for r in hn], "o", color="C0", label="hnswlib p50 (ef 64, k 64)")
        ax_q.plot(ns, [r["served"]["p99_ms"] for r in hn], "^", color="C3", label="hnswlib p99")
        en = [r["n"] for r in ext["rows"]]
        ax_q.plot([max(ns), *en], [hn[-1]["served"]["p50_ms"], *[r["p50_ms"] for r in ext["rows"]]], "-", color="C0", alpha=0.6)
        ax_q.plot([max(ns), *en], [hn[-1]["served"]["p99_ms"], *[r["p99_ms"] for r in ext["rows"]]], "-", color="C3", alpha=0.6)
        for r in mil:
            ax_q.plot([r["n"]], [r["query"]["p50_ms"]], "s", color=_colour(r), label=f"Milvus Lite {r['index']} p50 (gRPC round trip)")
    for ax in (ax_m, ax_q):
        ax.set_xscale("log")
        ax.set_xlabel("items in the catalog")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("resident index memory (GiB)")
    ax_q.set_yscale("log")
    ax_q.set_ylabel("single-query latency (ms), 1 thread")
    la = loads(results)
    fig.suptitle(f"bundlerec capacity: 384-d vectors, M16 efC200; measured points + extrapolation "
                 f"({results.get('machine', {}).get('cpus')} shared cores, load {min(la, default=0):.0f}-{max(la, default=0):.0f}: "
                 "times are upper bounds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ------------------------------------------------------------------------------------------------
def _cached(parts_dir: Path, name: str, reuse: bool, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = parts_dir / f"{name}.json"
    if reuse and path.exists():
        log(f"{name}: cached {path}")
        return json.loads(path.read_text())
    log(f"{name}: measuring")
    try:
        res = fn()
    except Exception as e:  # a part that cannot run is recorded, not fatal
        log(f"{name}: FAILED {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    parts_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = set(args.parts.split(","))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    parts_dir = args.out / "parts"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))  # per run: runs may overlap on one --out
    dflt = export_defaults()
    served_ef = args.ef or dflt["ef_search"]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
                    "note": "cores shared with other jobs: times are upper bounds, rates lower bounds"},
        "config": {"sizes": sizes, "dim": args.dim, "centres": args.centres, "noise": args.noise, "seed": args.seed,
                   "queries": args.queries, "export_defaults": dflt, "served_ef": served_ef, "threads": args.threads},
        "hnsw": [], "milvus": [], "events": {},
    }
    queries = synthetic(args.queries, args.dim, args.centres, args.seed, args.noise, stream=1)
    def vectors(start: int, n: int) -> np.ndarray:
        return synthetic(n, args.dim, args.centres, args.seed, args.noise, start=start)

    if "hnsw" in parts:
        cached = {n: parts_dir / f"hnsw-{n}.json" for n in sizes}
        if args.reuse and all(p.exists() for p in cached.values()):
            results["hnsw"] = [json.loads(p.read_text()) for p in cached.values()]
        else:
            def keep(res: dict[str, Any]) -> None:
                parts_dir.mkdir(parents=True, exist_ok=True)
                cached[res["n"]].write_text(json.dumps(res, indent=1))
                results["hnsw"].append(res)

            grow_hnsw(sizes, vectors, queries, work, dflt["M"], dflt["ef_construction"], sorted({*DEFAULT_EFS, served_ef}),
                      served_ef, args.threads, keep)
    for n in [s for s in sizes if s <= args.milvus_max] if "milvus" in parts else []:
        why = milvus_available()
        data = vectors(0, n)
        truth = exact_topk(data, queries, 10)
        for kind in args.milvus_indexes.split(","):
            if why:
                results["milvus"].append({"index": kind, "n": n, "skipped": why})
                continue
            results["milvus"].append(_cached(parts_dir, f"milvus-{kind}-{n}", args.reuse, lambda kind=kind, data=data, truth=truth: measure_milvus(data, truth, queries, work, kind, served_ef)))
    if "events" in parts:
        rows = event_rows(args.events, args.event_users, 50_000, args.seed)
        batches = [int(b) for b in args.event_batches.split(",")]
        results["events"]["sqlite"] = _cached(parts_dir, f"events-sqlite-{args.events}", args.reuse,
                                              lambda: measure_sqlite(rows, batches, work, args.reads))

        def pg() -> dict[str, Any]:
            if args.pg_dsn:
                return measure_postgres(rows, batches, args.pg_dsn, args.reads, args.pg_writers)
            if find_pg_bin() is None:
                return {"skipped": "no PostgreSQL binaries under /usr/lib/postgresql/*/bin and no --pg-dsn"}
            with temp_postgres() as dsn:
                return measure_postgres(rows, batches, dsn, args.reads, args.pg_writers)

        results["events"]["postgres"] = _cached(parts_dir, f"events-postgres-{args.events}", args.reuse, pg)
    results["plan"] = plan(results, [int(t) for t in args.targets.split(",")], args.events_per_day)
    results["machine"]["loadavg_end"] = loadavg()
    shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="catalog sizes to measure (comma-separated)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--centres", type=int, default=2000, help="mixture components of the synthetic catalog")
    p.add_argument("--noise", type=float, default=0.75, help="noise norm around a centre (0.75: same-cluster cosine ~0.64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="hnswlib build threads")
    p.add_argument("--ef", type=int, default=0, help="served ef (0: the export's floor)")
    p.add_argument("--parts", default="hnsw,milvus,events")
    p.add_argument("--milvus-indexes", default="HNSW_SQ8,IVF_SQ8")
    p.add_argument("--milvus-max", type=int, default=100_000, help="largest size measured in Milvus Lite")
    p.add_argument("--events", type=int, default=60_000, help="events written to each store")
    p.add_argument("--event-users", type=int, default=2_000)
    p.add_argument("--event-batches", default="1,10,100", help="events per transaction")
    p.add_argument("--reads", type=int, default=1000, help="history reads timed")
    p.add_argument("--pg-writers", type=int, default=8, help="concurrent connections in the PostgreSQL group-commit run")
    p.add_argument("--pg-dsn", default="", help="an existing PostgreSQL (default: a temporary cluster on 127.0.0.1)")
    p.add_argument("--targets", default="10000000,100000000", help="extrapolation sizes")
    p.add_argument("--events-per-day", type=float, default=10_000_000)
    p.add_argument("--out", type=Path, default=Path("runs/capacity"))
    p.add_argument("--json", type=Path, help="default: <out>/capacity.json")
    p.add_argument("--plot", type=Path, help="default: <out>/capacity.png")
    p.add_argument("--reuse", action="store_true", help="take cached parts from <out>/parts")
    args = p.parse_args(argv)
    results = run(args)
    json_path = args.json or args.out / "capacity.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, args.plot or args.out / "capacity.png")
    (args.out / "capacity.md").write_text(tables(results))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""History-read latency of the event stores under load: concurrent readers (``recent_items``, what every
personalised Recommend awaits) and writers (RecordEvents-sized ``append`` batches) on one event loop, as in
the server, for a few seconds per store.

    python -m benchmarks.events_bench --out runs/events_bench            # starts a throwaway PostgreSQL
    python -m benchmarks.events_bench --pg-dsn postgresql://u@host/db    # or yours (needs CREATEDB: it makes
                                                                         # and drops events_bench_r<N> databases)

Stores: PostgreSQL (shared by replicas, every read a query), SQLite read from the file (``--shared-events``,
several workers on one machine) and SQLite's in-process memory (one process). Prints p50/p99 and writes
``events_bench.json`` and ``events_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bundlerec_server.events import EventRecord, open_event_store

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pg.sh"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {"n": int(ms.size), **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}, "max": float(ms.max())}


async def measure(name: str, spec: str, args: argparse.Namespace, shared: bool = False) -> dict:
    store = open_event_store(spec, recent_per_user=20, shared=shared)
    await store.start()
    rng = random.Random(7)
    users = [f"user-{u}" for u in range(args.users)]
    now = int(time.time() * 1000)
    preload = [EventRecord(u, f"item-{rng.randrange(args.items)}", 1, now - rng.randrange(10**7))
               for u in users for _ in range(args.events_per_user)]
    for i in range(0, len(preload), 5000):
        await store.append(preload[i:i + 5000])
    reads: list[float] = []
    writes: list[float] = []
    end = time.perf_counter() + args.seconds

    async def reader() -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await store.recent_items(rng.choice(users))
            reads.append(time.perf_counter() - t0)
            await asyncio.sleep(0)  # let the others in even when a read never suspends (memory)

    async def writer() -> None:
        while time.perf_counter() < end:
            batch = [EventRecord(rng.choice(users), f"item-{rng.randrange(args.items)}", 2, int(time.time() * 1000))
                     for _ in range(args.batch)]
            t0 = time.perf_counter()
            await store.append(batch)
            writes.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(args.readers)), *(writer() for _ in range(args.writers)))
    took = time.perf_counter() - t0
    await store.close()
    result = {
        "store": name, "seconds": took, "preloaded_events": len(preload),
        "read_ms": percentiles(reads), "reads_per_s": len(reads) / took,
        "write_ms": percentiles(writes), "events_written_per_s": len(writes) * args.batch / took,
    }
    r = result["read_ms"]
    print(f"{args.readers:3d} readers {name:26s} history read p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  ({result['reads_per_s']:.0f} reads/s); "
          f"append p50 {result['write_ms']['p50']:.2f} ms p99 {result['write_ms']['p99']:.2f} ms "
          f"({result['events_written_per_s']:.0f} events/s)")
    return result


def start_postgres(root: Path) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(["bash", str(SCRIPT), "start", str(root), str(port)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"could not start PostgreSQL with scripts/pg.sh (give --pg-dsn): {done.stderr.strip()}")
    return subprocess.run(["bash", str(SCRIPT), "dsn", str(root)], check=True, capture_output=True, text=True).stdout.strip()


def fresh_database(dsn: str, name: str) -> str:
    """An empty database ``name`` (dropped first if it exists) on the server of ``dsn``; its URL."""
    from urllib.parse import urlsplit

    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return urlsplit(dsn)._replace(path="/" + name).geturl()


def plot(results: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, store in enumerate(dict.fromkeys(r["store"] for r in results)):
        rows = [r for r in results if r["store"] == store]
        x = [r["readers"] for r in rows]
        for q, style in (("p50", "-"), ("p99", "--")):
            y = [r["read_ms"][q] for r in rows]
            ax.plot(x, y, style, marker="o", color=f"C{i}", label=f"{store} {q}")
            for xi, yi in zip(x, y):
                ax.annotate(f"{yi:.3g}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["readers"] for r in results}), [str(n) for n in sorted({r["readers"] for r in results})])
    ax.set_yscale("log")
    ax.set_xlabel("concurrent history readers (one event loop)")
    ax.set_ylabel("history read latency (ms, log scale)")
    ax.set_title(f"recent_items under load, {args.writers} writers x {args.batch} events beside the readers; "
                 f"{args.users} users x {args.events_per_user} events preloaded", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main_async(args: argparse.Namespace, tmp: Path) -> list[dict]:
    dsn = args.pg_dsn or start_postgres(tmp.with_name(tmp.name + "-pg"))  # not below tmp: 0700, root's
    results = []
    for readers in args.readers:
        run = argparse.Namespace(**{**vars(args), "readers": readers})
        tag = f"r{readers}"
        for name, spec, shared in (("postgresql", fresh_database(dsn, f"events_bench_{tag}"), False), ("sqlite (read from file)", str(tmp / f"shared-{tag}.sqlite3"), True),
                                   ("sqlite (in-process memory)", str(tmp / f"memory-{tag}.sqlite3"), False)):
            results.append({"readers": readers, **await measure(name, spec, run, shared=shared)})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-dsn", default="", help="PostgreSQL URL (default: start a throwaway server with scripts/pg.sh)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--readers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                   help="concurrent readers, one run per value (comma list)")
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--batch", type=int, default=5, help="events per append (one RecordEvents call)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--events-per-user", type=int, default=40)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("runs/events_bench"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bundlerec-events-bench-"))
    try:
        results = asyncio.run(main_async(args, tmp))
    finally:
        pg = tmp.with_name(tmp.name + "-pg")
        if pg.exists():
            subprocess.run(["bash", str(SCRIPT), "stop", str(pg)], capture_output=True)
            shutil.rmtree(pg, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_dsn"}
    (args.out / "events_bench.json").write_text(json.dumps({"config": config, "results": results}, indent=2))
    plot(results, args.out / "events_bench.png", args)
    print(f"wrote {args.out / 'events_bench.json'} and {args.out / 'events_bench.png'}")


if __name__ == "__main__":
    main()

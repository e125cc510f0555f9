"""Interleaved A/B of two server code trees on one artifact (issue 13: before/after the hop changes).

    python -m benchmarks.ab --before /work/main --after . --rounds 3 --rates 100,400 --duration 20 \
        --generator python,h2load --json runs/ab/ab.json

Each round starts the "before" server (``PYTHONPATH`` = that tree's server/export/client packages), runs every
rate with every generator (all-unique queries for the Python harness; cache off), stops it, then does the same
with the "after" tree, alternating which goes first. Every record carries the load average; the summary prints
the median of each figure per (tree, generator, rate). On a shared machine only figures from the same run
compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import h2load
from benchmarks.load import load_queries, run_rate
from benchmarks.procs import ServerProcess, free_port


def pythonpath(tree: Path) -> str:
    tree = tree.resolve()
    return os.pathsep.join(str(tree / p) for p in ("server", "export", "client", "."))


def one_round(name: str, tree: Path, extra: list[str], args: argparse.Namespace, queries: list[str],
              log_dir: Path) -> list[dict[str, Any]]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    metrics_port = free_port()
    argv = [sys.executable, "-m", "bundlerec_server", "--artifact", args.artifact, "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--query-cache-size", "0", *args.server_arg, *extra]
    out = []
    with ServerProcess(argv, log_dir / f"{name}.log", target=target, name=name,
                       env={"PYTHONPATH": pythonpath(tree)}) as server:
        server.wait_serving(120)
        assert server.proc is not None
        pid, murl = server.proc.pid, f"http://127.0.0.1:{metrics_port}/"
        run_rate(target, 10, 2, queries, seed=999, query_mix="unique")  # warm-up, discarded
        for rate in args.rates:
            for gen in args.generator:
                if gen == "python":
                    r = run_rate(target, rate, args.duration, queries, server_pid=pid, metrics_url=murl,
                                 query_mix="unique", seed=int(time.time()) % 1000)
                else:
                    r = h2load.run(target, rate, args.duration, server_pid=pid, metrics_url=murl)
                r.update(tree=name, rate=rate, gen=gen, finished_at=time.time(), loadavg_after=list(os.getloadavg()))
                cpu = r.get("cpu") or {}
                first = (r.get("ttfb_ms") or {})
                print(f"{name:>6} {gen:>6} {rate:>4g} rps  srv CPU {cpu.get('server_ms_per_call', float('nan')):.2f} ms/call  "
                      f"first p50/p99 {first.get('p50') or float('nan'):.1f}/{first.get('p99') or float('nan'):.1f}  "
                      f"full p50/p99 {r['full_ms']['p50'] or float('nan'):.1f}/{r['full_ms']['p99'] or float('nan'):.1f} ms  "
                      f"err {r['error_rate']:.2%}  load {r['loadavg_before'][0]:.2f}->{r['loadavg_after'][0]:.2f}", flush=True)
                out.append(r)
    return out


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["gen"], r["rate"], r["tree"]) for r in records})
    for gen, rate, tree in keys:
        rs = [r for r in records if (r["gen"], r["rate"], r["tree"]) == (gen, rate, tree)]

        def med(get: Any, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [v for v in (get(r) for r in rs) if v is not None]
            return statistics.median(vals) if vals else None

        rows.append({
            "gen": gen, "rate": rate, "tree": tree, "runs": len(rs),
            "server_cpu_ms_per_call": [r["cpu"]["server_ms_per_call"] for r in rs],
            "server_cpu_median": med(lambda r: r["cpu"]["server_ms_per_call"]),
            "first_p50": med(lambda r: (r.get("ttfb_ms") or {}).get("p50")),
            "first_p99": med(lambda r: (r.get("ttfb_ms") or {}).get("p99")),
            "full_p50": med(lambda r: r["full_ms"]["p50"]),
            "full_p99": med(lambda r: r["full_ms"]["p99"]),
            "error_rate": med(lambda r: r["error_rate"]),
            "loadavg_1m": [r["loadavg_before"][0] for r in rs],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="code tree of the 'before' server (a checkout)")
    p.add_argument("--after", type=Path, default=Path("."))
    p.add_argument("--artifact", default="artifacts/demo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100.0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--generator", type=lambda s: s.split(","), default=["python", "h2load"])
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag for every variant (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=TREE[ SERVER FLAGS...] (repeatable): run these instead of --before/--after")
    p.add_argument("--json", type=Path, default=Path("runs/ab/ab.json"))
    args = p.parse_args(argv)
    queries = load_queries(None)
    records: list[dict[str, Any]] = []
    trees: list[tuple[str, Path, list[str]]] = [("before", args.before, []), ("after", args.after, [])]
    if args.variant:
        trees = []
        for v in args.variant:
            name, rest = v.split("=", 1)
            tree, *extra = rest.split()
            trees.append((name, Path(tree), extra))
    elif args.before is None:
        p.error("--before or --variant is required")
    for i in range(args.rounds):
        for name, tree, extra in trees if i % 2 == 0 else trees[::-1]:
            records += one_round(name, tree, extra, args, queries, args.json.parent)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"records": records, "summary": summary(records)}, indent=2) + "\n")
    for row in summary(records):
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

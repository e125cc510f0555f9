"""Standard load sweep of the naive reference server vs the real bundlerec server, in one run.

    python -m benchmarks.sweep --artifact artifacts/demo --out runs/bench

Starts each server as a subprocess on a free loopback port (reference: ``python -m
benchmarks.reference_server``; real: ``bundlerec-server --artifact DIR --port N``), waits for its
grpc.health.v1 SERVING, runs the same open-loop sweep (same seeds, queries and rates: see
benchmarks/load.py) against it, and always terminates it (SIGTERM, then SIGKILL). When the real server
cannot be found, exits early or never becomes healthy, its part is skipped with a message and the
comparison reports the reference alone. Writes ``OUT/sweep.json``, ``OUT/sweep.png`` and the servers'
logs, and prints the comparison table: highest sustainable RPS, p50/p99 TTFB and full-stream latency
at 100 RPS, and the ratio real/reference. The standard sweep takes about 3–5 minutes.

CPU per call is the first figure: every rate reports the server's CPU milliseconds per call (utime + stime of
all its threads, from /proc, over the measured window) and the load generator's own, beside the latency;
the real server runs with ``--metrics-port`` so the query cache's hit rate over each window is reported too.
``--generator python,h2load`` (the default) also drives each real server with ``h2load``
(benchmarks/h2load.py) at ``--h2load-rates`` (default: the 100 RPS comparison rate) in the same run, and
prints both generators side by side. ``--real-setting NAME=ARGS`` (repeatable) runs the real server once per setting (e.g.
``cache-off=--query-cache-size 0``). The query cache is off unless a setting turns it on, and
``--query-mix`` (uniform, zipf, unique) picks the Python harness's query stream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import h2load, load
from benchmarks.procs import ServerProcess, free_port

COMPARE_AT_RPS = 100.0
GENERATORS = ("python", "h2load")


def start_real_server(artifact: Path, out: Path, extra_args: str = "", cpus: str = "") -> tuple[ServerProcess, str]:
    """A ``bundlerec-server`` subprocess on a free loopback port (enter the returned context to start it),
    pinned to ``cpus`` (a taskset list) when given."""
    port = free_port()
    argv = [find_real_server("bundlerec-server"), "--artifact", str(artifact), "--port", str(port),
            "--host", "127.0.0.1", *extra_args.split()]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    target = f"127.0.0.1:{port}"
    return ServerProcess(argv, out / "server.log", target=target, name="real"), target


def get_info(target: str) -> dict[str, Any]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from bundlerec.v1 import bundlerec_pb2 as pb
    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    try:
        with grpc.insecure_channel(target) as ch:
            return MessageToDict(pbg.BundleRecommenderStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5))
    except grpc.RpcError as exc:
        return {"error": exc.code().name}


def find_real_server(cmd: str) -> str | None:
    if os.sep in cmd:
        return cmd if os.access(cmd, os.X_OK) else None
    venv_bin = Path(sys.executable).parent / cmd
    return str(venv_bin) if venv_bin.is_file() else shutil.which(cmd)


def run_server_sweep(name: str, argv: list[str], port: int, out: Path, args: argparse.Namespace,
                     queries: list[str], metrics_port: int = 0) -> dict[str, Any]:
    target = f"127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/" if metrics_port else None
    log = out / f"{name}.log"
    print(f"== {name}: {' '.join(argv)}", flush=True)
    t0 = time.monotonic()
    with ServerProcess(argv, log, target=target, name=name) as srv:
        try:
            load.wait_for_health(target, args.startup_timeout, alive=srv.alive)
        except (TimeoutError, RuntimeError) as exc:
            print(f"   SKIP {name}: {exc}\n   last log lines:\n{srv.log_tail()}", flush=True)
            return {"name": name, "skipped": str(exc), "log": str(log)}
        startup = time.monotonic() - t0
        info = get_info(target)
        pid = srv.proc.pid if srv.proc is not None else None
        print(f"   healthy after {startup:.1f}s (pid {pid}); {info}", flush=True)
        entry: dict[str, Any] = {"name": name, "target": target, "startup_s": startup, "info": info, "log": str(log),
                                 "argv": argv}
        if "python" in args.generator:
            entry.update(load.run_sweep(
                target, args.rates, args.duration, queries, p99_bound_ms=args.p99_bound_ms,
                must_run=[COMPARE_AT_RPS], warmup_s=args.warmup, procs=args.procs, rpc=args.rpc,
                max_bundles=args.max_bundles, items=args.items, seed=args.seed, timeout=args.timeout,
                server_pid=pid, metrics_url=metrics_url, query_mix=args.query_mix, zipf_s=args.zipf_s,
                log=lambda m: print(m, flush=True)))
        if "h2load" in args.generator and name != "reference":  # the seed design sustains 10 RPS: nothing to compare
            entry["h2load"] = run_h2load(target, args, pid, metrics_url, queries[0], out / f"{name}-h2load")
        return entry


def run_h2load(target: str, args: argparse.Namespace, pid: int | None, metrics_url: str | None, query: str,
               keep: Path) -> list[dict[str, Any]]:
    """h2load at each of ``args.h2load_rates`` against a running server (skipped with a message if missing)."""
    if h2load.find() is None:
        print("   h2load: SKIP (not installed: apt-get install nghttp2-client)", flush=True)
        return []
    results = []
    for rate in args.h2load_rates:
        try:
            res = h2load.run(target, rate, args.duration, connections=args.h2load_connections, query=query,
                             max_bundles=args.max_bundles, items=args.items, timeout=args.timeout, server_pid=pid,
                             metrics_url=metrics_url, keep=keep / f"{rate:g}")
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"   h2load at {rate:g} rps failed: {exc}", flush=True)
            continue
        print(h2load.format_row(res), flush=True)
        results.append(res)
    return results


def at_rate(entry: dict[str, Any], rps: float) -> dict[str, Any] | None:
    for r in entry.get("results", []):
        if r["offered_rps"] == rps:
            return r
    return None


def comparison(ref: dict[str, Any], real: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows of (metric, reference, real, real/reference)."""
    def metrics(e: dict[str, Any] | None) -> dict[str, float | None]:
        if not e or e.get("skipped"):
            return {}
        r = at_rate(e, COMPARE_AT_RPS)
        m: dict[str, float | None] = {"highest sustainable RPS": e.get("highest_sustainable_rps")}
        for key, label in (("ttfb_ms", "TTFB"), ("full_ms", "full stream")):
            for q in ("p50", "p99"):
                m[f"{label} {q} @{COMPARE_AT_RPS:g} RPS (ms)"] = r[key][q] if r else None
        m[f"error rate @{COMPARE_AT_RPS:g} RPS"] = r["error_rate"] if r else None
        return m

    a, b = metrics(ref), metrics(real)
    rows = []
    for key in a or b:
        va, vb = a.get(key), b.get(key)
        ratio = vb / va if (va not in (None, 0) and vb is not None) else None
        rows.append({"metric": key, "reference": va, "real": vb, "real/reference": ratio})
    return rows


def generator_rows(entries: dict[str, dict[str, Any]], rps: float = COMPARE_AT_RPS) -> list[dict[str, Any]]:
    """One row per server setting and generator at ``rps``: CPU ms per call (server, generator), the query
    cache's hit rate, latency (the Python harness's TTFB and full stream; h2load's full stream) and load."""
    rows = []
    for name, e in entries.items():
        runs = [("python", at_rate(e, rps))] + [("h2load", r) for r in e.get("h2load", []) if r["offered_rps"] == rps]
        for gen, r in runs:
            if r is None:
                continue
            c, ttfb, full = r.get("cpu") or {}, r.get("ttfb_ms") or {}, r.get("full_ms") or {}
            rows.append({"server": name, "generator": gen, "rps": rps, "achieved_rps": r.get("achieved_rps"),
                         "server_cpu_ms_per_call": c.get("server_ms_per_call"),
                         "generator_cpu_ms_per_call": c.get("generator_ms_per_call"),
                         "cache_hit_rate": (r.get("query_cache") or {}).get("hit_rate"),
                         "reply_hit_rate": (r.get("query_cache") or {}).get("reply_hit_rate"),
                         "coalesced": (r.get("query_cache") or {}).get("coalesced"),
                         "ttfb_p50_ms": ttfb.get("p50"), "ttfb_p99_ms": ttfb.get("p99"),
                         "full_p50_ms": full.get("p50"), "full_p99_ms": full.get("p99"), "full_mean_ms": full.get("mean"),
                         "error_rate": r.get("error_rate"), "loadavg_1m": (c.get("loadavg") or [None])[0]})
    return rows


def print_generator_table(rows: list[dict[str, Any]]) -> None:
    cols = [("server", "server", 16), ("generator", "gen", 7), ("server_cpu_ms_per_call", "srv cpu ms", 10),
            ("generator_cpu_ms_per_call", "gen cpu ms", 10), ("cache_hit_rate", "hits", 5),
            ("reply_hit_rate", "reply", 5), ("coalesced", "coal", 5),
            ("ttfb_p50_ms", "ttfb p50", 8), ("ttfb_p99_ms", "ttfb p99", 8), ("full_p50_ms", "full p50", 8),
            ("full_p99_ms", "full p99", 8), ("full_mean_ms", "full mean", 9), ("error_rate", "err", 6),
            ("loadavg_1m", "load", 5)]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    print(f"per call at {COMPARE_AT_RPS:g} RPS (CPU from /proc, all threads; latency in ms):")
    print("  ".join(f"{label:>{w}}" for _, label, w in cols))
    for r in rows:
        print("  ".join(f"{f(r[key]):>{w}}" for key, _, w in cols))


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    w = max(len(r["metric"]) for r in rows) if rows else 10
    print(f"{'metric':<{w}}  {'reference':>10}  {'real':>10}  {'real/ref':>9}")
    for r in rows:
        print(f"{r['metric']:<{w}}  {f(r['reference']):>10}  {f(r['real']):>10}  {f(r['real/reference']):>9}")


def _generators(text: str) -> list[str]:
    gens = [g.strip() for g in text.split(",") if g.strip()]
    if not gens or any(g not in GENERATORS for g in gens):
        raise argparse.ArgumentTypeError(f"generators are {', '.join(GENERATORS)} (comma-separated)")
    return gens


def real_settings(specs: list[str]) -> list[tuple[str, str]]:
    """(entry name, extra server arguments) per ``NAME=ARGS`` setting; one plain "real" entry without any."""
    if not specs:
        return [("real", "")]
    out = []
    for spec in specs:
        name, sep, extra = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--real-setting {spec!r}: expected NAME=ARGS")
        out.append((f"real:{name.strip()}", extra))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--rates", type=load._rates, default=list(load.DEFAULT_RATES))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    p.add_argument("--p99-bound-ms", type=float, default=50.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (s)")
    p.add_argument("--procs", type=int, default=1, help="load-generator processes")
    p.add_argument("--max-bundles", type=int, default=5)
    p.add_argument("--items", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", help="query file (default benchmarks/queries/instacart.txt)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--real-cmd", default="bundlerec-server", help="real server executable")
    p.add_argument("--real-args", default="", help="extra arguments for the real server")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--real-setting", action="append", default=[], metavar="NAME=ARGS",
                   help="run the real server once per setting with these extra arguments (repeatable)")
    p.add_argument("--generator", type=_generators, default=list(GENERATORS),
                   help="python, h2load or python,h2load (h2load drives the real server only; skipped if not installed)")
    p.add_argument("--h2load-rates", type=load._rates, default=[COMPARE_AT_RPS])
    p.add_argument("--h2load-connections", type=int, default=4)
    p.add_argument("--query-mix", choices=load.QUERY_MIXES, default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--rpc", choices=["recommend", "search"], default="recommend", help="the Python harness's RPC")
    args = p.parse_args(argv)
    if not (args.artifact / "items.jsonl").is_file():
        print(f"{args.artifact}: not an artifact folder (no items.jsonl)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    queries = load.load_queries(args.queries)
    started = time.time()
    entries: dict[str, dict[str, Any]] = {}

    if not args.skip_reference:
        port = free_port()
        argv_ref = [sys.executable, "-m", "benchmarks.reference_server", "--artifact", str(args.artifact),
                    "--port", str(port)]
        entries["reference"] = run_server_sweep("reference", argv_ref, port, args.out, args, queries)
    if not args.skip_real:
        exe = find_real_server(args.real_cmd)
        if exe is None:
            print(f"== real: SKIP: {args.real_cmd!r} not found (install the server package)", flush=True)
            entries["real"] = {"name": "real", "skipped": f"{args.real_cmd} not found"}
        else:
            for name, extra in real_settings(args.real_setting):
                port, metrics_port = free_port(), free_port()
                argv_real = [exe, "--artifact", str(args.artifact), "--port", str(port), "--host", "127.0.0.1",
                             "--metrics-port", str(metrics_port), *args.real_args.split(), *extra.split()]
                entries[name] = run_server_sweep(name, argv_real, port, args.out, args, queries, metrics_port)

    real = next((e for n, e in entries.items() if n.startswith("real")), None)
    rows = comparison(entries.get("reference", {}), real)
    print()
    print_table(rows)
    by_generator = generator_rows(entries)
    if by_generator:
        print()
        print_generator_table(by_generator)
    out = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "n_queries": len(queries), "compare_at_rps": COMPARE_AT_RPS},
           "machine": load.machine_info(), "started_at": started, "elapsed_s": time.time() - started,
           "servers": entries, "comparison": rows, "per_call": by_generator}
    (args.out / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    series = {name: e["results"] for name, e in entries.items() if e.get("results")}
    if series:
        load.plot_latency(series, args.out / "sweep.png", p99_bound_ms=args.p99_bound_ms,
                          title=f"{args.rpc.capitalize()} latency vs load, {args.artifact.name}: " + " vs ".join(series))
    print(f"\nwrote {args.out / 'sweep.json'}" + (f" and {args.out / 'sweep.png'}" if series else "")
          + f" in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

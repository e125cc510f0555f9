"""Overload demonstration: load at R, 2R, R/2 (repeated), against a real server with bounded admission.

    python -m benchmarks.overload --artifact artifacts/demo --rps auto --cycles 3 \
        --server-args "--max-in-flight 8 --max-queue 16 --target-latency-ms 25" --out runs/overload
    python -m benchmarks.overload --artifact artifacts/demo --rps 100 --server-args "--max-in-flight 8 --max-queue 16"

Shows (JSON + PNG): admitted requests keep their p99 under 2x load, shed requests fail fast with
RESOURCE_EXHAUSTED (their latency is reported separately), and the server recovers as soon as load drops.
R should be the highest sustainable rate of the same server on the same machine: ``--rps auto`` measures it
first with a sweep (same admission settings, same CPUs). The phases repeat ``--cycles`` times and the summary
gives medians over cycles, because a shared VM drifts between runs. Per phase it also prints the server-side
p99 (StreamSummary.server_ms) and how late the load generator started its calls, to tell the server's latency
from the shared cores'. ``--server-cpus`` / ``--load-cpus`` pin the server and the load generator to separate
cores; ``--load-nice`` lowers the generator's priority.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from . import load
from .sweep import start_real_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--rps", required=True, help="sustainable rate R (phases: R, 2R, R/2), or 'auto' to measure it first")
    p.add_argument("--rates", default="50,100,150,200,250,300,350,400", help="sweep rates for --rps auto")
    p.add_argument("--p99-bound-ms", type=float, default=50.0, help="sustainability bound for --rps auto")
    p.add_argument("--server-cpus", default="", help="pin the server to these CPUs (taskset list, e.g. 1)")
    p.add_argument("--load-cpus", default="", help="pin the load generator to these CPUs (e.g. 0)")
    p.add_argument("--load-nice", type=int, default=0, help="run the load generator at this nice value (server at 0)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--cycles", type=int, default=2,
                   help="repeat R, 2R, R/2 this many times; medians over cycles (a noisy machine drifts between runs)")
    p.add_argument("--out", type=Path, default=Path("runs/overload"))
    p.add_argument("--server-args", default="--max-in-flight 8 --max-queue 16",
                   help="admission settings of the server under test")
    p.add_argument("--procs", type=int, default=1)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    queries = load.load_queries(None)
    if args.load_cpus:
        os.sched_setaffinity(0, _cpus(args.load_cpus))  # inherited by the load processes
    server, target = start_real_server(args.artifact, args.out, args.server_args, cpus=args.server_cpus)
    results = []
    with server as srv:
        if args.load_nice:
            os.nice(args.load_nice)  # after the server started: it keeps nice 0; the load processes inherit this
        load.wait_for_health(target, 120, alive=srv.alive)
        load.run_rate(target, 20, 2, queries, procs=args.procs, seed=99)  # warm-up, discarded
        rate_sweep = None
        if args.rps == "auto":
            rate_sweep = load.run_sweep(target, [float(r) for r in args.rates.split(",")], args.duration, queries,
                                        p99_bound_ms=args.p99_bound_ms, warmup_s=0, procs=args.procs, seed=50)
            rps = rate_sweep["highest_sustainable_rps"]
            if not rps:
                print("no sustainable rate found; nothing to overload")
                return 1
            print(f"R = {rps:g} RPS (highest sustainable: >= 95 % achieved, < 1 % errors, p99 <= {args.p99_bound_ms:g} ms)")
        else:
            rps = float(args.rps)
        for cycle in range(1, args.cycles + 1):
            for i, (name, factor) in enumerate(PHASES):
                res = load.run_rate(target, rps * factor, args.duration, queries, procs=args.procs, seed=10 * cycle + i)
                res["phase"], res["cycle"] = name, cycle
                results.append(res)
                print(f"{name:>13} #{cycle}: {load.format_row(res)}")
                print(f"{'':>16}  server p99 {_ms(res['server_ms']['p99'])}, load-generator start lag p99 "
                      f"{_ms(res['client_lag_ms']['p99'])}{_shed_text(res)}")
    summary = summarize_phases(results)
    print_summary(summary)
    out = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": load.machine_info(), "rps": rps,
           "rate_sweep": rate_sweep, "summary": summary, "phases": results, "finished_at": time.time()}
    (args.out / "overload.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out / "overload.png")
    print(f"wrote {args.out / 'overload.json'} and {args.out / 'overload.png'}")
    return 0


PHASES = (("steady R", 1.0), ("overload 2R", 2.0), ("recovery R/2", 0.5))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _shed_text(res: dict) -> str:
    shed = res["error_ms"].get("RESOURCE_EXHAUSTED")
    if not shed:
        return ""
    return (f"; shed {res['errors']['RESOURCE_EXHAUSTED'] / res['requests']:.1%}, RESOURCE_EXHAUSTED p50/p99 "
            f"{shed['p50']:.1f}/{shed['p99']:.1f} ms")


def summarize_phases(results: list[dict]) -> dict[str, dict]:
    """Per phase, the median over cycles of: admitted full-stream p99, server-side p99, shed fraction, shed
    p50/p99, OK/s; plus the ratio of admitted p99 at 2R to that at R (the claim under test)."""
    def med(values):
        values = [v for v in values if v is not None]
        return float(statistics.median(values)) if values else None

    out: dict[str, dict] = {}
    for name, _ in PHASES:
        runs = [r for r in results if r["phase"] == name]
        if not runs:
            continue
        shed = [(r["error_ms"].get("RESOURCE_EXHAUSTED") or {}) for r in runs]
        out[name] = {
            "cycles": len(runs),
            "full_p99_ms": med([r["full_ms"]["p99"] for r in runs]),
            "server_p99_ms": med([(r.get("server_ms") or {}).get("p99") for r in runs]),
            "shed_fraction": med([r["errors"].get("RESOURCE_EXHAUSTED", 0) / r["requests"] if r["requests"] else 0.0 for r in runs]),
            "shed_p50_ms": med([s.get("p50") for s in shed]),
            "shed_p99_ms": med([s.get("p99") for s in shed]),
            "ok_per_s": med([r["achieved_rps"] for r in runs]),
            "other_errors": sum(n for r in runs for code, n in r["errors"].items() if code != "RESOURCE_EXHAUSTED"),
        }
    steady, over = out.get("steady R", {}), out.get("overload 2R", {})
    for key in ("full_p99_ms", "server_p99_ms"):
        if steady.get(key) and over.get(key) is not None:
            out.setdefault("ratios", {})[f"{key} 2R/R"] = over[key] / steady[key]
    return out


def print_summary(summary: dict[str, dict]) -> None:
    print(f"{'median over cycles':>18} | admitted p99 (full / server) | shed | shed p50 / p99 | OK/s | other errors")
    for name, _ in PHASES:
        row = summary.get(name)
        if row:
            print(f"{name:>18} | {_ms(row['full_p99_ms']):>9} / {_ms(row['server_p99_ms']):>9} | "
                  f"{row['shed_fraction']:5.1%} | {_ms(row['shed_p50_ms'])} / {_ms(row['shed_p99_ms'])} | "
                  f"{row['ok_per_s']:.0f} | {row['other_errors']}")
    for key, ratio in summary.get("ratios", {}).items():
        print(f"{key}: {ratio:.2f}")


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['phase'].split()[-1]} #{r.get('cycle', 1)}" for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(12, 0.9 * len(results)), 4.5))
    x = range(len(results))
    a.bar([i - 0.27 for i in x], [r["full_ms"]["p99"] or 0 for r in results], 0.27, label="admitted: full-stream p99")
    a.bar(list(x), [(r.get("server_ms") or {}).get("p99") or 0 for r in results], 0.27, label="admitted: server-side p99")
    a.bar([i + 0.27 for i in x], [(r["error_ms"].get("RESOURCE_EXHAUSTED") or {}).get("p99") or 0 for r in results], 0.27,
          label="shed: RESOURCE_EXHAUSTED p99")
    a.set_xticks(list(x), names, rotation=60, fontsize=8)
    a.set_ylabel("ms")
    a.set_ylim(0, a.get_ylim()[1] * 1.3)  # room for the legend above the bars
    a.legend(fontsize=8, ncols=2)
    a.set_title("latency by phase")
    b.bar([i - 0.2 for i in x], [r["achieved_rps"] for r in results], 0.4, label="OK / s")
    b.bar([i + 0.2 for i in x], [r["errors"].get("RESOURCE_EXHAUSTED", 0) / r["duration_s"] for r in results], 0.4, label="shed / s")
    b.set_xticks(list(x), names, rotation=60, fontsize=8)
    b.legend()
    b.set_title("throughput by phase")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

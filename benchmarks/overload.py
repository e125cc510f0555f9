"""Overload demonstration: steady load at R, then 2R, then R/2, against a real server with bounded admission.

    python -m benchmarks.overload --artifact artifacts/demo --rps 300 --out runs/overload

Shows (JSON + PNG): admitted requests keep their p99 under 2x load, shed requests fail fast with
RESOURCE_EXHAUSTED (their latency is reported separately), and the server recovers as soon as load drops.
R should be the highest sustainable rate from `make bench` on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import load
from .sweep import start_real_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--rps", type=float, required=True, help="sustainable rate R (phases: R, 2R, R/2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--out", type=Path, default=Path("runs/overload"))
    p.add_argument("--server-args", default="--max-in-flight 8 --max-queue 16",
                   help="admission settings of the server under test")
    p.add_argument("--procs", type=int, default=1)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    queries = load.load_queries(None)
    server, target = start_real_server(args.artifact, args.out, args.server_args)
    phases = [("steady R", args.rps), ("overload 2R", 2 * args.rps), ("recovery R/2", args.rps / 2)]
    results = []
    with server as srv:
        load.wait_for_health(target, 120, alive=srv.alive)
        load.run_rate(target, 20, 2, queries, procs=args.procs, seed=99)  # warm-up, discarded
        for i, (name, rate) in enumerate(phases):
            res = load.run_rate(target, rate, args.duration, queries, procs=args.procs, seed=i)
            res["phase"] = name
            results.append(res)
            shed = res["error_ms"].get("RESOURCE_EXHAUSTED")
            print(f"{name:>13}: {load.format_row(res)}")
            if shed:
                print(f"{'':>13}  shed {res['errors']['RESOURCE_EXHAUSTED']} calls, RESOURCE_EXHAUSTED latency "
                      f"p50 {shed['p50']:.1f} ms p99 {shed['p99']:.1f} ms")
    out = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": load.machine_info(),
           "phases": results, "finished_at": time.time()}
    (args.out / "overload.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out / "overload.png")
    print(f"wrote {args.out / 'overload.json'} and {args.out / 'overload.png'}")
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["phase"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(results))
    a.bar([i - 0.2 for i in x], [r["full_ms"]["p99"] or 0 for r in results], 0.4, label="admitted: full-stream p99")
    a.bar([i + 0.2 for i in x], [(r["error_ms"].get("RESOURCE_EXHAUSTED") or {}).get("p99") or 0 for r in results], 0.4,
          label="shed: RESOURCE_EXHAUSTED p99")
    a.set_xticks(list(x), names)
    a.set_ylabel("ms")
    a.legend()
    a.set_title("latency by phase")
    b.bar([i - 0.2 for i in x], [r["achieved_rps"] for r in results], 0.4, label="OK / s")
    b.bar([i + 0.2 for i in x], [r["errors"].get("RESOURCE_EXHAUSTED", 0) / r["duration_s"] for r in results], 0.4, label="shed / s")
    b.set_xticks(list(x), names)
    b.legend()
    b.set_title("throughput by phase")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

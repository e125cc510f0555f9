"""Soak test: steady open-loop load for N minutes while sampling the server's resident memory.

    python -m benchmarks.soak --artifact artifacts/demo --minutes 10 --rps 100 --out runs/soak

Writes JSON (RSS samples, per-minute latency, fitted RSS slope in MB/min after warm-up) and a PNG of RSS
and p99 over time. "No growth beyond noise": the slope over the second half is compared with the
sample-to-sample noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import load
from .sweep import start_real_server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rps", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    p.add_argument("--server-args", default="")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    queries = load.load_queries(None)
    server, target = start_real_server(args.artifact, args.out, args.server_args)
    samples: list[tuple[float, float]] = []
    minutes: list[dict] = []
    with server as srv:
        load.wait_for_health(target, 120, alive=srv.alive)
        t0 = time.monotonic()
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, rss_mb(srv.proc.pid)))
                stop.wait(1.0)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        try:
            for m in range(int(np.ceil(args.minutes))):
                dur = min(60.0, args.minutes * 60 - m * 60)
                res = load.run_rate(target, args.rps, dur, queries, seed=m)
                res["minute"] = m + 1
                minutes.append(res)
                print(f"minute {m + 1}: {load.format_row(res)}  rss {samples[-1][1]:.1f} MB", flush=True)
        finally:
            stop.set()
            th.join()
    t = np.array([s[0] for s in samples]) / 60
    rss = np.array([s[1] for s in samples])
    half = t >= t[-1] / 2
    slope_all = float(np.polyfit(t, rss, 1)[0]) if len(t) > 2 else None
    slope_half = float(np.polyfit(t[half], rss[half], 1)[0]) if half.sum() > 2 else None
    noise = float(np.std(np.diff(rss))) if len(rss) > 2 else None
    summary = {"rss_start_mb": float(rss[0]), "rss_end_mb": float(rss[-1]), "rss_max_mb": float(rss.max()),
               "slope_mb_per_min": slope_all, "slope_second_half_mb_per_min": slope_half, "sample_noise_mb": noise,
               "errors": sum(r["requests"] - r["ok"] for r in minutes), "requests": sum(r["requests"] for r in minutes)}
    print(json.dumps(summary, indent=2))
    out = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": load.machine_info(), "summary": summary,
           "rss_samples": samples, "minutes": minutes}
    (args.out / "soak.json").write_text(json.dumps(out, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, rss, label="server RSS (MB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax2 = ax.twinx()
    ax2.plot([r["minute"] - 0.5 for r in minutes], [r["full_ms"]["p99"] or np.nan for r in minutes], "o-", color="C1", label="full p99 (ms)")
    ax2.set_ylabel("p99 ms")
    ax.set_title(f"soak {args.minutes:g} min at {args.rps:g} rps; RSS slope (2nd half) {slope_half:+.2f} MB/min")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "soak.png", dpi=110)
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency while the server hot-reloads: open-loop Poisson Search calls at a fixed rate, SIGHUP at ``--reload-at``
seconds (the server loads its artifact path again and swaps it in), latency and errors before, during (the next
``--window`` seconds) and after. Each ``--setting`` runs its own server, one after the other.

    python -m benchmarks.reload_under_load --artifact artifacts/homedepot --queries runs/hd_test_queries.txt \
        --setting "offload=" --setting "in-process=--no-reload-offload" --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.load import latency_summary, load_queries, poisson_schedule
from benchmarks.procs import ServerProcess, free_port
from benchmarks.report import emit


async def _run(target: str, queries: list[str], rps: float, duration: float, reload_at: float,
               server: ServerProcess, timeout: float) -> list[tuple[float, float, str]]:
    """(scheduled offset s, latency ms, status code name) of each call of a Poisson schedule; SIGHUP to ``server``
    at the first arrival after ``reload_at``."""
    from bundlerec import AsyncClient

    async with AsyncClient(target) as c:
        for q in queries[:200]:  # warm
            await c.search(q, k=10)
        out: list[tuple[float, float, str]] = []

        async def one(i: int, at: float) -> None:
            start = time.perf_counter()
            code = "OK"
            try:
                await c.search(queries[i % len(queries)], k=10, timeout=timeout)
            except Exception as exc:  # a status code name where it has one (grpc's is a method, the client's a field)
                status = getattr(exc, "code", None)
                code = getattr(status() if callable(status) else status, "name", type(exc).__name__)
            out.append((at, (time.perf_counter() - start) * 1e3, code))

        tasks, sent_hup, t0 = [], False, time.perf_counter()
        for i, at in enumerate(poisson_schedule(rps, duration).tolist()):
            now = time.perf_counter() - t0
            if at > now:
                await asyncio.sleep(at - now)
            if not sent_hup and at >= reload_at:
                server.signal(signal.SIGHUP)
                sent_hup = True
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
        return out


def _window(calls: list[tuple[float, float, str]], lo: float, hi: float) -> dict[str, Any]:
    summary = {k: round(v, 1) if isinstance(v, float) else v
               for k, v in latency_summary([ms for at, ms, code in calls if lo <= at < hi and code == "OK"]).items()}
    errors = [code for at, _, code in calls if lo <= at < hi and code != "OK"]
    return {"from_s": lo, "to_s": hi, **summary, "errors": {c: errors.count(c) for c in set(errors)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reload_under_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--queries", type=Path, required=True, help="one query a line")
    p.add_argument("--setting", action="append", default=[], help="NAME=server flags (repeatable; default: one run as is)")
    p.add_argument("--rps", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=24.0)
    p.add_argument("--reload-at", type=float, default=8.0)
    p.add_argument("--window", type=float, default=6.0, help="seconds after the SIGHUP counted as the reload")
    p.add_argument("--timeout", type=float, default=5.0, help="each call's deadline (s)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    queries = load_queries(args.queries)
    report: dict[str, Any] = {"artifact": str(args.artifact), "rps": args.rps, "reload_at_s": args.reload_at, "runs": {}}
    series = {}
    for spec in args.setting or ["default="]:
        name, _, flags = spec.partition("=")
        target = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "bundlerec_server", "--artifact", str(args.artifact), "--host", "127.0.0.1",
                "--port", target.rsplit(":", 1)[1], *shlex.split(flags)]
        with ServerProcess(argv, Path(tempfile.gettempdir()) / f"reload-under-load-{name}.log", target=target,
                           name=name) as server:
            server.wait_serving(timeout=240)
            calls = asyncio.run(_run(target, queries, args.rps, args.duration, args.reload_at, server, args.timeout))
        end = args.reload_at + args.window
        report["runs"][name] = {"flags": flags, "before": _window(calls, 2.0, args.reload_at),
                                "reload": _window(calls, args.reload_at, end), "after": _window(calls, end, args.duration),
                                "loadavg": [round(v, 2) for v in os.getloadavg()]}
        series[name] = calls
    emit(report, args.json)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.8))
        for name, calls in series.items():
            ax.scatter([c[0] for c in calls], [c[1] for c in calls], s=3, label=name)
        ax.axvline(args.reload_at, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("seconds (SIGHUP at the dashed line)")
        ax.set_ylabel("Search latency, ms")
        ax.set_title(f"Hot reload under {args.rps:.0f} RPS: {args.artifact.name}")
        ax.legend(markerscale=4)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

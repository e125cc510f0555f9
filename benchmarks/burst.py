"""Bursts of identical calls on a cold cache (a flash crowd, or the first seconds after a reload), the case the
caches' single-flight is for: for each of ``--texts`` queries the server has not seen, ``--burst`` concurrent
identical calls, one query after another. Per server setting (a fresh server each, settings run in the order
given, so alternate them): server CPU ms per call (/proc), texts the encoder ran (its batch-size sum), calls
coalesced, latency p50/p99 and the load average.

    python -m benchmarks.burst --artifact artifacts/demo --rpc recommend --texts 40 --burst 16 \\
        --setting "cache=--query-cache-size 4096" --setting "off=--query-cache-size 0" [--json F]

(The single-flight A/B in docs/performance.md used a ``--no-single-flight`` flag that exists only in commit 51eca85.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import load
from benchmarks.cpu import CpuWindow, per_call, scrape
from benchmarks.procs import ServerProcess, free_port
from benchmarks.report import emit
from benchmarks.sweep import find_real_server
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

COUNTERS = {"encoded": "bundlerec_encoder_batch_size_sum", "batches": "bundlerec_encoder_batch_size_count",
            **{f"{c}_coalesced": f"bundlerec_{c}_cache_coalesced_total" for c in ("query", "reply", "search")}}


async def bursts(target: str, rpc: str, texts: list[str], burst: int, timeout: float) -> list[float]:
    """Latency (ms) of every call; the bursts one after another, each ``burst`` identical calls at once."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BundleRecommenderStub(channel)

        async def one(text: str) -> None:
            t0 = time.perf_counter()
            if rpc == "search":
                await stub.Search(pb.SearchRequest(query=text, k=10), timeout=timeout)
            else:
                async for _ in stub.Recommend(pb.RecommendRequest(query=text, max_bundles=5, max_items_per_bundle=3),
                                              timeout=timeout):
                    pass
            latencies.append((time.perf_counter() - t0) * 1000.0)

        for text in texts:
            await asyncio.gather(*(one(text) for _ in range(burst)))
    return latencies


def run_setting(name: str, extra: str, args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    exe = find_real_server("bundlerec-server")
    if exe is None:
        raise SystemExit("bundlerec-server not found")
    port, metrics_port = free_port(), free_port()
    argv = [exe, "--artifact", str(args.artifact), "--port", str(port), "--host", "127.0.0.1",
            "--metrics-port", str(metrics_port), *extra.split()]
    target, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/"
    with ServerProcess(argv, args.out / f"burst-{name}.log", target=target, name=name) as srv:
        srv.wait_serving(args.startup_timeout)
        before = scrape(url) or {}
        window = CpuWindow(srv.proc.pid if srv.proc else None).start()
        lat = asyncio.run(bursts(target, args.rpc, texts, args.burst, args.timeout))
        window.stop()
        after = scrape(url) or {}
    calls = len(texts) * args.burst
    counts = {k: after.get(m, 0.0) - before.get(m, 0.0) for k, m in COUNTERS.items()}
    row = {"setting": name, "args": extra, "calls": calls, "server_ms_per_call": per_call(window.cpu_s, calls),
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), **counts,
           "loadavg": list(os.getloadavg())}
    print(f"{name:>8}: cpu {row['server_ms_per_call']:.2f} ms/call  encoded {counts['encoded']:.0f} texts in "
          f"{counts['batches']:.0f} batches  coalesced q/r/s {counts['query_coalesced']:.0f}/{counts['reply_coalesced']:.0f}/"
          f"{counts['search_coalesced']:.0f}  p50/p99 {row['p50_ms']:.1f}/{row['p99_ms']:.1f} ms  load {row['loadavg'][0]:.1f}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.burst", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--rpc", choices=["recommend", "search"], default="recommend")
    p.add_argument("--texts", type=int, default=40, help="distinct queries, one burst each")
    p.add_argument("--burst", type=int, default=16, help="identical concurrent calls a burst")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=ARGS", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path("runs/burst"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    texts = load.load_queries(None)[: args.texts]
    rows = [run_setting(*spec.split("=", 1), args=args, texts=texts) for spec in args.setting]
    emit({"rpc": args.rpc, "texts": len(texts), "burst": args.burst, "rows": rows}, args.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

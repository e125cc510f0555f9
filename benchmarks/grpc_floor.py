"""gRPC's own floor per streamed Recommend call: two stub servers that stream the same pre-built reply (5 bundles
of 3 items + the summary, no model, no retrieval), one on grpc.aio (as the real server) and one on the synchronous
``grpc.server`` with a thread pool, driven by h2load at the same rates; server CPU ms a call for each.

    python -m benchmarks.grpc_floor --rates 100,400 --duration 15 --rounds 2 --json docs/results/grpc-floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from benchmarks.procs import free_port
from benchmarks.report import emit


def reply() -> list[Any]:
    from bundlerec.v1 import bundlerec_pb2 as pb

    out = []
    for rank in range(1, 6):
        items = [pb.BundleItem(item_id=f"{rank}{i:04d}", title=f"Organic Item {rank}-{i} 16 oz", category="dairy eggs",
                               price=3.49, role=1 + (i > 0)) for i in range(3)]
        out.append(pb.RecommendResponse(bundle=pb.Bundle(rank=rank, score=1.0 / rank, items=items,
                                                         reason="bought together in 312 baskets")))
    out.append(pb.RecommendResponse(summary=pb.StreamSummary(bundles_sent=5, stop_reason=1, artifact_version="floor", server_ms=1.0)))
    return out


def serve_aio(port: int) -> None:
    import grpc

    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    messages = reply()

    class Servicer(pbg.BundleRecommenderServicer):
        async def Recommend(self, request: Any, context: Any) -> None:  # noqa: N802 (gRPC method name)
            for m in messages:
                await context.write(m)

    async def main() -> None:
        server = grpc.aio.server()
        pbg.add_BundleRecommenderServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def serve_sync(port: int) -> None:
    import grpc

    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    messages = reply()

    class Servicer(pbg.BundleRecommenderServicer):
        def Recommend(self, request: Any, context: Any) -> Any:  # noqa: N802
            yield from messages

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pbg.add_BundleRecommenderServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    from benchmarks import h2load

    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=("aio", "sync"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rates", default="100,400")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.serve:
        (serve_aio if args.serve == "aio" else serve_sync)(args.port)
        return 0
    procs, rows = {}, []
    try:
        for kind in ("aio", "sync"):
            port = free_port()
            procs[kind] = (subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_floor", "--serve", kind, "--port", str(port)]), port)
        time.sleep(3)
        for rnd in range(args.rounds):
            for rate in (float(r) for r in args.rates.split(",")):
                for kind in (("aio", "sync") if rnd % 2 == 0 else ("sync", "aio")):
                    proc, port = procs[kind]
                    r = h2load.run(f"127.0.0.1:{port}", rate, args.duration, server_pid=proc.pid)
                    row = {"server": kind, "round": rnd + 1, "rate": rate, "achieved_rps": round(r["achieved_rps"], 1),
                           "server_cpu_ms_per_call": r["cpu"].get("server_ms_per_call"), "full_ms": r["full_ms"],
                           "error_rate": r["error_rate"], "loadavg": list(os.getloadavg())}
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("server", "round", "rate", "achieved_rps", "server_cpu_ms_per_call")}
                                     | {"full_p50": row["full_ms"].get("p50"), "full_p99": row["full_ms"].get("p99")}), flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()
    emit({"rows": rows}, args.json, echo=False)  # each row was printed as it came
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

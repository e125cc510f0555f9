"""A compiled load generator beside the Python harness: ``h2load`` (nghttp2) driving Recommend over h2c.

    python -m benchmarks.h2load --target 127.0.0.1:50051 --rps 100 --duration 10 --json runs/h2load.json \
        [--connections 4] [--query "organic milk"] [--server-pid PID] [--metrics-url http://127.0.0.1:P/]

gRPC over HTTP/2 without TLS is a POST to ``/bundlerec.v1.BundleRecommender/Recommend`` with headers
``content-type: application/grpc`` and ``te: trailers`` and a body of one length-prefixed message: a
compressed-flag byte (0), the message length as 4 big-endian bytes, the serialized ``RecommendRequest``.
``grpc-timeout`` carries the same per-call deadline as the Python harness, so the server takes the same path.

What h2load measures, and what it does not (so read its figures beside the Python harness's):
* Pacing: ``--rps`` is per connection, requests evenly spaced on each (not Poisson); the total rate is
  connections x rps. Latency runs from h2load's own send to the end of the response (the whole stream; there
  is no time to the first bundle), so a late generator hides queueing (coordinated omission). Percentiles
  come from ``--log-file`` (per request: start, HTTP status, microseconds to the end of the response).
* One body for every request: one query text (a query cache would hit on every call after the first).
* It counts HTTP 2xx, not ``grpc-status``: a gRPC error is HTTP 200 too. ``-v`` prints the response
  headers, so it shows a Trailers-Only error's ``grpc-status``, but not the trailers after a stream's
  messages, and it costs generator CPU. So the status is checked two other ways: the server's own count of
  calls by final code over the window (``--metrics-url``: ``bundlerec_requests_total``), and a probe after
  the run that sends the very same bytes through grpc and requires OK with bundles.
* The generator's CPU is the h2load child's (``getrusage(RUSAGE_CHILDREN)`` around it); the server's is
  from /proc, as in ``benchmarks.load``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.cpu import Counters, CpuWindow, cpu_report

METHOD = "/bundlerec.v1.BundleRecommender/Recommend"
HEADERS = ("content-type: application/grpc", "te: trailers")
MAX_DURATION_S = 600
MAX_RPS = 20_000


def frame(message: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: flag byte, 4-byte big-endian length, the bytes."""
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def unframe(body: bytes) -> tuple[bool, bytes]:
    """(compressed, message) of a body holding exactly one length-prefixed message."""
    if len(body) < 5:
        raise ValueError("a gRPC message needs a 5-byte prefix")
    n = int.from_bytes(body[1:5], "big")
    if body[0] not in (0, 1) or len(body) != 5 + n:
        raise ValueError(f"bad prefix: flag {body[0]}, length {n}, body {len(body)} bytes")
    return bool(body[0]), body[5:]


def recommend_body(query: str, max_bundles: int = 5, items: int = 3, mode: int = 0) -> bytes:
    from bundlerec.v1 import bundlerec_pb2 as pb

    req = pb.RecommendRequest(query=query, max_bundles=max_bundles, max_items_per_bundle=items,
                              retrieval_mode=cast(Any, mode))
    return frame(req.SerializeToString())


def find() -> str | None:
    """The h2load executable (Debian package nghttp2-client), or None."""
    return shutil.which("h2load")


def command(exe: str, target: str, body: Path, rate: float, duration: float, connections: int, timeout_s: float,
            log_file: Path, requests: int = 0) -> list[str]:
    """h2load's argv: ``duration`` seconds at ``rate`` (or exactly ``requests`` calls at that rate)."""
    host = target.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise ValueError(f"refusing non-loopback target {target}")
    if not 0 < duration <= MAX_DURATION_S or not 0 < rate <= MAX_RPS or connections < 1:
        raise ValueError("duration, rate or connections out of bounds")
    headers = [*HEADERS, f"grpc-timeout: {max(1, round(timeout_s * 1000))}m"]
    amount = ["-n", str(requests)] if requests > 0 else ["-D", f"{duration:g}"]
    return [exe, "-c", str(connections), "-t", "1", "--rps", f"{rate / connections:g}", *amount,
            "-d", str(body), *(a for h in headers for a in ("-H", h)), "--log-file", str(log_file),
            f"http://{target}{METHOD}"]


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_TIME = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")
_SCALE_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_output(text: str) -> dict[str, Any]:
    """h2load's summary: elapsed, req/s, request counts, HTTP status classes, time for request (ms)."""
    out: dict[str, Any] = {}
    if m := _FINISHED.search(text):
        out["elapsed_s"] = float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0)
        out["req_per_s"] = float(m.group(3))
    if m := _REQUESTS.search(text):
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out["requests"] = dict(zip(keys, map(int, m.groups()), strict=True))
    if m := _STATUS.search(text):
        out["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    if m := _TIME.search(text):
        g = m.groups()
        vals = [float(g[i]) * _SCALE_MS[g[i + 1]] for i in range(0, 8, 2)]
        out["time_for_request_ms"] = dict(zip(("min", "max", "mean", "sd"), vals, strict=True))
    return out


def parse_log(path: Path) -> dict[str, Any]:
    """Per-request rows of ``--log-file`` (start µs since epoch, HTTP status, µs to the end of the response):
    latency summary (ms) of the 2xx requests, in ``benchmarks.load``'s shape."""
    from benchmarks.load import latency_summary

    total, codes = [], []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            codes.append(int(parts[1]))
            total.append(int(parts[2]) / 1000.0)
    ok = np.array([200 <= c < 300 for c in codes], dtype=bool)
    return {"rows": len(codes), "http_2xx": int(ok.sum()), "full_ms": latency_summary(np.asarray(total)[ok])}


def probe(target: str, body: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Sends ``body``'s message, byte for byte, as one Recommend call: its status code and bundles."""
    import grpc

    from bundlerec.v1 import bundlerec_pb2 as pb

    _, message = unframe(body)
    with grpc.insecure_channel(target) as ch:
        call: Any = ch.unary_stream(METHOD, request_serializer=None, response_deserializer=pb.RecommendResponse.FromString)
        bundles = 0
        try:
            for resp in call(message, timeout=timeout):
                bundles += resp.WhichOneof("payload") == "bundle"
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "bundles": bundles, "details": exc.details()}
    return {"code": "OK", "bundles": bundles}


def run(target: str, rate: float, duration: float, *, connections: int = 4, query: str = "organic milk",
        max_bundles: int = 5, items: int = 3, mode: int = 0, timeout: float = 5.0, server_pid: int | None = None,
        metrics_url: str | None = None, exe: str | None = None, keep: Path | None = None, requests: int = 0) -> dict[str, Any]:
    """One h2load run at ``rate`` for ``duration`` s; a summary shaped like ``benchmarks.load.run_rate``'s
    (offered/achieved, ``full_ms``, ``cpu``, ``query_cache``, ``server_codes``) plus h2load's own figures."""
    exe = exe or find()
    if exe is None:
        raise FileNotFoundError("h2load not found: apt-get install nghttp2-client")
    connections = max(1, min(connections, int(rate) or 1))
    body = recommend_body(query, max_bundles, items, mode)
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body_path, log_path = Path(tmp) / "body.bin", Path(tmp) / "requests.tsv"
        body_path.write_bytes(body)
        argv = command(exe, target, body_path, rate, duration, connections, timeout, log_path, requests)
        load_before = list(os.getloadavg())
        counters = Counters(metrics_url).start()
        window = CpuWindow(server_pid).start()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout + 60, check=False)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        window.stop()
        counters.stop()
        if proc.returncode != 0 or not log_path.exists():
            raise RuntimeError(f"h2load exited {proc.returncode}: {proc.stderr.strip() or proc.stdout[-2000:]}")
        stats, log = parse_output(proc.stdout), parse_log(log_path)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, keep / "h2load-requests.tsv")
            (keep / "h2load-output.txt").write_text(proc.stdout)
    generator_s = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    codes = counters.codes("Recommend")
    done = stats.get("requests", {}).get("done", log["rows"])
    # the server's own count, when there is one: it also holds a call still in flight when h2load stopped counting
    served = sum(codes.values()) if codes else done
    ok = codes.get("OK", 0) if codes else log["http_2xx"]
    window_s = max(duration, stats.get("elapsed_s", duration))
    return {
        "generator": "h2load",
        "offered_rps": float(rate),
        "duration_s": float(duration),
        "connections": connections,
        "rps_per_connection": rate / connections,
        "arrivals": "paced per connection",
        "requests": done,
        "ok": ok,
        "achieved_rps": ok / window_s,
        "error_rate": (served - ok) / served if served else 0.0,
        "http_2xx": log["http_2xx"],
        "full_ms": log["full_ms"],
        "ttfb_ms": None,
        "h2load": stats,
        "server_codes": codes or None,
        "query_cache": counters.cache(),
        "cpu": cpu_report(window, generator_s, served),
        "loadavg_before": load_before,
        "query": query,
        "probe": probe(target, body, timeout),
        "command": " ".join(argv[:-1] + [argv[-1]]),
    }


def format_row(r: dict[str, Any]) -> str:
    from benchmarks.load import _f, format_cpu

    f = r["full_ms"]
    codes = ",".join(f"{k}:{v}" for k, v in (r.get("server_codes") or {}).items()) or f"2xx:{r['http_2xx']}"
    return (f"  h2load rps {r['offered_rps']:5.0f} ({r['connections']} conn)  achieved {r['achieved_rps']:7.1f}"
            f"  full p50/p90/p99/max {_f(f['p50'])}/{_f(f['p90'])}/{_f(f['p99'])}/{_f(f['max'])} ms"
            f" (mean {_f(f['mean'])})  server codes [{codes}]  probe {r['probe']['code']}{format_cpu(r)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.h2load", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT on loopback")
    p.add_argument("--rps", type=float, default=100.0, help="total rate (split evenly over the connections)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--query", default="organic milk")
    p.add_argument("--max-bundles", type=int, default=5)
    p.add_argument("--items", type=int, default=3)
    p.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (grpc-timeout), s")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--metrics-url")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if find() is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    started = time.time()
    res = run(args.target, args.rps, args.duration, connections=args.connections, query=args.query,
              max_bundles=args.max_bundles, items=args.items, timeout=args.timeout, server_pid=args.server_pid,
              metrics_url=args.metrics_url, keep=Path(args.json).parent)
    print(format_row(res))
    from benchmarks.load import machine_info

    out = {"config": vars(args), "machine": machine_info(), "started_at": started, "results": [res]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if res["probe"]["code"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())

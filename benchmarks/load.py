"""Open-loop gRPC load generator for bundlerec (coordinated-omission safe).

    python -m benchmarks.load --target 127.0.0.1:50051 --rps 100 --duration 10 --json runs/load.json \
        [--plot runs/load.png] [--queries FILE] [--max-bundles 5 --items 3] [--procs N] [--rpc recommend|search]
    python -m benchmarks.load --target 127.0.0.1:50051 --sweep [--rates 25,50,100,200] [--p99-bound-ms 50] ...
    ... [--server-pid PID] [--metrics-url http://127.0.0.1:9100/] [--query-mix uniform|zipf|unique]

How it measures
* The arrival schedule (Poisson: exponential gaps at the offered rate, fixed seed) and the query of
  every request are computed up front. Each request is a task started at its scheduled time
  (``loop.call_at``), whatever the server is doing, and its latency is measured FROM THE SCHEDULED TIME,
  so queueing inside the client counts too (no coordinated omission).
* The client runs in its own process(es) (``--procs``, spawn), each with its own grpc.aio channels;
  request i goes to process i mod N. Results are merged in the parent.
* Per request: time to first bundle (first RecommendResponse holding a bundle; equals the full latency
  for the unary Search RPC), full-stream latency, final status code name, bundles received.
* Latency percentiles are nearest-rank, over the requests that ended OK; errors are reported by code.
* A rate is *sustainable* when achieved throughput ≥ 95% of offered, error rate < 1% and full-stream
  p99 ≤ the bound. The sweep runs increasing rates and stops after two unsustainable rates in a row
  (rates up to the largest ``--must-run`` rate are always run), reporting the highest sustainable one.
* CPU per call, the first figure (issue 13): with ``--server-pid`` the server's CPU (utime + stime of all its
  threads and live children, from /proc) over the measured window, divided by the calls; and the load
  generator's own CPU (each worker process's, all threads) the same way. With ``--metrics-url`` the server's
  query-cache hits and misses over the window are reported beside them (hit rate).
* Query mix: ``uniform`` (each request draws from the query file, with replacement: the historic default),
  ``zipf`` (rank r of a fixed shuffle of the file drawn with probability ∝ 1/r^s, s = ``--zipf-s``), or
  ``unique`` (every request's text distinct: the file's query plus a number, so a query cache never hits).
* Bounded: every call has a deadline (``--timeout``), every run ends at duration + timeout + grace at
  the latest, and health is awaited for at most ``--health-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cpu import Counters, CpuWindow, cpu_report, self_cpu_s

logger = logging.getLogger("benchmarks.load")

DEFAULT_QUERIES = Path(__file__).resolve().parent / "queries" / "instacart.txt"
DEFAULT_RATES = (10, 25, 50, 100, 200, 400, 800, 1600)
MAX_REQUESTS_PER_RUN = 200_000
MAX_DURATION_S = 600.0
GRACE_S = 5.0
# per request, in every worker's result: the same keys, equal lengths
RECORD_KEYS = ("ttfb_ms", "total_ms", "server_ms", "client_lag_ms", "code", "done_s", "bundles")
QUERY_MIXES = ("uniform", "zipf", "unique")
ZIPF_POPULARITY_SEED = 13


# ----------------------------------------------------------------------------------------------------
# Pure functions: schedule, statistics, verdicts


def poisson_schedule(rate: float, duration: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets in seconds (sorted, in [0, duration)) of a Poisson process at ``rate``/s."""
    if rate <= 0 or duration <= 0:
        return np.zeros(0, dtype=np.float64)
    rng = np.random.default_rng(seed)
    expected = rate * duration
    n = int(expected + 10 * math.sqrt(expected) + 20)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while times[-1] < duration:  # vanishingly rare; extend rather than truncate the process
        more = times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))
        times = np.concatenate([times, more])
    return times[times < duration]


def choose_queries(queries: Sequence[str], n: int, mix: str = "uniform", seed: int = 0,
                   zipf_s: float = 1.0) -> list[str]:
    """The query text of each of ``n`` requests under ``mix`` (see the module docstring); deterministic."""
    rng = np.random.default_rng(seed + 1)
    if mix == "uniform":
        return [queries[j] for j in rng.integers(0, len(queries), size=n)]
    if mix == "zipf":
        # which query is most popular: a property of the population, the same in every run (warm-up included)
        order = np.random.default_rng(ZIPF_POPULARITY_SEED).permutation(len(queries))
        weights = 1.0 / np.arange(1, len(queries) + 1, dtype=np.float64) ** zipf_s
        ranks = rng.choice(len(queries), size=n, p=weights / weights.sum())
        return [queries[order[r]] for r in ranks]
    if mix == "unique":
        base = seed * 1_000_000  # distinct across the runs of a sweep (each rate has its own seed)
        return [f"{queries[j]} {base + i}" for i, j in enumerate(rng.integers(0, len(queries), size=n))]
    raise ValueError(f"query mix {mix!r} is not one of {', '.join(QUERY_MIXES)}")


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q% of the values ≤ it (None if empty)."""
    arr = np.sort(np.asarray(values, dtype=np.float64))
    if arr.size == 0:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    rank = max(1, math.ceil(q * arr.size / 100.0 - 1e-9))  # epsilon: 99.9 * 1000 / 100 is 999.0000000000001
    return float(arr[rank - 1])


def latency_summary(values_ms: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max (ms) of the finite values."""
    arr = np.asarray(values_ms, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    out: dict[str, float | int | None] = {"count": int(arr.size)}
    out["mean"] = float(arr.mean()) if arr.size else None
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        out[name] = percentile(arr, q)
    out["max"] = float(arr.max()) if arr.size else None
    return out


def summarize(records: dict[str, Any], offered_rps: float, duration: float) -> dict[str, Any]:
    """Aggregates merged per-request records of one run.

    ``records``: equal-length sequences ``ttfb_ms`` (NaN when no bundle arrived), ``total_ms``,
    ``code`` (status code name) and ``done_s`` (completion time since the run's start).
    """
    codes = list(records["code"])
    n = len(codes)
    ok = np.array([c == "OK" for c in codes], dtype=bool)
    ttfb = np.asarray(records["ttfb_ms"], dtype=np.float64)
    total = np.asarray(records["total_ms"], dtype=np.float64)
    server = np.asarray(records.get("server_ms", [np.nan] * n), dtype=np.float64)
    lag = np.asarray(records.get("client_lag_ms", [np.nan] * n), dtype=np.float64)
    done = np.asarray(records["done_s"], dtype=np.float64)
    n_ok = int(ok.sum())
    window = max(duration, float(done.max()) if n else 0.0)
    scheduled_rps = n / duration if duration > 0 else 0.0
    achieved = n_ok / window if window > 0 else 0.0
    errors = Counter(c for c in codes if c != "OK")
    return {
        "offered_rps": float(offered_rps),
        "scheduled_rps": scheduled_rps,
        "duration_s": float(duration),
        "window_s": window,
        "requests": n,
        "ok": n_ok,
        "achieved_rps": achieved,
        "achieved_ratio": achieved / scheduled_rps if scheduled_rps > 0 else 0.0,
        "error_rate": (n - n_ok) / n if n else 0.0,
        "errors": dict(sorted(errors.items())),
        "ttfb_ms": latency_summary(ttfb[ok]),
        "full_ms": latency_summary(total[ok]),
        # the server's own view (StreamSummary.server_ms: handler start to summary); full - server = time
        # before the handler (gRPC, event loop), on the wire and in the client
        "server_ms": latency_summary(server[ok & np.isfinite(server)]),
        # how late the load generator itself started calls: large values mean the client, not the server,
        # is overloaded and the latencies above are not the server's
        "client_lag_ms": latency_summary(lag[np.isfinite(lag)]),
        "no_bundle_ok": int((ok & ~np.isfinite(ttfb)).sum()),
        # how fast failures came back, by code (e.g. RESOURCE_EXHAUSTED: load shedding must be fast)
        "error_ms": {code: latency_summary(total[np.array([c == code for c in codes], dtype=bool)]) for code in sorted(errors)},
    }


def verdict(result: dict[str, Any], p99_bound_ms: float, min_ratio: float = 0.95,
            max_error_rate: float = 0.01) -> tuple[bool, list[str]]:
    """Whether one rate's result is sustainable, and why not."""
    reasons = []
    if result["requests"] == 0:
        reasons.append("no requests")
    if result["achieved_ratio"] < min_ratio:
        reasons.append(f"achieved {result['achieved_ratio']:.1%} of offered < {min_ratio:.0%}")
    if result["error_rate"] >= max_error_rate:
        reasons.append(f"error rate {result['error_rate']:.2%} >= {max_error_rate:.0%}")
    p99 = result["full_ms"]["p99"]
    if p99 is None or p99 > p99_bound_ms:
        reasons.append(f"full-stream p99 {p99 if p99 is None else round(p99, 1)} ms > {p99_bound_ms} ms")
    return not reasons, reasons


def highest_sustainable(results: Iterable[dict[str, Any]]) -> float | None:
    """Highest offered rate marked sustainable (None if none was)."""
    rates = [r["offered_rps"] for r in results if r.get("sustainable")]
    return max(rates) if rates else None


def split_round_robin(n: int, parts: int) -> list[np.ndarray]:
    """Indices 0..n-1 dealt round-robin into ``parts`` groups (request i -> group i mod parts)."""
    return [np.arange(p, n, parts) for p in range(parts)]


def merge_records(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list] = {key: [] for key in RECORD_KEYS}
    for part in parts:
        n = len(part["code"])
        for key in merged:
            merged[key].extend(list(part.get(key, [math.nan] * n)))
    return merged


# ----------------------------------------------------------------------------------------------------
# Environment: queries, machine, health


def load_queries(path: str | Path | None) -> list[str]:
    """One query a line (.txt; '#' comments), or the distinct values of a CSV's ``query`` column."""
    path = Path(path) if path else DEFAULT_QUERIES
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            seen = dict.fromkeys(row["query"].strip() for row in csv.DictReader(fh))
        queries = [q for q in seen if q]
    else:
        queries = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        raise SystemExit(f"{path}: no queries")
    return queries


def machine_info() -> dict[str, Any]:
    cpu = ""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import grpc

        grpc_version = grpc.__version__
    except Exception:  # noqa: BLE001
        grpc_version = None
    return {
        "cpu_model": cpu or platform.processor(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "avx512_vnni": "avx512_vnni" in flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc_version,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "hostname": platform.node(),
    }


def wait_for_health(target: str, timeout: float = 60.0, service: str = "",
                    alive: Any = None) -> None:
    """Blocks until the target's grpc.health.v1 reports SERVING (overall or for BundleRecommender).

    ``alive``: optional callable returning False when the server process has died (stop early).
    Raises TimeoutError after ``timeout`` seconds.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    services = [service] if service else ["", "bundlerec.v1.BundleRecommender"]
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"{target}: server process exited before becoming healthy")
            for svc in services:
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=2.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as exc:
                    last = exc.code().name
            time.sleep(0.25)
    raise TimeoutError(f"{target}: not SERVING after {timeout:.0f}s (last: {last})")


# ----------------------------------------------------------------------------------------------------
# Worker process


async def _worker_async(cfg: dict[str, Any], offsets: np.ndarray, queries: list[str], start_evt: Any,
                        start_val: Any, ready_q: Any, idx: int) -> dict[str, Any]:
    import grpc

    from bundlerec.v1 import bundlerec_pb2 as pb
    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    loop = asyncio.get_running_loop()
    n_ch = max(1, int(cfg["channels"]))
    # distinct channel args + local subchannel pool => one TCP connection per channel
    channels = [
        grpc.aio.insecure_channel(cfg["target"], options=[("grpc.use_local_subchannel_pool", 1),
                                                          ("bench.channel", i)])
        for i in range(n_ch)
    ]
    stubs = [pbg.BundleRecommenderStub(ch) for ch in channels]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 30)
        ready_q.put(("ready", idx, None))
    except Exception as exc:  # noqa: BLE001
        ready_q.put(("failed", idx, repr(exc)))
        for ch in channels:
            await ch.close()
        raise
    await loop.run_in_executor(None, start_evt.wait, 120)
    start_epoch = start_val.value
    if start_epoch <= 0:  # the parent aborted the run before starting it
        for ch in channels:
            await ch.close()
        return {key: [] for key in RECORD_KEYS}
    t0 = loop.time() + (start_epoch - time.time())  # loop clock of the common start instant
    cpu0 = self_cpu_s()  # this generator's own CPU from here to the end of its schedule

    n = len(offsets)
    ttfb = np.full(n, np.nan)
    total = np.full(n, np.nan)
    server = np.full(n, np.nan)
    lag = np.full(n, np.nan)
    done = np.full(n, np.nan)
    bundles = np.zeros(n, dtype=np.int32)
    codes = ["NOT_STARTED"] * n
    timeout = float(cfg["timeout"])
    rpc = cfg["rpc"]
    mode = int(cfg.get("mode", 0))
    rec_kw = {"max_bundles": int(cfg["max_bundles"]), "max_items_per_bundle": int(cfg["items"]),
              "retrieval_mode": mode}
    tasks: set[asyncio.Task] = set()

    async def one(i: int) -> None:
        sched = t0 + float(offsets[i])
        lag[i] = (loop.time() - sched) * 1e3  # how late this client started the call (its own overload)
        stub = stubs[i % n_ch]
        got = 0
        try:
            if rpc == "search":
                await stub.Search(pb.SearchRequest(query=queries[i], k=int(cfg["k"]), retrieval_mode=mode),
                                  timeout=timeout)
                ttfb[i] = (loop.time() - sched) * 1e3
                got = 1
            else:
                call = stub.Recommend(pb.RecommendRequest(query=queries[i], **rec_kw), timeout=timeout)
                async for resp in call:
                    payload = resp.WhichOneof("payload")
                    if payload == "bundle":
                        if got == 0:
                            ttfb[i] = (loop.time() - sched) * 1e3
                        got += 1
                    elif payload == "summary":
                        server[i] = resp.summary.server_ms
            codes[i] = "OK"
        except grpc.aio.AioRpcError as exc:
            codes[i] = exc.code().name
        except asyncio.CancelledError:
            codes[i] = "CLIENT_CANCELLED"
            raise
        except Exception:  # noqa: BLE001
            codes[i] = "CLIENT_ERROR"
        finally:
            now = loop.time()
            total[i] = (now - sched) * 1e3
            done[i] = now - t0
            bundles[i] = got

    def launch(i: int) -> None:
        task = loop.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for i in range(n):
        loop.call_at(t0 + float(offsets[i]), launch, i)
    hard_end = t0 + float(cfg["duration"]) + timeout + GRACE_S
    # wait for the schedule to be fully launched, then for the in-flight tasks, never beyond hard_end
    await asyncio.sleep(max(0.0, t0 + float(cfg["duration"]) - loop.time()) + 0.01)
    while tasks and loop.time() < hard_end:
        await asyncio.wait(set(tasks), timeout=max(0.01, hard_end - loop.time()))
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    cpu_s = self_cpu_s() - cpu0
    for ch in channels:
        await ch.close()
    return {"cpu_s": cpu_s, "ttfb_ms": ttfb.tolist(), "total_ms": total.tolist(), "server_ms": server.tolist(), "client_lag_ms": lag.tolist(), "code": codes,
            "done_s": done.tolist(), "bundles": bundles.tolist()}


def _worker_entry(cfg, offsets, queries, start_evt, start_val, ready_q, result_q, idx) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        res = asyncio.run(_worker_async(cfg, offsets, queries, start_evt, start_val, ready_q, idx))
        result_q.put((idx, res, None))
    except BaseException as exc:  # noqa: BLE001
        result_q.put((idx, None, repr(exc)))


# ----------------------------------------------------------------------------------------------------
# One rate, a sweep


def run_rate(target: str, rate: float, duration: float, queries: Sequence[str], *, procs: int = 1,
             rpc: str = "recommend", max_bundles: int = 5, items: int = 3, k: int = 10, mode: int = 0,
             seed: int = 0, timeout: float = 5.0, channels: int = 2, server_pid: int | None = None,
             metrics_url: str | None = None, query_mix: str = "uniform", zipf_s: float = 1.0) -> dict[str, Any]:
    """Runs one open-loop load at ``rate`` for ``duration`` seconds; returns its summary (with the server's
    and the generator's CPU per call when ``server_pid`` is given, cache hits with ``metrics_url``)."""
    if duration <= 0 or duration > MAX_DURATION_S:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S}]")
    if rate * duration > MAX_REQUESTS_PER_RUN:
        raise ValueError(f"rate x duration exceeds {MAX_REQUESTS_PER_RUN} requests")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    offsets = poisson_schedule(rate, duration, seed)
    chosen = choose_queries(queries, len(offsets), query_mix, seed, zipf_s)
    procs = max(1, min(int(procs), max(1, len(offsets))))
    groups = split_round_robin(len(offsets), procs)
    cfg = {"target": target, "rpc": rpc, "max_bundles": max_bundles, "items": items, "k": k, "mode": mode,
           "timeout": timeout, "duration": duration, "channels": channels}

    ctx = mp.get_context("spawn")
    start_evt, start_val = ctx.Event(), ctx.Value("d", 0.0)
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    workers = []
    for p, grp in enumerate(groups):
        w = ctx.Process(target=_worker_entry, daemon=True,
                        args=(cfg, offsets[grp], [chosen[j] for j in grp], start_evt, start_val, ready_q,
                              result_q, p))
        w.start()
        workers.append(w)
    try:
        ready = 0
        setup_deadline = time.monotonic() + 60
        while ready < procs:
            try:
                status, p, err = ready_q.get(timeout=max(0.1, setup_deadline - time.monotonic()))
            except queue_mod.Empty:
                raise RuntimeError(f"load workers not ready after 60s ({ready}/{procs})") from None
            if status != "ready":
                raise RuntimeError(f"load worker {p} could not connect to {target}: {err}")
            ready += 1
        counters = Counters(metrics_url).start()  # scraped outside the CPU window: the scrape costs the server CPU
        window = CpuWindow(server_pid).start()
        start_val.value = time.time() + 0.2
        start_evt.set()
        parts: list[dict[str, Any] | None] = [None] * procs
        end_deadline = time.monotonic() + duration + timeout + GRACE_S + 30
        for _ in range(procs):
            try:
                p, res, err = result_q.get(timeout=max(0.1, end_deadline - time.monotonic()))
            except queue_mod.Empty:
                raise RuntimeError("load workers did not report in time") from None
            if err:
                raise RuntimeError(f"load worker {p} failed: {err}")
            parts[p] = res
        window.stop()
        counters.stop()
    finally:
        if not start_evt.is_set():
            start_val.value = -1.0  # abort: workers return without sending anything
            start_evt.set()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)
    merged = merge_records(p for p in parts if p is not None)
    result = summarize(merged, rate, duration)
    result["loadavg_before"] = load_before  # other work on the machine shows up here
    generator_s = sum(float(p.get("cpu_s", math.nan)) for p in parts if p is not None)
    result["cpu"] = cpu_report(window, generator_s if math.isfinite(generator_s) else None, result["requests"])
    result["generator"] = "python"
    result["query_mix"] = {"mix": query_mix, "distinct": len(set(chosen)), **({"zipf_s": zipf_s} if query_mix == "zipf" else {})}
    result["query_cache"] = counters.cache()
    result["server_codes"] = counters.codes("Search" if rpc == "search" else "Recommend") or None
    result["bundles_mean_ok"] = (
        float(np.mean([b for b, c in zip(merged["bundles"], merged["code"], strict=True) if c == "OK"]))
        if result["ok"] else None
    )
    return result


def run_sweep(target: str, rates: Sequence[float], duration: float, queries: Sequence[str], *,
              p99_bound_ms: float = 50.0, must_run: Sequence[float] = (), warmup_s: float = 2.0,
              warmup_rps: float = 10.0, stop_after: int = 2, log: Any = print, **kw: Any) -> dict[str, Any]:
    """Runs increasing rates; stops after ``stop_after`` consecutive unsustainable rates, but always
    runs every rate up to the largest ``must_run`` rate (on a shared machine one noisy rate should not
    end a sweep)."""
    if warmup_s > 0:
        log(f"[{target}] warm-up {warmup_rps:g} rps x {warmup_s:g}s (discarded)")
        run_rate(target, warmup_rps, warmup_s, queries, **{**kw, "seed": kw.get("seed", 0) + 999})
    results = []
    fails_in_a_row = 0
    for i, rate in enumerate(sorted(rates)):
        if fails_in_a_row >= stop_after and not any(rate <= m for m in must_run):
            log(f"[{target}] stop: skipping {rate:g} rps and above")
            break
        res = run_rate(target, rate, duration, queries, **{**kw, "seed": kw.get("seed", 0) + i})
        ok, reasons = verdict(res, p99_bound_ms)
        res["sustainable"], res["reasons"] = ok, reasons
        results.append(res)
        log(format_row(res))
        fails_in_a_row = 0 if ok else fails_in_a_row + 1
    return {"results": results, "highest_sustainable_rps": highest_sustainable(results),
            "p99_bound_ms": p99_bound_ms}


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_cpu(r: dict[str, Any]) -> str:
    """CPU ms per call (server / generator), the cache's hit rate and the load average, for a result row."""
    c = r.get("cpu") or {}
    hit, reply, coalesced = ((r.get("query_cache") or {}).get(k) for k in ("hit_rate", "reply_hit_rate", "coalesced"))
    load = c.get("loadavg") or r.get("loadavg_before")
    return (f"  cpu ms/call srv/gen {_f(c.get('server_ms_per_call'), 2)}/{_f(c.get('generator_ms_per_call'), 2)}"
            + (f"  hits {hit:.0%}" if hit is not None else "") + (f" (replies {reply:.0%})" if reply is not None else "")
            + (f" coalesced {coalesced:.0f}" if coalesced else "")
            + (f"  load {load[0]:.1f}" if load else ""))


def format_row(r: dict[str, Any]) -> str:
    errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    mark = {True: "ok", False: "FAIL"}.get(r.get("sustainable"), "")
    return (f"  rps {r['offered_rps']:7.0f}  achieved {r['achieved_rps']:7.1f} ({r['achieved_ratio']:6.1%})"
            f"  ttfb p50/p99 {_f(r['ttfb_ms']['p50']):>7}/{_f(r['ttfb_ms']['p99']):>7} ms"
            f"  full p50/p99/max {_f(r['full_ms']['p50']):>7}/{_f(r['full_ms']['p99']):>7}/"
            f"{_f(r['full_ms']['max']):>7} ms  err {r['error_rate']:.2%} [{errs}]{format_cpu(r)} {mark}")


# ----------------------------------------------------------------------------------------------------
# Plots


def plot_latency(series: dict[str, list[dict[str, Any]]], out: str | Path, title: str = "",
                 p99_bound_ms: float | None = None) -> None:
    """Latency vs offered RPS: p50/p99 of TTFB and full stream (log y), one colour per series; beside it the
    server's and the generator's CPU milliseconds per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(13.5, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    styles = {("ttfb_ms", "p50"): ("--", "o"), ("ttfb_ms", "p99"): ("--", "^"),
              ("full_ms", "p50"): ("-", "o"), ("full_ms", "p99"): ("-", "^")}
    for c, (name, results) in enumerate(series.items()):
        xs = [r["offered_rps"] for r in results]
        for (metric, q), (ls, mk) in styles.items():
            ys = [r[metric][q] if r[metric][q] is not None else np.nan for r in results]
            label = f"{name} {'TTFB' if metric == 'ttfb_ms' else 'full'} {q}"
            ax.plot(xs, ys, ls=ls, marker=mk, color=colours[c % len(colours)], label=label,
                    alpha=0.55 if q == "p50" else 1.0)
        bad = [r["offered_rps"] for r in results if r.get("sustainable") is False]
        for x in bad:
            ax.axvline(x, color=colours[c % len(colours)], lw=0.6, ls=":", alpha=0.6)
        for key, ls, who in (("server_ms_per_call", "-", "server"), ("generator_ms_per_call", "--", "generator")):
            ys = [(r.get("cpu") or {}).get(key) for r in results]
            if any(y is not None for y in ys):
                ax_cpu.plot(xs, [np.nan if y is None else y for y in ys], ls=ls, marker="o",
                            color=colours[c % len(colours)], label=f"{name} {who}")
    if p99_bound_ms:
        ax.axhline(p99_bound_ms, color="grey", ls=":", lw=1, label=f"p99 bound {p99_bound_ms:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    rates = sorted({r["offered_rps"] for rs in series.values() for r in rs})
    if rates:
        ax.set_xticks(rates)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_title(title or "bundlerec latency vs load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax_cpu.set_xscale("log")
    ax_cpu.xaxis.set_major_formatter(ScalarFormatter())
    ax_cpu.set_xlabel("offered load (requests/s)")
    ax_cpu.set_ylabel("CPU ms per call (/proc, all threads)")
    ax_cpu.set_title("CPU per call", fontsize=10)
    ax_cpu.set_ylim(bottom=0)
    ax_cpu.grid(True, which="both", alpha=0.3)
    if ax_cpu.lines:
        ax_cpu.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# CLI


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT (127.0.0.1 only in this project)")
    p.add_argument("--rps", type=float, default=50.0, help="offered rate for a single run")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--plot", help="output PNG (latency vs RPS)")
    p.add_argument("--queries", help=f"query file (.txt one a line, or a CSV with a query column); "
                                     f"default {DEFAULT_QUERIES.name}")
    p.add_argument("--max-bundles", type=int, default=5)
    p.add_argument("--items", type=int, default=3, help="items per bundle")
    p.add_argument("--k", type=int, default=10, help="hits per Search call (--rpc search)")
    p.add_argument("--mode", choices=["default", "dense", "lexical", "hybrid"], default="default")
    p.add_argument("--procs", type=int, default=1, help="client processes")
    p.add_argument("--channels", type=int, default=2, help="grpc channels (connections) per process")
    p.add_argument("--rpc", choices=["recommend", "search"], default="recommend")
    p.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="run increasing rates")
    p.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES))
    p.add_argument("--must-run", type=_rates, default=[], help="rates run even after a failure")
    p.add_argument("--p99-bound-ms", type=float, default=50.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded warm-up load")
    p.add_argument("--health-timeout", type=float, default=60.0)
    p.add_argument("--server-pid", type=int, help="server process id: report its CPU ms per call (/proc)")
    p.add_argument("--metrics-url", help="server's Prometheus endpoint (http://127.0.0.1:PORT/): cache hit rate, codes")
    p.add_argument("--query-mix", choices=QUERY_MIXES, default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of --query-mix zipf")
    return p


MODES = {"default": 0, "dense": 1, "lexical": 2, "hybrid": 3}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.target.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        print(f"refusing non-loopback target {args.target}", file=sys.stderr)
        return 2
    queries = load_queries(args.queries)
    try:
        wait_for_health(args.target, args.health_timeout)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    kw = dict(procs=args.procs, rpc=args.rpc, max_bundles=args.max_bundles, items=args.items, k=args.k,
              mode=MODES[args.mode], seed=args.seed, timeout=args.timeout, channels=args.channels,
              server_pid=args.server_pid, metrics_url=args.metrics_url, query_mix=args.query_mix, zipf_s=args.zipf_s)
    config = {**vars(args), "queries": str(args.queries or DEFAULT_QUERIES), "n_queries": len(queries),
              "arrivals": "poisson", "percentiles": "nearest-rank over OK requests",
              "latency_origin": "scheduled send time"}
    started = time.time()
    if args.sweep:
        sw = run_sweep(args.target, args.rates, args.duration, queries, p99_bound_ms=args.p99_bound_ms,
                       must_run=args.must_run, warmup_s=args.warmup, **kw)
        results = sw["results"]
        print(f"highest sustainable rate: {sw['highest_sustainable_rps']} rps "
              f"(>=95% achieved, <1% errors, full p99 <= {args.p99_bound_ms:g} ms)")
    else:
        if args.warmup > 0:
            run_rate(args.target, min(args.rps, 10.0), args.warmup, queries, **{**kw, "seed": args.seed + 999})
        res = run_rate(args.target, args.rps, args.duration, queries, **kw)
        res["sustainable"], res["reasons"] = verdict(res, args.p99_bound_ms)
        results = [res]
        print(format_row(res))
        sw = {"results": results, "highest_sustainable_rps": highest_sustainable(results)}
    out = {"config": config, "machine": machine_info(), "started_at": started,
           "elapsed_s": time.time() - started, **sw}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot_latency({args.target: results}, args.plot, p99_bound_ms=args.p99_bound_ms,
                     title=f"{args.rpc} on {args.target}")
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

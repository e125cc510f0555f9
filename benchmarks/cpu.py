"""What a server spent during a measured window: CPU time from ``/proc`` and counters from its ``/metrics``.

CPU is user + system time of every thread of the process (``/proc/PID/stat`` fields 14 and 15 hold the
whole thread group's, including threads that already ended) plus its live descendants' (``--workers N``).
CPU milliseconds per call drift far less with the machine's neighbours than wall-clock latency does, so they
are the first figure every server setting is judged by (issue 13). Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, so index i = field i + 3


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), in seconds; None if it is gone or /proc is missing."""
    f = _stat_fields(pid)
    return None if f is None else (int(f[11]) + int(f[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from each process's parent id in /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and (f := _stat_fields(int(entry.name))) is not None:
            parent[int(entry.name)] = int(f[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants (None if ``pid`` is gone)."""
    own = process_cpu_s(pid)
    if own is None:
        return None
    return own + sum(process_cpu_s(c) or 0.0 for c in descendants(pid))


def self_cpu_s() -> float:
    """This process's CPU seconds, all threads (a load generator measures itself with it)."""
    return time.process_time()


@dataclass
class CpuWindow:
    """Server CPU over a window: ``start()`` before the first call, ``stop()`` after the last one ended."""

    pid: int | None
    t0: float = 0.0
    cpu0: float | None = None
    wall_s: float = 0.0
    cpu_s: float | None = None

    def start(self) -> CpuWindow:
        self.t0, self.cpu0 = time.monotonic(), tree_cpu_s(self.pid) if self.pid else None
        return self

    def stop(self) -> CpuWindow:
        self.wall_s = time.monotonic() - self.t0
        end = tree_cpu_s(self.pid) if self.pid else None
        self.cpu_s = end - self.cpu0 if end is not None and self.cpu0 is not None else None
        return self


def per_call(cpu_s: float | None, calls: int) -> float | None:
    """Milliseconds of CPU per call."""
    return cpu_s * 1000.0 / calls if cpu_s is not None and calls > 0 else None


def cpu_report(server: CpuWindow, generator_s: float | None, calls: int) -> dict[str, Any]:
    """The CPU figures of one measured run, beside its latency: server and generator ms per call."""
    return {
        "calls": calls,
        "window_s": server.wall_s,
        "server_s": server.cpu_s,
        "server_ms_per_call": per_call(server.cpu_s, calls),
        "server_cores": server.cpu_s / server.wall_s if server.cpu_s is not None and server.wall_s > 0 else None,
        "generator_s": generator_s,
        "generator_ms_per_call": per_call(generator_s, calls),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------------------------------
# Prometheus counters (the server's --metrics-port)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and (m := _SAMPLE.match(line)):
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def scrape(url: str | None, timeout: float = 5.0) -> dict[str, float] | None:
    """The server's metrics now (None without a URL or when it does not answer); loopback only."""
    if not url:
        return None
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ValueError(f"metrics URL must be on loopback: {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only, checked above
            return parse_metrics(resp.read().decode())
    except OSError:
        return None


@dataclass
class Counters:
    """Deltas of the server's counters over a window: the query cache's hits and misses, calls by code."""

    url: str | None
    before: dict[str, float] | None = None
    delta: dict[str, float] = field(default_factory=dict)

    def start(self) -> Counters:
        self.before = scrape(self.url)
        return self

    def stop(self) -> Counters:
        after = scrape(self.url)
        if self.before is not None and after is not None:
            self.delta = {k: v - self.before.get(k, 0.0) for k, v in after.items() if k.endswith("_total") or "_total{" in k}
        return self

    def cache(self) -> dict[str, float | None] | None:
        if not self.delta:
            return None
        hits = self.delta.get("bundlerec_query_cache_hits_total", 0.0)
        misses = self.delta.get("bundlerec_query_cache_misses_total", 0.0)
        # a reply-cache hit (Recommend or Search) skips the query cache's lookup: it counts as a hit of the query
        # (nothing encoded); the reply rate is the Recommend reply cache's, else the Search one's
        reply_hits, reply_misses = (self.delta.get(f"bundlerec_reply_cache_{k}_total", 0.0) for k in ("hits", "misses"))
        if not reply_hits + reply_misses:
            reply_hits, reply_misses = (self.delta.get(f"bundlerec_search_cache_{k}_total", 0.0) for k in ("hits", "misses"))
        coalesced = sum(self.delta.get(f"bundlerec_{c}_cache_coalesced_total", 0.0) for c in ("query", "reply", "search"))
        lookups = hits + misses + reply_hits
        return {"hits": hits + reply_hits, "misses": misses, "hit_rate": (hits + reply_hits) / lookups if lookups else None,
                "reply_hits": reply_hits, "reply_misses": reply_misses,
                "reply_hit_rate": reply_hits / (reply_hits + reply_misses) if reply_hits + reply_misses else None,
                "coalesced": coalesced}

    def codes(self, method: str = "Recommend") -> dict[str, int]:
        """Calls of ``method`` by final gRPC status code, as the server counted them."""
        pat = re.compile(r'^bundlerec_requests_total\{(?=.*method="' + method + r'")(?=.*code="([A-Z_]+)").*\}$')
        out = {}
        for key, v in self.delta.items():
            if (m := pat.match(key)) and v:
                out[m.group(1)] = int(round(v))
        return out

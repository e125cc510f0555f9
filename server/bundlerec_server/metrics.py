"""Prometheus metrics (``--metrics-port``; 0 = off). Names follow Prometheus conventions.

With ``--workers N`` the workers write their metrics to files in one folder (prometheus-client's multiprocess
mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` in each worker's environment) and the supervising parent
serves their aggregate on the one metrics port: counters and histograms summed over every worker that ever
ran, gauges summed over the live ones (a worker's gauges go when it exits).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0)

REQUESTS = Counter("bundlerec_requests_total", "Calls by method and final gRPC status code", ["method", "code"])
LATENCY = Histogram("bundlerec_request_seconds", "Server-side call latency by method", ["method"], buckets=LATENCY_BUCKETS)
FIRST_BUNDLE = Histogram("bundlerec_first_bundle_seconds", "Time from request to the first bundle handed to gRPC", buckets=LATENCY_BUCKETS)
STOPS = Counter("bundlerec_recommend_stops_total", "Recommend streams by stop reason", ["reason"])
BATCH_SIZE = Histogram("bundlerec_encoder_batch_size", "Queries per encoder run", buckets=(1, 2, 4, 8, 16, 32, 64))
DROPPED = Counter("bundlerec_encoder_dropped_total", "Queries dropped before encoding (caller cancelled or out of time)")
SHED = Counter("bundlerec_shed_total", "Calls refused with RESOURCE_EXHAUSTED by admission control")
IN_FLIGHT = Gauge("bundlerec_in_flight", "Calls being worked on", multiprocess_mode="livesum")
ADMISSION_LIMIT = Gauge("bundlerec_admission_limit", "Calls admitted at once (adapts with --target-latency-ms)",
                        multiprocess_mode="livesum")
EVENTS = Counter("bundlerec_events_total", "Events stored durably")
RERANKS = Counter("bundlerec_rerank_total", "Calls that asked for cross-encoder re-ranking, by outcome", ["outcome"])
RELOADS = Counter("bundlerec_reloads_total", "Artifact reload attempts by outcome", ["outcome"])


def serve_metrics(port: int, host: str = "127.0.0.1", multiproc_dir: Path | None = None) -> None:
    """Serves /metrics: this process's registry, or the aggregate of the processes writing to
    ``multiproc_dir`` (default: ``PROMETHEUS_MULTIPROC_DIR`` when set)."""
    path = multiproc_dir or os.environ.get(MULTIPROC_ENV)
    registry = REGISTRY
    if path:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


class MultiprocDir:
    """The folder the workers' metric files go to: ``wanted`` (or ``PROMETHEUS_MULTIPROC_DIR``), emptied of
    old files, or a fresh temporary folder removed by :meth:`close`. Old files would add a previous run's
    counts to this one's."""

    def __init__(self, wanted: Path | None = None) -> None:
        wanted = wanted or (Path(os.environ[MULTIPROC_ENV]) if os.environ.get(MULTIPROC_ENV) else None)
        self.owned = wanted is None
        self.path = Path(tempfile.mkdtemp(prefix="bundlerec-metrics-")) if wanted is None else wanted
        self.path.mkdir(parents=True, exist_ok=True)
        for old in self.path.glob("*.db"):
            old.unlink()

    def worker_env(self) -> dict[str, str]:
        return {MULTIPROC_ENV: str(self.path)}

    def process_dead(self, pid: int) -> None:
        """Drops an exited worker's live gauges (its counters and histograms stay in the totals)."""
        multiprocess.mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)

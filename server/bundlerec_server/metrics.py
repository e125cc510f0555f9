"""Prometheus metrics (``--metrics-port``; 0 = off). Names follow Prometheus conventions."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0)

REQUESTS = Counter("bundlerec_requests_total", "Calls by method and final gRPC status code", ["method", "code"])
LATENCY = Histogram("bundlerec_request_seconds", "Server-side call latency by method", ["method"], buckets=LATENCY_BUCKETS)
FIRST_BUNDLE = Histogram("bundlerec_first_bundle_seconds", "Time from request to the first bundle handed to gRPC", buckets=LATENCY_BUCKETS)
STOPS = Counter("bundlerec_recommend_stops_total", "Recommend streams by stop reason", ["reason"])
BATCH_SIZE = Histogram("bundlerec_encoder_batch_size", "Queries per encoder run", buckets=(1, 2, 4, 8, 16, 32, 64))
DROPPED = Counter("bundlerec_encoder_dropped_total", "Queries dropped before encoding (caller cancelled or out of time)")
SHED = Counter("bundlerec_shed_total", "Calls refused with RESOURCE_EXHAUSTED by admission control")
IN_FLIGHT = Gauge("bundlerec_in_flight", "Calls being worked on")
ADMISSION_LIMIT = Gauge("bundlerec_admission_limit", "Calls admitted at once (adapts with --target-latency-ms)")
EVENTS = Counter("bundlerec_events_total", "Events stored durably")
RELOADS = Counter("bundlerec_reloads_total", "Artifact reload attempts by outcome", ["outcome"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host)

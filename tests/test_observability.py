"""Observability across processes: the workers' Prometheus metrics aggregated on one port, and OpenTelemetry
tracing (W3C traceparent from gRPC metadata, one server span per call and a child span per step), off unless
configured."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread, server_process, server_settings, wait_all_workers
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.procs import free_port
from bundlerec import BundleRecError, Client
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server import tracing
from bundlerec_server.metrics import MultiprocDir
from bundlerec_server.settings import Settings

TRACE_ID, PARENT_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
SERVER_SPAN = "bundlerec.v1.BundleRecommender/Recommend"


# --------------------------------------------------------------------------------------------- metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def recommend_ok(samples: dict) -> float:
    return samples.get(("bundlerec_requests_total", (("code", "OK"), ("method", "Recommend"))), 0.0)


def per_worker_recommends(metrics_dir: Path, scratch: Path) -> dict[int, float]:
    """Recommend calls counted by each worker: its own counter file read alone."""
    out = {}
    for f in sorted(metrics_dir.glob("counter_*.db")):
        one = scratch / f.stem
        one.mkdir()
        shutil.copy(f, one)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(one))
        out[int(f.stem.rsplit("_", 1)[1])] = registry.get_sample_value(
            "bundlerec_requests_total", {"method": "Recommend", "code": "OK"}) or 0.0
    return out


def test_workers_metrics_are_aggregated_on_one_port(tiny_artifact, tmp_path):
    """--workers 2 --metrics-port P: N calls over fresh connections land on both workers, and the one endpoint
    counts exactly N; a killed worker's counts stay in the totals while its gauges leave them."""
    n, metrics_port, metrics_dir = 24, free_port(), tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale: a previous run's file is removed at start")
    proc = server_process(tiny_artifact, "--workers", "2", "--metrics-port", str(metrics_port),
                          "--metrics-dir", str(metrics_dir), port=free_port()).wait_serving()
    try:
        wait_all_workers(proc.target)
        for _ in range(n):  # a fresh connection each: SO_REUSEPORT spreads them over the workers
            with Client(proc.target) as c:
                assert len(list(c.recommend("snacks"))) > 0
        samples = scrape(metrics_port)
        assert recommend_ok(samples) == n
        assert samples[("bundlerec_admission_limit", ())] == 2 * Settings().max_in_flight  # live workers summed
        assert samples[("bundlerec_in_flight", ())] == 0
        split = per_worker_recommends(metrics_dir, tmp_path)
        print(f"Recommend calls per worker: {split}")
        assert len(split) == 2 and all(v > 0 for v in split.values()) and sum(split.values()) == n

        victim = int(subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while list(metrics_dir.glob(f"gauge_livesum_{victim}.db")):
            assert time.monotonic() < deadline, "the supervisor never marked the dead worker"
            time.sleep(0.1)
        samples = scrape(metrics_port)
        assert recommend_ok(samples) == n  # counters never go back
        assert samples[("bundlerec_admission_limit", ())] == Settings().max_in_flight  # one live worker
    finally:
        proc.stop()


def test_a_multiproc_dir_starts_empty_and_a_temporary_one_is_removed(tmp_path):
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    given = MultiprocDir(tmp_path)
    assert not list(tmp_path.glob("*.db")) and (tmp_path / "notes.txt").exists()
    given.close()
    assert tmp_path.exists()  # not ours to remove
    temporary = MultiprocDir()
    assert temporary.worker_env() == {"PROMETHEUS_MULTIPROC_DIR": str(temporary.path)} and temporary.path.is_dir()
    temporary.close()
    assert not temporary.path.exists()


# --------------------------------------------------------------------------------------------- tracing


@pytest.fixture()
def spans():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.enable(exporter)
    yield exporter
    tracing.disable()


@pytest.fixture()
def traced_server(tiny_artifact, tmp_path, spans):
    srv = ServerThread(server_settings(tiny_artifact, events_db=tmp_path / "events.sqlite3")).start()
    yield srv
    srv.stop()


def finished(exporter, name: str, timeout: float = 5.0):
    """The exported spans once the one named ``name`` has ended (the server span ends as the call does)."""
    deadline = time.monotonic() + timeout
    while True:
        got = exporter.get_finished_spans()
        if any(s.name == name for s in got):
            return got
        assert time.monotonic() < deadline, f"no span {name}: {[s.name for s in got]}"
        time.sleep(0.02)


def test_a_call_with_a_traceparent_continues_the_callers_trace(traced_server, spans):
    from opentelemetry.trace import SpanKind, StatusCode

    with grpc.insecure_channel(traced_server.target) as channel:
        stream = pb_grpc.BundleRecommenderStub(channel).Recommend(
            pb.RecommendRequest(query="organic snacks", user_id="traced", max_bundles=3),
            metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=1")), timeout=10)
        messages = list(stream)
    bundles = sum(m.HasField("bundle") for m in messages)
    got = finished(spans, SERVER_SPAN)
    server = next(s for s in got if s.name == SERVER_SPAN)
    assert server.kind is SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID
    assert server.parent is not None and server.parent.span_id == PARENT_ID and server.parent.is_remote
    assert server.context.trace_state.to_header() == "vendor=1"
    assert dict(server.attributes) == {"rpc.system": "grpc", "rpc.service": "bundlerec.v1.BundleRecommender",
                                       "rpc.method": "Recommend", "rpc.grpc.status_code": 0}
    assert server.status.status_code is StatusCode.UNSET
    children = {s.name: s for s in got if s is not server}
    assert set(children) == {"admission", "history", "encode", "retrieve", "bundle", "stream"}
    for child in children.values():
        assert child.context.trace_id == TRACE_ID and child.parent.span_id == server.context.span_id
        assert server.start_time <= child.start_time and child.end_time <= server.end_time
    assert children["stream"].attributes["bundlerec.bundles_sent"] == bundles > 0
    assert children["stream"].attributes["bundlerec.stop_reason"] == "complete"
    order = sorted(children, key=lambda name: children[name].start_time)
    assert order == ["admission", "history", "encode", "retrieve", "bundle", "stream"]


def test_a_refused_call_records_its_status_code(traced_server, spans):
    from opentelemetry.trace import StatusCode

    with Client(traced_server.target) as c, pytest.raises(BundleRecError) as err:
        list(c.recommend("x" * 600))  # longer than --max-query-chars
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    server = next(s for s in finished(spans, SERVER_SPAN) if s.name == SERVER_SPAN)
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert server.parent is None  # no traceparent: a trace of its own
    assert server.status.status_code is StatusCode.UNSET  # the caller's mistake, not the server's


def test_a_stream_cancelled_by_the_caller_ends_its_span_as_cancelled(traced_server, spans, caplog):
    """gRPC closes a cancelled stream's handler later, from another context: the server span (never attached
    across a yield) still ends, as CANCELLED in both the span and the metrics, and no context is left over."""
    from prometheus_client import REGISTRY

    def count(code: str) -> float:
        return REGISTRY.get_sample_value("bundlerec_requests_total", {"method": "Recommend", "code": code}) or 0.0

    n, before = 10, {code: count(code) for code in ("OK", "CANCELLED")}
    with grpc.insecure_channel(traced_server.target) as channel:
        stub = pb_grpc.BundleRecommenderStub(channel)
        for _ in range(n):
            call = stub.Recommend(pb.RecommendRequest(query="organic snacks", max_bundles=50), timeout=10)
            next(call)
            call.cancel()
    deadline = time.monotonic() + 5
    while len([s for s in spans.get_finished_spans() if s.name == SERVER_SPAN]) < n:
        assert time.monotonic() < deadline, "a cancelled call's server span never ended"
        time.sleep(0.05)
    codes = [s.attributes["rpc.grpc.status_code"] for s in spans.get_finished_spans() if s.name == SERVER_SPAN]
    cancelled = codes.count(grpc.StatusCode.CANCELLED.value[0])
    assert cancelled >= 1 and cancelled + codes.count(0) == n  # a stream may finish before the cancel arrives
    assert count("CANCELLED") - before["CANCELLED"] == cancelled and count("OK") - before["OK"] == n - cancelled
    assert "Failed to detach context" not in caplog.text


def test_the_client_passes_a_callers_traceparent(traced_server, spans):
    with Client(traced_server.target) as c:
        bundles = list(c.recommend("organic snacks", max_bundles=2, metadata=(("traceparent", TRACEPARENT),)))
        c.search("organic", 3, metadata=(("traceparent", TRACEPARENT),))
    finished(spans, SERVER_SPAN)
    got = finished(spans, "bundlerec.v1.BundleRecommender/Search")
    servers = [s for s in got if s.name in (SERVER_SPAN, "bundlerec.v1.BundleRecommender/Search")]
    assert bundles and len(servers) == 2
    assert all(s.context.trace_id == TRACE_ID and s.parent is not None and s.parent.span_id == PARENT_ID for s in servers)


def test_unary_calls_get_a_server_span_too(traced_server, spans):
    with Client(traced_server.target) as c:
        c.search("organic", 3)
    got = finished(spans, "bundlerec.v1.BundleRecommender/Search")
    assert sorted(s.name for s in got) == sorted(["bundlerec.v1.BundleRecommender/Search", "admission", "encode", "retrieve"])


def test_tracing_off_creates_no_spans_and_calls_no_opentelemetry(client, monkeypatch):
    from opentelemetry import propagate
    from opentelemetry.sdk.trace import Tracer

    assert not tracing.enabled()
    calls = []
    monkeypatch.setattr(propagate, "extract", lambda *a, **k: calls.append("extract"))
    monkeypatch.setattr(Tracer, "start_span", lambda *a, **k: calls.append("start_span"))
    monkeypatch.setattr(Tracer, "start_as_current_span", lambda *a, **k: calls.append("start_as_current_span"))
    list(client.recommend("snacks", user_id="untraced"))
    client.search("organic", 2)
    assert calls == []
    assert tracing.span("x") is tracing.span("y")  # one shared no-op, nothing made per call


def test_tracing_off_does_not_even_import_opentelemetry():
    code = ("import sys, bundlerec_server.app, bundlerec_server.service, bundlerec_server.__main__;"
            "sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tracing_settings():
    assert Settings().tracing == "off"
    assert Settings.load(["--tracing", "console", "--tracing-service-name", "shop"]).tracing_service_name == "shop"
    with pytest.raises(ValueError, match="tracing 'jaeger'"):
        Settings.load([], env={"BUNDLEREC_TRACING": "jaeger"})
    assert tracing.configure(Settings()) is False and not tracing.enabled()


def test_console_tracing_prints_spans(capsys):
    try:
        assert tracing.configure(Settings(tracing="console", tracing_service_name="shop"))
        with tracing.span("probe"):
            pass
    finally:
        tracing.disable()  # flushes the batch
    out = capsys.readouterr().out
    assert '"name": "probe"' in out and '"service.name": "shop"' in out


class Collector:
    """A minimal OTLP/gRPC trace collector on loopback: keeps what it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        received = self.received = []

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                received.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self):
        return [s for r in self.received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_otlp_tracing_from_a_server_process(tiny_artifact):
    """A real server process with --tracing otlp exports its spans (with the caller's trace id) to a collector."""
    collector = Collector()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    proc = server_process(tiny_artifact, "--tracing", "otlp", "--tracing-service-name", "shop", env=env).wait_serving()
    try:
        with grpc.insecure_channel(proc.target) as channel:
            list(pb_grpc.BundleRecommenderStub(channel).Recommend(
                pb.RecommendRequest(query="organic snacks"), metadata=(("traceparent", TRACEPARENT),), timeout=10))
        assert proc.stop() == 0  # drain, then the exporter flushes
        got = collector.spans()
        assert {s.name for s in got} >= {SERVER_SPAN, "admission", "encode", "retrieve", "bundle", "stream"}
        assert {s.trace_id for s in got} == {TRACE_ID.to_bytes(16, "big")}
        resource = collector.received[0].resource_spans[0].resource
        assert any(a.key == "service.name" and a.value.string_value == "shop" for a in resource.attributes)
    finally:
        proc.stop()
        collector.server.stop(0)

"""Server assembly and lifecycle: grpc.aio server, health, reflection, loading, signals, drain."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

from .artifact import MANIFEST
from .events import open_event_store
from .metrics import serve_metrics
from .runtime import Runtime
from .security import BearerTokenInterceptor, server_credentials
from .service import SERVICE_NAME, BundleRecommenderServicer
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    runtime: Runtime
    health: health.aio.HealthServicer
    _refused_version: str | None = None
    _watcher: asyncio.Task[None] | None = None
    _lag_watch: asyncio.Task[None] | None = None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def load(self) -> None:
        """Loads + warms the configured artifact off the event loop, then reports SERVING."""
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(None, self.runtime.load, self.runtime.settings.artifact)
        self.runtime.swap(engine)
        await self.set_serving(True)
        logger.info("serving artifact %s on port %d", engine.version, self.port)
        if self.runtime.settings.watch_interval_s > 0:
            self._watcher = asyncio.create_task(self.watch(self.runtime.settings.watch_interval_s))
        if self.runtime.settings.target_latency_ms > 0:
            self._lag_watch = asyncio.create_task(self.runtime.admission.watch_loop())

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls finish within the grace period."""
        await self.set_serving(False)
        for task in (self._watcher, self._lag_watch):
            if task is not None:
                task.cancel()
        await self.server.stop(self.runtime.settings.grace_s if grace is None else grace)
        if self.runtime.events is not None:
            await self.runtime.events.close()
        await self.runtime.close()

    async def watch(self, interval_s: float) -> None:
        """Polls the artifact path's manifest; a new artifact_version triggers a hot reload."""
        path = Path(self.runtime.settings.artifact) / MANIFEST
        while True:
            await asyncio.sleep(interval_s)
            try:
                version = json.loads(path.read_text()).get("artifact_version")
            except (OSError, ValueError):
                continue  # mid-swap or missing: try again next round
            current = self.runtime.engine().version if self.runtime.ready else None
            if version and version != current and version != self._refused_version:
                if not await self.runtime.reload():
                    self._refused_version = version


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.max_connection_age_s > 0:  # GOAWAY after the age (gRPC adds jitter): clients reconnect, rebalance
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000))]
    return options


async def create_server(settings: Settings) -> App:
    """Builds the server (not started, model not loaded); binds ``settings.port`` (0 = a free port)."""
    runtime = Runtime(settings)
    interceptors = [BearerTokenInterceptor(settings.token())] if settings.token() else []
    # gRPC core refuses calls beyond in-flight + queue + headroom (for health/GetInfo/events) before any
    # Python runs: the cheapest possible shedding under extreme load; our own admission (with RetryInfo)
    # sheds first in normal overload.
    server = grpc.aio.server(
        options=server_options(settings), interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_in_flight + settings.max_queue + 32,
    )
    # the generated gRPC module carries no annotations
    pb_grpc.add_BundleRecommenderServicer_to_server(BundleRecommenderServicer(runtime), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    creds = server_credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    if settings.events_db:
        runtime.events = open_event_store(settings.events_db, recent_per_user=settings.recent_events_per_user,
                                          shared=settings.shared_events, counts_per_user=settings.purchase_counts_per_user,
                                          half_life_days=settings.count_half_life_days)
        await runtime.events.start()
    app = App(server, port, runtime, health_servicer)
    await app.set_serving(False)
    logger.info(
        "bound %s:%d (%s%s)", settings.host, port, "mutual TLS" if settings.tls_client_ca else "TLS" if creds else "plaintext",
        ", bearer token required" if interceptors else "",
    )
    return app


async def serve(settings: Settings) -> None:
    app = await create_server(settings)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.metrics_host)
        logger.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    await app.server.start()
    logger.info("listening on %s:%d (NOT_SERVING until the model is loaded)", settings.host, app.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(app.runtime.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loader = asyncio.create_task(app.load())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failure = loader.exception() if loader.done() else None
    if failure is not None:
        await app.stop(0)
        raise failure
    await stopper
    logger.info("shutdown signal: NOT_SERVING, draining in-flight calls (grace %.1fs)", settings.grace_s)
    loader.cancel()
    await app.stop()
    logger.info("stopped")

"""Server assembly and lifecycle: grpc.aio server, health, reflection, loading, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .runtime import Runtime
from .service import BundleRecommenderServicer
from .settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BundleRecommender"].full_name


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    runtime: Runtime
    health: health.aio.HealthServicer

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

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls finish within the grace period."""
        await self.set_serving(False)
        await self.server.stop(self.runtime.settings.grace_s if grace is None else grace)
        self.runtime.close()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def create_server(settings: Settings) -> App:
    """Builds the server (not started, model not loaded); binds ``settings.port`` (0 = a free port)."""
    runtime = Runtime(settings)
    server = grpc.aio.server(options=server_options(settings))
    pb_grpc.add_BundleRecommenderServicer_to_server(BundleRecommenderServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    app = App(server, port, runtime, health_servicer)
    await app.set_serving(False)
    return app


async def serve(settings: Settings) -> None:
    app = await create_server(settings)
    await app.server.start()
    logger.info("listening on %s:%d (NOT_SERVING until the model is loaded)", settings.host, app.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(app.load())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        await app.stop(0)
        raise loader.exception()
    await stopper
    logger.info("shutdown signal: NOT_SERVING, draining in-flight calls (grace %.1fs)", settings.grace_s)
    loader.cancel()
    await app.stop()
    logger.info("stopped")

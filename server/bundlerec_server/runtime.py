"""Everything a call needs besides its request: the current engine, the worker threads, admission, events.

Holds the engine by reference: a hot reload swaps :attr:`engine` atomically and calls that already took
the old one finish on it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import metrics
from .admission import Admission
from .batching import MicroBatcher
from .engine import Engine
from .errors import NotReady
from .settings import Settings

logger = logging.getLogger(__name__)


class OutOfTime(Exception):
    """The call's deadline (minus the margin) arrived before the work finished."""


def settle_heap() -> None:
    """Takes everything alive now (a loaded artifact is tens of thousands of long-lived objects) out of the
    cyclic garbage collector's full passes (``gc.freeze``, CPython's remedy for a large long-lived heap). A full
    pass over the demo artifact stalls the event loop ≈ 25–30 ms, several times a minute under load: a p99
    spike for every call in flight. Frozen objects are still freed by reference counting, so an engine
    replaced by a reload goes away as soon as its last call finishes (an Engine holds no reference cycles)."""
    gc.collect()  # the load's own garbage, so that it is not frozen
    gc.freeze()


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self.pool = ThreadPoolExecutor(max_workers=settings.encode_workers, thread_name_prefix="encode")
        self.admission = Admission(settings.max_in_flight, settings.max_queue,
                                   target_latency_s=settings.target_latency_ms / 1000,
                                   queue_target_s=settings.queue_target_ms / 1000)
        self.events = None  # an EventStore when configured
        self._reload_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._engine is not None

    def engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise NotReady("the model is still loading; retry shortly")
        return engine

    def load(self, root: Path) -> Engine:
        """Loads and warms an artifact (blocking: call from a worker thread); does not swap it in."""
        engine = Engine(root, self.settings)
        engine.warmup()
        settle_heap()
        return engine

    def swap(self, engine: Engine) -> Engine | None:
        """Makes ``engine`` current (with its own micro-batcher); calls holding the old one finish on it."""
        batch = self.settings.max_batch if engine.batch_exact else 1
        batcher = MicroBatcher(
            engine.encoder.encode, self.pool, max_batch=batch, max_wait_s=self.settings.max_batch_wait_ms / 1000,
            workers=self.settings.encode_workers,
        )
        engine.batcher = batcher  # calls still holding an old engine keep using its batcher
        old, self._engine = self._engine, engine
        if old is not None and getattr(old, "batcher", None) is not None:
            old.batcher.retire()  # its task ends once idle, so the old engine can be freed
        if not engine.batch_exact and self.settings.max_batch > 1:
            logger.warning("encoder graph %s is not batch-exact: micro-batching disabled (one query per run)", engine.variant)
        return old

    async def encode(self, engine: Engine, text: str, time_left: Callable[[], float | None] | None) -> np.ndarray:
        """Embeds one query through the engine's micro-batcher; OutOfTime if the deadline comes first
        (the query is then dropped from the queue if its batch has not started: no encoder work)."""
        batcher = engine.batcher
        left = time_left() if time_left else None
        if left is None:
            return await batcher.submit(text)
        budget = left - self.settings.deadline_margin_ms / 1000.0
        if budget <= 0:
            raise OutOfTime()
        try:
            async with asyncio.timeout(budget):  # no extra task, unlike wait_for
                return await batcher.submit(text)
        except TimeoutError:
            raise OutOfTime() from None

    async def reload(self, root: Path | None = None) -> bool:
        """Loads ``root`` (default: the configured artifact path, re-resolved) in the background and swaps it
        in atomically. A corrupt or incompatible artifact is refused and the current version keeps serving."""
        root = Path(root or self.settings.artifact)
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                engine = await loop.run_in_executor(None, self.load, root)
            except Exception as exc:  # ArtifactError and anything a broken file provokes
                current = self._engine.version if self._engine else "none"
                logger.error("reload of %s refused, still serving %s: %s", root, current, exc)
                metrics.RELOADS.labels("refused").inc()
                return False
            old = self.swap(engine)
            metrics.RELOADS.labels("loaded").inc()
            logger.info("hot reload: now serving %s (was %s)", engine.version, old.version if old else "none")
            return True

    async def close(self) -> None:
        if self._engine is not None and getattr(self._engine, "batcher", None) is not None:
            await self._engine.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

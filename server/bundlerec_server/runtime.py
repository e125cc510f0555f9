"""Everything a call needs besides its request: the current engine, the worker threads, admission, events.

Holds the engine by reference: a hot reload swaps :attr:`engine` atomically and calls that already took
the old one finish on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .admission import Admission
from .engine import Engine
from .errors import NotReady
from .settings import Settings

logger = logging.getLogger(__name__)


class OutOfTime(Exception):
    """The call's deadline (minus the margin) arrived before the work finished."""


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self.pool = ThreadPoolExecutor(max_workers=settings.encode_workers, thread_name_prefix="encode")
        self.admission = Admission(settings.max_in_flight, settings.max_queue)
        self.events = None  # an EventStore when configured
        self.started_at = time.time()
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
        return engine

    def swap(self, engine: Engine) -> Engine | None:
        old, self._engine = self._engine, engine
        return old

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
                return False
            old = self.swap(engine)
            logger.info("hot reload: now serving %s (was %s)", engine.version, old.version if old else "none")
            return True

    async def run(self, fn: Callable, *args, time_left: Callable[[], float | None] | None = None):
        """Runs blocking ``fn`` in the worker pool; raises OutOfTime if the call's deadline comes first."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, fn, *args)
        left = time_left() if time_left else None
        if left is None:
            return await fut
        budget = left - self.settings.deadline_margin_ms / 1000.0
        if budget <= 0:
            fut.cancel()
            raise OutOfTime()
        try:
            return await asyncio.wait_for(fut, timeout=budget)
        except asyncio.TimeoutError:
            raise OutOfTime() from None

    def encode_query(self, engine: Engine, text: str) -> np.ndarray:
        return engine.encoder.encode([text])[0]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

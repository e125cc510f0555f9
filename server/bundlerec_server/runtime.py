"""Everything a call needs besides its request: what is serving, the worker threads, admission, events.

The current engine and its micro-batcher form one :class:`Serving` pair; a hot reload swaps the pair
atomically, and calls that already took the old pair finish on it (old engine, old batcher).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics, tracing
from .admission import Admission
from .batching import MicroBatcher, Then
from .domain import Hit, RerankOutcome
from .engine import Engine
from .errors import NotReady, OutOfTime
from .events import EventStore
from .query_cache import QueryCache, ReplyCache, for_engine, replies_for
from .settings import Settings

logger = logging.getLogger(__name__)

TimeLeft = Callable[[], float | None]


def _filling(cache: QueryCache, text: str, then: Then | None) -> Then:
    """``then`` after storing the encoder's vector in ``cache`` (``then`` gets the cached, read-only copy)."""
    if then is None:
        return functools.partial(cache.put, text)
    return lambda vec: then(cache.put(text, vec))


def _traced(then: Then) -> Then:
    """``then`` running in the call's tracing context (spans started in a worker are children of the call's)."""
    if not tracing.enabled():
        return then
    return functools.partial(contextvars.copy_context().run, then)  # type: ignore[call-arg]


def settle_heap() -> None:
    """Takes everything alive now out of the cyclic GC's full passes (``gc.freeze``), which would otherwise
    stall the event loop while walking the artifact (see docs/server-notes.md). Frozen objects are still
    freed by reference counting, so an engine holds no reference cycles."""
    gc.collect()  # the load's own garbage, so that it is not frozen
    gc.freeze()


@dataclass(frozen=True)
class Serving:
    """An engine, the micro-batcher in front of its encoder, its query cache and its reply cache (None: off):
    taken together by a call, swapped together (a reload starts with empty caches)."""

    engine: Engine
    batcher: MicroBatcher
    cache: QueryCache | None = None
    replies: ReplyCache | None = None


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._serving: Serving | None = None
        self.pool = ThreadPoolExecutor(max_workers=settings.encode_workers, thread_name_prefix="encode")
        # the cross-encoder stage (tens of ms a run) has its own thread, so it never holds up the encode workers
        self.rerank_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self.admission = Admission(settings.max_in_flight, settings.max_queue,
                                   target_latency_s=settings.target_latency_ms / 1000,
                                   queue_target_s=settings.queue_target_ms / 1000)
        self.events: EventStore | None = None
        self._reload_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._serving is not None

    def serving(self) -> Serving:
        """What serves a call now (take it once per call); NotReady until the first artifact is loaded."""
        serving = self._serving
        if serving is None:
            raise NotReady("the model is still loading; retry shortly")
        return serving

    def engine(self) -> Engine:
        return self.serving().engine

    def load(self, root: Path) -> Engine:
        """Loads and warms an artifact (blocking: call from a worker thread); does not swap it in. The path is
        resolved once, so a symlink (``/artifacts/current``) switched during the load cannot mix two versions."""
        engine = Engine(Path(root).resolve(), self.settings)
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
        cache = for_engine(engine, self.settings.query_cache_size)
        replies = replies_for(cache) if self.settings.reply_cache else None
        old, self._serving = self._serving, Serving(engine, batcher, cache, replies)
        if old is not None:
            old.batcher.retire()  # calls still holding the old pair keep using it; its task ends once idle
        if not engine.batch_exact and self.settings.max_batch > 1:
            logger.warning("encoder graph %s is not batch-exact: micro-batching disabled (one query per run)", engine.variant)
        return old.engine if old is not None else None

    async def encode(self, serving: Serving, text: str, time_left: TimeLeft | None) -> np.ndarray:
        """Embeds one query: from the snapshot's query cache, else through its micro-batcher (then cached);
        OutOfTime if the deadline comes first (the query is then dropped from the queue if its batch has not
        started: no encoder work). With the cache on, the vector is read-only, and a hit is returned even when
        the encoding budget is spent (it costs no encoder work)."""
        cache = serving.cache
        if cache is not None:
            vec = cache.get(text)
            if vec is not None:
                return vec
        return await self.call(serving, text, None, time_left, lookup=False)  # type: ignore[no-any-return]

    async def call(self, serving: Serving, text: str | None, then: Then | None, time_left: TimeLeft | None,
                   *, lookup: bool = True) -> Any:
        """``then(vector of text)`` in an encode worker, right after the batch that encodes ``text`` (one hop
        per call; ``text`` None: ``then(None)``, no encoding). The vector comes from the snapshot's query cache
        when it holds the text (``then`` then runs on the event loop, or in a worker without encoding when
        ``cache_hits_on_loop`` is off), and a miss fills it. With ``encode_inline``, a miss of the only call in
        flight that finds the batcher idle is encoded and worked on right here, on the event loop. OutOfTime if the deadline (less the margin) comes
        before the result; the job is then dropped if its batch has not
        started, and its ``then`` skipped if it has not run yet."""
        batcher, cache = serving.batcher, serving.cache
        vec = cache.get(text) if text is not None and cache is not None and lookup else None
        budget = self.budget(time_left)
        if text is None or vec is not None:  # nothing to encode
            if then is None:
                return vec
            if vec is not None and self.settings.cache_hits_on_loop:
                return then(vec)  # a hit: run it right here on the loop, no hop
            job = batcher.run(vec, _traced(then))
        elif self.settings.encode_inline and self.admission.in_flight <= 1 and batcher.idle:
            return batcher.inline(text, then if cache is None else _filling(cache, text, then))  # alone: no hop
        else:
            then = _traced(then) if then is not None else None
            job = batcher.submit(text, then if cache is None else _filling(cache, text, then))
        if budget is None:
            return await job
        try:
            async with asyncio.timeout(budget):  # no extra task, unlike wait_for
                return await job
        except TimeoutError:
            raise OutOfTime() from None

    def budget(self, time_left: TimeLeft | None) -> float | None:
        """Seconds left for a call's work (its deadline less the margin; None: no deadline); OutOfTime when none."""
        left = time_left() if time_left else None
        budget = None if left is None else left - self.settings.deadline_margin_ms / 1000.0
        if budget is not None and budget <= 0:
            raise OutOfTime()
        return budget

    def reply(self, serving: Serving, key: Hashable, time_left: TimeLeft | None) -> tuple[Any, ...] | None:
        """The reply cached under ``key`` in the snapshot's reply cache, or None; OutOfTime (as for a computed
        reply) when the call's deadline, less the margin, has come."""
        assert serving.replies is not None
        messages = serving.replies.get(key)
        if messages is not None:
            self.budget(time_left)
        return messages

    async def rerank(self, serving: Serving, text: str, hits: list[Hit],
                     time_left: Callable[[], float | None] | None) -> tuple[list[Hit], RerankOutcome]:
        """``hits`` with their top re-ranked by the engine's cross-encoder in a worker thread (off the event loop);
        unchanged and SKIPPED_DEADLINE when the remaining deadline (less the margin and ``rerank_reserve_ms``) is
        shorter than the stage's estimated cost, or runs out while it works."""
        reranker = serving.engine.reranker
        assert reranker is not None  # Engine.wants_rerank said yes
        left = time_left() if time_left else None
        budget = None
        if left is not None:
            budget = left - (self.settings.deadline_margin_ms + self.settings.rerank_reserve_ms) / 1000.0
            if budget < reranker.cost.seconds(min(len(hits), reranker.depth)):
                metrics.RERANKS.labels(RerankOutcome.SKIPPED_DEADLINE.value).inc()
                return hits, RerankOutcome.SKIPPED_DEADLINE
        work = asyncio.get_running_loop().run_in_executor(self.rerank_pool, reranker.rerank, text, hits)
        try:
            async with asyncio.timeout(budget):  # None: no deadline
                out = await work
        except TimeoutError:  # the thread finishes its run; its result is dropped
            metrics.RERANKS.labels(RerankOutcome.SKIPPED_DEADLINE.value).inc()
            return hits, RerankOutcome.SKIPPED_DEADLINE
        metrics.RERANKS.labels(RerankOutcome.APPLIED.value).inc()
        return out, RerankOutcome.APPLIED

    async def reload(self, root: Path | None = None) -> bool:
        """Loads ``root`` (default: the configured artifact path, re-resolved) in the background and swaps it
        in atomically. A corrupt or incompatible artifact is refused and the current version keeps serving."""
        root = Path(root or self.settings.artifact).resolve()  # once: the version the symlink names now
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                engine = await loop.run_in_executor(None, self.load, root)
            except Exception as exc:  # ArtifactError and anything a broken file provokes
                current = self._serving.engine.version if self._serving else "none"
                logger.error("reload of %s refused, still serving %s: %s", root, current, exc)
                metrics.RELOADS.labels("refused").inc()
                return False
            old = self.swap(engine)
            metrics.RELOADS.labels("loaded").inc()
            logger.info("hot reload: now serving %s (was %s)", engine.version, old.version if old else "none")
            return True

    async def close(self) -> None:
        if self._serving is not None:
            await self._serving.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rerank_pool.shutdown(wait=False, cancel_futures=True)

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
import multiprocessing
import sys
import tempfile
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics, tracing
from .admission import Admission
from .batching import MicroBatcher, Then
from .domain import Hit, RerankOutcome
from .engine import Engine, Offload
from .errors import NotReady, OutOfTime
from .events import EventStore
from .flight import Flight
from .query_cache import QueryCache, ReplyCache, SearchCache, for_engine, replies_for
from .settings import Settings

logger = logging.getLogger(__name__)

TimeLeft = Callable[[], float | None]
# the GIL switch interval while a hot reload loads beside the serving threads (Python's default is 5 ms): measured
# at 100 RPS, the reload's p99 fell from 534 / 794 to 321 / 353 ms
RELOAD_SWITCH_INTERVAL_S = 0.0005


def _filling(cache: QueryCache, text: str, then: Then | None, flight: Flight | None = None) -> Then:
    """``then`` after storing the encoder's vector in ``cache`` and as ``flight``'s result (``then`` gets the
    cached, read-only copy)."""
    def fill(vec: np.ndarray) -> Any:
        own = cache.put(text, vec)
        if flight is not None:
            flight.result = own
        return own if then is None else then(own)

    return fill


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
    """An engine, the micro-batcher in front of its encoder, its query cache and its Recommend and Search reply
    caches (None: off), each with the keys it is computing now: taken together by a call, swapped together (a
    reload starts with empty caches and nothing in flight)."""

    engine: Engine
    batcher: MicroBatcher
    cache: QueryCache | None = None
    replies: ReplyCache | None = None
    searches: ReplyCache | None = None


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

    def load(self, root: Path, offload: Offload | None = None) -> Engine:
        """Loads and warms an artifact (blocking: call from a worker thread); does not swap it in. The path is
        resolved once, so a symlink (``/artifacts/current``) switched during the load cannot mix two versions."""
        engine = Engine(Path(root).resolve(), self.settings, offload)
        engine.warmup()
        settle_heap()
        return engine

    def load_beside_serving(self, root: Path) -> Engine:
        """:meth:`load` for a hot reload: with ``reload_offload``, the GIL-heavy parts are built in a child process
        (spawned, not forked: the server has threads), which exists only for this load. Meanwhile the interpreter
        switches threads every :data:`RELOAD_SWITCH_INTERVAL_S`, so the loading thread hands the GIL back to the
        serving ones sooner (docs/performance.md, "Hot reload under load")."""
        previous = sys.getswitchinterval()
        sys.setswitchinterval(RELOAD_SWITCH_INTERVAL_S)
        try:
            if not self.settings.reload_offload:
                return self.load(root)
            with tempfile.TemporaryDirectory(prefix="bundlerec-reload-") as scratch, \
                    ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                return self.load(root, Offload(pool, Path(scratch)))
        finally:
            sys.setswitchinterval(previous)

    def swap(self, engine: Engine) -> Engine | None:
        """Makes ``engine`` current (with its own micro-batcher); calls holding the old one finish on it."""
        batch = self.settings.max_batch if engine.batch_exact else 1
        batcher = MicroBatcher(
            engine.encoder.encode, self.pool, max_batch=batch, max_wait_s=self.settings.max_batch_wait_ms / 1000,
            workers=self.settings.encode_workers,
        )
        cache = for_engine(engine, self.settings.query_cache_size)
        replies = replies_for(cache) if self.settings.reply_cache else None
        searches = replies_for(cache, SearchCache) if self.settings.reply_cache else None
        old, self._serving = self._serving, Serving(engine, batcher, cache, replies, searches)
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
        return await self.call(serving, text, None, time_left)  # type: ignore[no-any-return]

    async def call(self, serving: Serving, text: str | None, then: Then | None, time_left: TimeLeft | None) -> Any:
        """``then(vector of text)`` in an encode worker, right after the batch that encodes ``text`` (one hop
        per call; ``text`` None: ``then(None)``, no encoding). The vector comes from the snapshot's query cache
        when it holds the text, or from another call encoding the same text now (single-flight); ``then`` then
        runs on the event loop, or in a worker without encoding when ``cache_hits_on_loop`` is off. A miss fills
        the cache. With ``encode_inline``, a miss of the only call in flight that finds the batcher idle is
        encoded and worked on right here, on the event loop. OutOfTime if the deadline (less the margin) comes
        before the result; the job is then dropped if its batch has not started, and its ``then`` skipped if it
        has not run yet. ``then`` None: the vector itself (a hit is returned even when the budget is spent)."""
        batcher, cache = serving.batcher, serving.cache
        vec = key = None
        if text is not None and cache is not None:
            key = cache.key(text)
            vec = await cache.find_or_join(key, functools.partial(self.budget, time_left))
            if vec is not None and then is None:
                return vec
        budget = self.budget(time_left)
        if text is None or vec is not None:  # nothing to encode
            if then is None:
                return vec
            if vec is not None and self.settings.cache_hits_on_loop:
                return then(vec)  # a hit: run it right here on the loop, no hop
            return await self._within(batcher.run(vec, _traced(then)), budget)
        if self.settings.encode_inline and self.admission.in_flight <= 1 and batcher.idle:
            if cache is None:
                return batcher.inline(text, then)  # alone: no hop
            return batcher.inline(text, _filling(cache, text, then))  # synchronous: nobody can join it
        then = _traced(then) if then is not None else None
        if cache is None:
            return await self._within(batcher.submit(text, then), budget)
        with cache.flights.lead(key) as flight:
            return await self._within(batcher.submit(text, _filling(cache, text, then, flight)), budget)

    @staticmethod
    async def _within(job: Awaitable[Any], budget: float | None) -> Any:
        """``job``'s result; OutOfTime when ``budget`` seconds (None: no limit) pass first."""
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

    async def cached(self, replies: ReplyCache | None, key: Hashable | None, compute: Callable[[], Awaitable[Any]],
                     time_left: TimeLeft | None) -> Any:
        """The reply cached under ``key`` in ``replies``, else the one another call is computing for it now
        (single-flight), else ``await compute()``, stored (``key`` None: computed, never stored). OutOfTime (as for
        a computed reply) when the call's deadline, less the margin, comes first."""
        if replies is None or key is None:
            return await compute()
        reply = await replies.find_or_join(key, functools.partial(self.budget, time_left))
        if reply is not None:
            self.budget(time_left)
            return reply
        with replies.flights.lead(key) as flight:
            flight.result = reply = replies.put(key, await compute())
        return reply

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
                engine = await loop.run_in_executor(None, self.load_beside_serving, root)
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

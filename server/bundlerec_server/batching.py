"""Dynamic micro-batching of concurrent queries in front of the encoder, and the call's work after it.

Callers ``await batcher.submit(text, then)``. Whenever a worker is free, up to ``max_batch`` waiting jobs run as
one ``encode_fn`` call in the thread pool (waiting at most ``max_wait_s`` for a batch to fill once the first text
is there), and then, in the same worker, each job's ``then(vector)`` (retrieval, bundling, building the reply):
one thread hop per call, and one ``call_soon_threadsafe`` per batch hands every result back to the event loop.
At low load a query finds a free worker and an empty queue and is submitted at once, without any dispatcher;
under load, batches form by themselves while the workers are busy. A caller that is cancelled or whose deadline
passed before its batch started is dropped from the queue: it costs no encoder work (and no retrieval if it is
gone by the time its batch is encoded).

Batching is only used with a graph whose output for one text does not depend on its batch mates (fp32,
fp16, or per-token int8, see ``bundlerec_export.pertoken``); the engine falls back to one text per call
for the per-tensor dynamic int8 graph.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np

from . import metrics

logger = logging.getLogger(__name__)

Then = Callable[[Any], Any]  # a job's work after encoding: gets the vector (or the job's own), returns the result


class _Job:
    """A text to encode (None: no encoding, ``vec`` is the input), the work after it, the future its caller awaits."""

    __slots__ = ("text", "vec", "then", "fut")

    def __init__(self, text: str | None, vec: Any, then: Then | None, fut: asyncio.Future[Any]) -> None:
        self.text, self.vec, self.then, self.fut = text, vec, then, fut


class MicroBatcher:
    def __init__(
        self,
        encode_fn: Callable[[Sequence[str]], np.ndarray],
        executor: Executor,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.0,
        workers: int = 1,
    ) -> None:
        self.encode_fn = encode_fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: deque[_Job] = deque()
        self.workers = workers
        self._free = workers  # worker slots not running a batch (touched on the event loop only)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired = False
        self.encoded = 0  # texts that went through encode_fn
        self.dropped = 0  # texts whose caller was gone before their batch started
        self.batches = 0

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job in self._queue:
            if not job.fut.done():
                job.fut.cancel()
        self._queue.clear()

    def retire(self) -> None:
        """No longer the current engine's batcher (calls that still hold it finish on it)."""
        self._retired = True

    @property
    def running(self) -> bool:
        """Whether jobs are queued or running (there is no dispatcher task: completions start the next batch)."""
        return bool(self._queue) or self._timer is not None

    @property
    def idle(self) -> bool:
        """No batch running, none waiting to fill, nobody queued."""
        return self._free == self.workers and not self._queue and self._timer is None

    def inline(self, text: str, then: Then | None = None) -> Any:
        """``then(vector of text)`` (the vector itself without ``then``) computed right here, in the caller's thread:
        for a caller on the event loop that finds the batcher :attr:`idle` (no thread hop; the loop is busy
        meanwhile, so the caller decides when that is worth it)."""
        self.batches += 1
        self.encoded += 1
        metrics.BATCH_SIZE.observe(1)
        vec = self.encode_fn([text])[0]
        return vec if then is None else then(vec)

    async def submit(self, text: str, then: Then | None = None) -> Any:
        """``then(vector of text)`` computed in a worker (the vector itself without ``then``)."""
        return await self._enqueue(text, None, then)

    async def run(self, vec: Any, then: Then) -> Any:
        """``then(vec)`` in a worker, queued with the encoding jobs (no encoding: a cached vector, lexical retrieval)."""
        return await self._enqueue(None, vec, then)

    def _enqueue(self, text: str | None, vec: Any, then: Then | None) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        job = _Job(text, vec, then, loop.create_future())
        self._queue.append(job)
        self._pump()
        return job.fut  # cancellation of the caller cancels fut; the batch then skips it

    def _pump(self) -> None:
        """Starts batches while a worker is free and jobs wait (after ``max_wait_s`` unless a batch is full)."""
        while self._queue and self._free > 0:
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch:
                if self._timer is None:
                    assert self._loop is not None
                    self._timer = self._loop.call_later(self.max_wait_s, self._waited)
                return
            if not self._start():
                return

    def _waited(self) -> None:
        self._timer = None
        while self._queue and self._free > 0:
            if not self._start():
                return
        self._pump()

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        while self._queue and len(batch) < self.max_batch:
            job = self._queue.popleft()
            if job.fut.done():  # cancelled (client gone, deadline) before it was batched
                if job.text is not None:
                    self.dropped += 1
                    metrics.DROPPED.inc()
                continue
            batch.append(job)
        return batch

    def _start(self) -> bool:
        batch = self._take()
        if not batch:
            return False
        texts = sum(job.text is not None for job in batch)
        if texts:
            self.batches += 1
            self.encoded += texts
            metrics.BATCH_SIZE.observe(texts)
        self._free -= 1
        try:
            work = self.executor.submit(self._work, batch)
        except RuntimeError as exc:  # the pool is shut down
            self._complete(batch, [(exc, None)] * len(batch))
            return True
        work.add_done_callback(functools.partial(self._abandoned, batch))
        return True

    def _work(self, batch: list[_Job]) -> None:
        """In a worker: the batch's encode, then each job's ``then``; one wake-up of the loop for all results."""
        results: list[tuple[BaseException | None, Any]] = []
        texts = [job.text for job in batch if job.text is not None]
        vecs: Any = None
        failed: BaseException | None = None
        if texts:
            try:
                vecs = self.encode_fn(texts)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                failed = exc
        row = 0
        for job in batch:
            vec = job.vec
            if job.text is not None:
                if failed is not None:
                    results.append((failed, None))
                    continue
                vec = vecs[row]
                row += 1
            if job.then is None:
                results.append((None, vec))
            elif job.fut.done():  # its caller is gone: skip the retrieval
                results.append((None, None))
            else:
                try:
                    results.append((None, job.then(vec)))
                except Exception as exc:  # noqa: BLE001 - the caller's own error (bad filter, unsupported mode...)
                    results.append((exc, None))
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._complete, batch, results)
        except RuntimeError:  # the loop is closed (shutdown): nobody waits any more
            pass

    def _abandoned(self, batch: list[_Job], work: Future[None]) -> None:
        """The pool dropped the batch without running it (shut down with ``cancel_futures``)."""
        if work.cancelled() and self._loop is not None and not self._loop.is_closed():
            cancelled: list[tuple[BaseException | None, Any]] = [(asyncio.CancelledError(), None)] * len(batch)
            self._loop.call_soon_threadsafe(self._complete, batch, cancelled)

    def _complete(self, batch: list[_Job], results: list[tuple[BaseException | None, Any]]) -> None:
        self._free += 1
        for job, (exc, value) in zip(batch, results, strict=True):
            if job.fut.done():
                continue
            if isinstance(exc, asyncio.CancelledError):
                job.fut.cancel()
            elif exc is not None:
                job.fut.set_exception(exc)
            else:
                job.fut.set_result(value)
        self._pump()

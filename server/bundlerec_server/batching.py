"""Dynamic micro-batching of concurrent queries in front of the encoder.

Callers ``await batcher.submit(text)``. A dispatcher takes up to ``max_batch`` waiting texts whenever a
worker is free (waiting at most ``max_wait_s`` for a batch to fill once the first text is there) and runs
them as one ``encode_fn`` call in the thread pool. At low load every query runs alone at once; under load,
batches form by themselves while the workers are busy. A caller that is cancelled or whose deadline passed
before its batch started is dropped from the queue: it costs no encoder work.

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
from concurrent.futures import Executor

import numpy as np

from . import metrics

logger = logging.getLogger(__name__)


Pending = tuple[str, "asyncio.Future[np.ndarray]"]  # a text and the future its caller awaits


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
        self._queue: deque[Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._workers = workers
        self._task: asyncio.Task[None] | None = None
        self._retired = False
        self.encoded = 0  # texts that went through encode_fn
        self.dropped = 0  # texts whose caller was gone before their batch started
        self.batches = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        self._task = asyncio.create_task(self._dispatch(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for _, fut in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()

    def retire(self) -> None:
        """No longer the current engine's batcher: the dispatcher exits once idle (a late submit restarts it)."""
        self._retired = True
        if self._wakeup is not None:
            self._wakeup.set()

    def _sync(self) -> tuple[asyncio.Event, asyncio.Semaphore]:
        assert self._wakeup is not None and self._slots is not None, "start() creates them"
        return self._wakeup, self._slots

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, text: str) -> np.ndarray:
        if not self.running:
            self.start()
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((text, fut))
        self._sync()[0].set()
        return await fut  # cancellation of the caller cancels fut; the dispatcher then skips it

    def _take(self) -> list[Pending]:
        batch: list[Pending] = []
        while self._queue and len(batch) < self.max_batch:
            text, fut = self._queue.popleft()
            if fut.done():  # cancelled (client gone, deadline) before it was batched
                self.dropped += 1
                metrics.DROPPED.inc()
                continue
            batch.append((text, fut))
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._retired and not self._queue:
                return  # idle and replaced: let the old engine be garbage-collected
            wakeup, slots = self._sync()
            await wakeup.wait()
            wakeup.clear()
            while self._queue:
                await slots.acquire()
                if self.max_wait_s > 0 and len(self._queue) < self.max_batch:
                    await asyncio.sleep(self.max_wait_s)
                batch = self._take()
                if not batch:
                    slots.release()
                    break
                self.batches += 1
                self.encoded += len(batch)
                metrics.BATCH_SIZE.observe(len(batch))
                work = loop.run_in_executor(self.executor, self.encode_fn, [t for t, _ in batch])
                work.add_done_callback(functools.partial(self._finish, batch))

    def _finish(self, batch: list[Pending], work: asyncio.Future[np.ndarray]) -> None:
        self._sync()[1].release()
        exc = work.exception() if not work.cancelled() else asyncio.CancelledError()
        for i, (_, fut) in enumerate(batch):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(work.result()[i])

"""Collect concurrent requests into batches for the engine's one worker thread.

Requests wait up to `window_s` for company; a batch takes the oldest request and every queued
request that can share its `generate` call (same sampling settings: any adapters, any lengths), up
to `max_batch_size`. Model mutations (adapter load/unload) go through the same single worker, so
they run between batches, never during one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tunepipe.tasks.serving.engine import MultiLoraEngine, Row, fail_rows

log = logging.getLogger("tunepipe.serve")


class Batcher:
    def __init__(self, engine: MultiLoraEngine, *, max_batch_size: int, window_s: float):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunepipe-engine")
        self.queue: asyncio.Queue[tuple[tuple, Row]] = asyncio.Queue()
        self.pending: deque[tuple[tuple, Row]] = deque()
        self.batches: list[list[str | None]] = []  # adapters of each batch run (recent ones), for tests and stats
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self.running: list[Row] = []  # the batch being generated

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop batching; the batch generating now stops at its next token (shutdown does not wait for its
        max_tokens), and queued rows are dropped: their requests have been answered or their clients are gone."""
        for row in [*self.running, *(item[1] for item in self.pending)]:
            row.cancelled = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.worker.shutdown(wait=True, cancel_futures=True)

    def submit(self, row: Row) -> None:
        self.queue.put_nowait((row.sampling.batch_key(next(self._ids)), row))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the engine's worker thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self.pending.append(await self.queue.get())
            if self.window_s and len(self.pending) + self.queue.qsize() < self.max_batch_size:
                await asyncio.sleep(self.window_s)
            while not self.queue.empty():
                self.pending.append(self.queue.get_nowait())
            batch = self._take_batch()
            self.batches = [*self.batches[-99:], [row.adapter for row in batch]]
            self.running = batch
            try:
                await self.call(self.engine.generate, batch)
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                log.exception("generation failed for a batch of %d", len(batch))
                # rows the engine did not end (a failure before its own error handling) end here: a row that
                # never hears back holds its request's slot forever
                fail_rows(batch, f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                self.running = []

    def _take_batch(self) -> list[Row]:
        key = self.pending[0][0]
        batch, rest = [], deque()
        for item in self.pending:
            if item[0] == key and len(batch) < self.max_batch_size:
                batch.append(item[1])
            else:
                rest.append(item)
        self.pending = rest
        return batch

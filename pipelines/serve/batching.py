"""Forward coalescing behind ``@serve.batch``: one forward at a time, each as full as it can be.

Serve's batcher (``ray/serve/batching.py::_BatchQueue._process_batches``) forms the next batch on
its timer while the previous one still runs: with ``batch_wait_timeout_s`` short enough not to
delay a lone request, a loaded replica gets many small batches queued behind the forward, and
batching buys almost nothing (measured here: 1.05x at concurrency 16).  So the batched method
only hands its requests to a :class:`ForwardCoalescer` and returns one future per request; the
coalescer runs ``forward`` in its own thread, one call at a time, and each call takes every
request waiting at that moment (up to ``max_batch_size``).  A lone request still goes straight
through; under load, forwards fill up with whatever arrived during the previous one.

No Ray here: plain asyncio, unit-tested on its own.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable, Generic, Sequence, TypeVar

Job = TypeVar("Job")


class ForwardCoalescer(Generic[Job]):
    """Queue of ``(job, future)``; a worker task drains it through ``forward`` in ``executor``.

    ``forward(jobs) -> results`` returns one result per job, in order (an exception object is a
    result like any other: it is handed to that job's caller).  If ``forward`` itself raises,
    every job of that call gets the exception.  Jobs whose caller went away (cancelled future)
    are dropped before the forward.
    """

    def __init__(self, forward: Callable[[list[Job]], Sequence[Any]], executor: Executor,
                 max_batch_size: int) -> None:
        self._forward = forward
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._waiting: list[tuple[Job, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.forwards = 0  # forward calls so far
        self.jobs = 0      # jobs they carried

    def set_max_batch_size(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {size}")
        self.max_batch_size = size

    def submit(self, jobs: Sequence[Job]) -> list[asyncio.Future]:
        """Queue ``jobs``; returns their futures (await them for the results)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return futures

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            take = self._waiting[:self.max_batch_size]
            del self._waiting[:len(take)]
            live = [(job, future) for job, future in take if not future.done()]
            if not live:
                continue
            try:
                results = list(await loop.run_in_executor(
                    self._executor, self._forward, [job for job, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"forward returned {len(results)} results for "
                                       f"{len(live)} jobs")
            except Exception as error:  # noqa: BLE001 - every job of the call gets it
                results = [error] * len(live)
            self.forwards += 1
            self.jobs += len(live)
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)

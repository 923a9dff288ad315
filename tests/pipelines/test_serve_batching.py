"""ForwardCoalescer: one forward at a time, each taking every job that waited for it."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.serve.batching import ForwardCoalescer


class _Recorder:
    """A forward that takes 50 ms and records the batches it saw (and overlapping calls)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def __call__(self, jobs: list[int]) -> list[object]:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        self.batches.append(list(jobs))
        return [ValueError(job) if job < 0 else job * 10 for job in jobs]


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("max_batch, expected", [(8, [[0], [1, 2, 3, 4, 5]]),
                                                 (3, [[0], [1, 2, 3], [4, 5]])])
def test_jobs_arriving_during_a_forward_share_the_next_one(max_batch, expected) -> None:
    forward = _Recorder()

    async def main() -> list[object]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # more threads than needed on purpose
            coalescer = ForwardCoalescer(forward, pool, max_batch)
            first = coalescer.submit([0])
            await asyncio.sleep(0.01)  # the first forward is running now
            later = [coalescer.submit([job])[0] for job in range(1, 6)]
            results = await asyncio.gather(*first, *later)
            assert (coalescer.forwards, coalescer.jobs) == (len(expected), 6)
            return results

    assert _run(main()) == [0, 10, 20, 30, 40, 50]
    assert forward.batches == expected
    assert forward.max_running == 1  # never two forwards at once


def test_errors_go_to_their_own_job_and_a_failing_forward_to_all() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            coalescer = ForwardCoalescer(_Recorder(), pool, 8)
            good, bad = await asyncio.gather(*coalescer.submit([1, -1]))
            assert good == 10 and isinstance(bad, ValueError)

            def broken(jobs: list[int]) -> list[int]:
                raise RuntimeError("boom")

            coalescer = ForwardCoalescer(broken, pool, 8)
            results = await asyncio.gather(*coalescer.submit([1, 2]))
            assert [str(r) for r in results] == ["boom", "boom"]
            short = ForwardCoalescer(lambda jobs: [], pool, 8)
            (result,) = await asyncio.gather(*short.submit([1]))
            assert isinstance(result, RuntimeError) and "0 results for 1 jobs" in str(result)

    _run(main())


def test_cancelled_jobs_are_dropped_before_the_forward() -> None:
    forward = _Recorder()

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            coalescer = ForwardCoalescer(forward, pool, 8)
            first = coalescer.submit([0])
            await asyncio.sleep(0.01)
            gone, kept = coalescer.submit([1, 2])
            gone.cancel()
            assert await kept == 20 and await first[0] == 0
            assert coalescer.pending == 0
            with pytest.raises(ValueError):
                coalescer.set_max_batch_size(0)

    _run(main())
    assert forward.batches == [[0], [2]]

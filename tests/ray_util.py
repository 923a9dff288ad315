"""Helpers for tests that run beside other work on the session's Ray cluster."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator


def settled_free_cpus(quiet_s: float = 2.0, limit_s: float = 30.0) -> float:
    """The session's free CPUs once they have not changed for ``quiet_s`` (tasks of the test
    before may still be finishing), or after ``limit_s``."""
    import ray

    free, since, deadline = -1.0, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = ray.available_resources().get("CPU", 0)
        if now != free:
            free, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.1)
    return free


@contextlib.contextmanager
def every_cpu_held() -> Iterator[None]:
    """An actor holds every free CPU of the session (as a Serve app or another job's actors
    would) until the block ends; then it is killed and the CPUs come back."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=settled_free_cpus()).remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=120)
        yield
    finally:
        ray.kill(holder)


def wait_for_line(lines: list[str], text: str, limit_s: float = 120.0) -> list[str]:
    """The lines holding ``text``, once one appears in ``lines`` (filled by another thread) or
    after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not any(text in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [line for line in lines if text in line]

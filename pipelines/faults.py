"""Fault injection for rayseg's own tests: a lost worker, a stalled one, a loss that blew up, a
predict job that dies midway.

Armed only through the environment variable :data:`ENV` on the driver, a JSON object such as
``{"fail_at_step": 3}``: :func:`pipelines.train.train.train` reads it when it starts and hands
it to the workers beside the loop's plan; :func:`pipelines.predict.predict.run_predict` reads
it for its sink.  It is not a config key, a flag, an estimator parameter, a function argument or
an MLflow param, and nothing records it.  Unset (always, outside the tests): no fault, and
these functions return at once.

- ``fail_at_step``: the last training worker's process dies once at this global step (a lost
  node);
- ``pause_at_step``: the last training worker stalls once here for up to two minutes (so that
  a test can take its node away mid-epoch), then carries on;
- ``nan_at_step``: the training loss reads NaN at this global step;
- ``fail_after_files``: a predict job fails once this many prediction files are committed.

"Once" is kept across restarts by a marker beside the checkpoints
(``<run>/fault_injected_at_step_<N>``, ``<run>/paused_at_step_<N>``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields

ENV = "RAYSEG_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    """The faults one run injects; all None means none."""

    fail_at_step: int | None = None
    pause_at_step: int | None = None
    nan_at_step: int | None = None
    fail_after_files: int | None = None

    @classmethod
    def from_env(cls) -> "Faults":
        """The faults :data:`ENV` arms (none when it is unset)."""
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return cls()
        values = json.loads(raw)
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"{ENV}: expected a JSON object with keys from {sorted(known)}, "
                             f"got {raw!r}")
        return cls(**values)


def maybe_fail(faults: Faults, run_uri: str, step: int, rank: int, world: int) -> None:
    """The last worker's process dies once at ``fail_at_step``."""
    marker = _first_time(faults.fail_at_step, run_uri, "fault_injected", step, rank, world)
    if marker is not None:
        _write_marker(marker, f"rank {rank} killed at step {step}")
        os._exit(1)  # no cleanup, no exception: the actor process is gone


def maybe_pause(faults: Faults, run_uri: str, step: int, rank: int, world: int,
                timeout_s: float = 120.0) -> None:
    """The last worker stalls once at ``pause_at_step``; after ``timeout_s`` it carries on."""
    marker = _first_time(faults.pause_at_step, run_uri, "paused", step, rank, world)
    if marker is not None:
        _write_marker(marker, f"rank {rank} paused at step {step}")
        time.sleep(timeout_s)


def maybe_nan(faults: Faults, step: int, loss: float) -> float:
    """The loss reads NaN at global step ``nan_at_step``."""
    return float("nan") if faults.nan_at_step == step else loss


def _first_time(at: int | None, run_uri: str, what: str, step: int, rank: int,
                world: int) -> str | None:
    """The marker ``<run>/<what>_at_step_<at>`` when the last rank reaches ``at`` for the first
    time in this run (no marker yet), else None."""
    if at is None or step != at or rank != world - 1:
        return None
    from pipelines import storage

    marker = storage.join_uri(run_uri, f"{what}_at_step_{at}")
    return None if storage.exists(marker) else marker


def _write_marker(uri: str, line: str) -> None:
    from pipelines import storage

    storage.write_bytes(uri, f"{line}\n".encode())

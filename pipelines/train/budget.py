"""A learning-rate schedule that ends when the time budget does (``max_runtime_secs``).

Without a budget, the schedule spans ``epochs x steps_per_epoch`` (or ``max_iterations``) and
nothing here applies.  With one, a run that the clock stops first would end with its cosine cut
off halfway and its weights never annealed.  So the loop measures, and fits:

- the budget counts from the moment ``train`` was called (the driver's ``deadline``), so data
  preparation, the worker group's start, validation and the artifact are all inside it;
- the first :data:`WARM_STEPS` steps of a worker are not timed (allocation, thread pools, the
  first batches); the next :data:`MEASURE_STEPS` give the pace, data waits included;
- the schedule's length becomes the most steps whose training, epoch ends (validation and the
  checkpoint, estimated until the first one is measured, then measured) and the driver's
  closing work (:data:`CLOSING_S`) fit before the deadline, never more than the epoch plan;
- it is fitted again after the first measured epoch end, and once more half-way through the
  steps that fit left (:meth:`BudgetFit.plan_midpoint`), with the pace of every step timed by
  then (the first steps run slower than the steady pace, so the early fit leaves time unused);
  then it holds.  Every worker takes the smallest fit, so all ranks stop at the same step;
- training stops at the fitted step, with the learning rate at its floor.

The fit and its evidence are kept in the checkpoint (a resumed run keeps its step count) and
go to ``metrics.json`` as ``schedule``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

WARM_STEPS = 2      # a worker's first steps: not timed
MEASURE_STEPS = 6   # steps timed before the first fit
CLOSING_S = 5.0     # after the last epoch: the driver reads the checkpoint, writes the artifact


@dataclass
class BudgetFit:
    """Fits the schedule of one worker to ``deadline`` (``time.time()`` at which the run ends).

    ``planned``: the epoch plan's total steps (the most the fit may give); ``steps_per_epoch``;
    ``val_images``: this worker's share of the val rows and ``batch_size`` (the estimate of a
    validation before one is measured); ``val_fraction`` as in :class:`TrainConfig`.
    """

    deadline: float
    planned: int
    steps_per_epoch: int
    val_images: int
    batch_size: int
    val_fraction: float | None = None
    intervals: list[float] = field(default_factory=list)
    seen: int = 0                   # steps this worker process has taken
    val_s: float | None = None      # measured: one validation
    end_s: float | None = None      # measured: the rest of an epoch end (checkpoint, next batches)
    fitted_measured: bool | None = None   # None: not fitted yet
    midpoint: int | None = None     # the step of the late refit, once planned
    late_done: bool = False         # the late refit happened

    def step(self, seconds: float) -> None:
        """One step took ``seconds`` of wall time (waiting for its batch included)."""
        self.seen += 1
        if self.seen > WARM_STEPS:
            self.intervals.append(seconds)

    def ended_epoch(self, wall_s: float, steps: int, val_s: float | None) -> None:
        """An epoch of ``steps`` steps took ``wall_s`` from its first batch to its checkpoint,
        ``val_s`` of it validating (None: not validated).  The first validated one is kept."""
        if self.val_s is None and val_s is not None and len(self.intervals) >= 1:
            self.val_s = val_s
            self.end_s = max(0.0, wall_s - val_s - steps * self.step_s())

    def due(self, done: int | None = None) -> bool:
        """Whether to fit now (``done``: steps taken): once the pace is measured, again once an
        epoch end is, and at the midpoint."""
        if self.fitted_measured is None:
            return len(self.intervals) >= MEASURE_STEPS
        if not self.fitted_measured and self.val_s is not None:
            return True
        return self.midpoint is not None and done is not None and done >= self.midpoint

    def plan_midpoint(self, done: int, total: int) -> None:
        """After a fit to ``total`` (agreed by every worker) at step ``done``: the late refit
        happens half-way through the rest, once, when the epoch end has been measured and the
        rest is long enough for the refit to matter."""
        if self.midpoint is not None and done >= self.midpoint:
            self.midpoint, self.late_done = None, True
        elif self.fitted_measured and not self.late_done and total - done >= 4 * MEASURE_STEPS:
            self.midpoint = done + (total - done) // 2

    def step_s(self) -> float:
        """The pace: the median of the timed steps."""
        ordered = sorted(self.intervals)
        return ordered[len(ordered) // 2]

    def cost(self, done: int, more: int, step_s: float, val_s: float, end_s: float) -> float:
        """Seconds that ``more`` steps after step ``done`` take, their epoch ends included."""
        spe = self.steps_per_epoch
        ends = (done + more) // spe - done // spe + (1 if (done + more) % spe else 0)
        train_s = more * step_s
        validations_s = ends * val_s
        if self.val_fraction is not None:   # at most this share of training, the last one kept
            validations_s = min(validations_s, self.val_fraction * train_s + val_s)
        return train_s + ends * end_s + validations_s + CLOSING_S

    def fit(self, done: int, now: float | None = None) -> dict[str, Any]:
        """The schedule's total steps (``done`` taken so far): the largest total whose remaining
        steps and epoch ends fit before the deadline, at most the plan; with the evidence."""
        now = time.time() if now is None else now
        step_s = self.step_s()
        measured = self.val_s is not None
        val_s = self.val_s if measured else \
            step_s * math.ceil(self.val_images / max(1, self.batch_size))
        end_s = self.end_s if measured else 0.0
        left = self.deadline - now
        low, high = 0, max(0, self.planned - done)
        while low < high:   # the cost grows with the steps: the largest that fits
            mid = (low + high + 1) // 2
            if self.cost(done, mid, step_s, val_s, end_s) <= left:
                low = mid
            else:
                high = mid - 1
        self.fitted_measured = measured
        return {"total_steps": done + low, "planned_steps": self.planned,
                "fitted_at_step": done, "step_s": round(step_s, 4),
                "validation_s": round(val_s, 3), "epoch_end_s": round(end_s, 3),
                "measured_epoch_end": measured, "seconds_left": round(left, 2)}


def fitted_note(max_runtime_secs: float | None) -> str:
    """What the driver's printed schedule becomes under a time budget."""
    if max_runtime_secs is None:
        return ""
    return f" (at most: fitted to max_runtime_secs={max_runtime_secs:g} once the pace is measured)"

"""The schedule fitted to a time budget (:mod:`pipelines.train.budget`), without Ray: the fit is
checked against its own cost model step by step, and the cost model against hand counts."""
from __future__ import annotations

import pytest

from pipelines.train.budget import CLOSING_S, MEASURE_STEPS, WARM_STEPS, BudgetFit


def _fit(deadline: float = 100.0, planned: int = 10_000, spe: int = 5,
         fraction: float | None = None) -> BudgetFit:
    return BudgetFit(deadline=deadline, planned=planned, steps_per_epoch=spe, val_images=6,
                     batch_size=3, val_fraction=fraction)


def test_the_first_steps_are_not_timed_and_the_fit_waits_for_the_pace():
    fit = _fit()
    fit.step(5.0)                       # a slow first step (allocation, first batches)
    fit.step(5.0)
    for _ in range(MEASURE_STEPS - 1):
        fit.step(0.2)
        assert not fit.due()
    fit.step(0.2)
    assert fit.due() and fit.step_s() == 0.2
    assert len(fit.intervals) == MEASURE_STEPS and fit.seen == WARM_STEPS + MEASURE_STEPS


def test_the_cost_counts_steps_epoch_ends_and_the_closing_work_by_hand():
    fit = _fit(spe=5)
    # from step 3, 9 more steps end at step 12: epoch ends at 5 and 10, and the partial last one
    assert fit.cost(3, 9, step_s=0.5, val_s=2.0, end_s=1.0) == pytest.approx(
        9 * 0.5 + 3 * 1.0 + 3 * 2.0 + CLOSING_S)
    # ending exactly on an epoch boundary: ends at 5 and 10 only
    assert fit.cost(3, 7, step_s=0.5, val_s=2.0, end_s=1.0) == pytest.approx(
        7 * 0.5 + 2 * 1.0 + 2 * 2.0 + CLOSING_S)
    # val_fraction 0.1: validations take at most a tenth of the training, plus the last one
    capped = _fit(spe=5, fraction=0.1)
    assert capped.cost(0, 100, step_s=1.0, val_s=30.0, end_s=0.0) == pytest.approx(
        100 + 0.1 * 100 + 30.0 + CLOSING_S)


@pytest.mark.parametrize("fraction", [None, 0.1])
def test_the_fit_is_the_largest_total_whose_cost_fits(fraction):
    fit = _fit(deadline=1_000.0, spe=7, fraction=fraction)
    for _ in range(WARM_STEPS + MEASURE_STEPS):
        fit.step(0.3)
    done = WARM_STEPS + MEASURE_STEPS
    got = fit.fit(done, now=900.0)      # 100 s left
    total, val_s = got["total_steps"], got["validation_s"]
    assert got["measured_epoch_end"] is False and val_s == pytest.approx(0.3 * 2)  # 6 / 3
    assert fit.cost(done, total - done, 0.3, val_s, 0.0) <= 100.0
    assert fit.cost(done, total - done + 1, 0.3, val_s, 0.0) > 100.0
    # once an epoch end is measured, it fits again (once) with the measured times
    fit.ended_epoch(wall_s=7 * 0.3 + 1.5 + 0.4, steps=7, val_s=1.5)
    assert fit.due()
    again = fit.fit(done + 5, now=902.0)
    assert again["measured_epoch_end"] and again["epoch_end_s"] == pytest.approx(0.4)
    assert again["validation_s"] == 1.5 and not fit.due()


def test_the_fit_never_exceeds_the_plan_and_stops_when_no_time_is_left():
    fit = _fit(deadline=1e9, planned=50)
    for _ in range(WARM_STEPS + MEASURE_STEPS):
        fit.step(0.01)
    assert fit.fit(8, now=0.0)["total_steps"] == 50          # the epochs end first
    late = _fit(deadline=10.0)
    for _ in range(WARM_STEPS + MEASURE_STEPS):
        late.step(0.01)
    assert late.fit(8, now=9.0)["total_steps"] == 8          # closing work alone overruns


def test_a_late_refit_half_way_uses_the_steady_pace_once():
    fit = _fit(deadline=1_000.0, spe=10)
    for _ in range(WARM_STEPS + MEASURE_STEPS):
        fit.step(0.5)                                   # the first timed steps run slow
    fit.ended_epoch(wall_s=10 * 0.5 + 1.0, steps=10, val_s=1.0)
    first = fit.fit(10, now=0.0)
    fit.plan_midpoint(10, first["total_steps"])
    middle = fit.midpoint
    assert middle == 10 + (first["total_steps"] - 10) // 2
    assert not fit.due(middle - 1) and fit.due(middle)
    for _ in range(middle - 10):
        fit.step(0.25)                                  # the steady pace is twice as fast
    late = fit.fit(middle, now=(middle - 10) * 0.25 + 10 * 0.5)
    fit.plan_midpoint(middle, late["total_steps"])
    assert late["step_s"] == 0.25 and late["total_steps"] > first["total_steps"]
    left = 1_000.0 - ((middle - 10) * 0.25 + 10 * 0.5)
    assert fit.cost(middle, late["total_steps"] - middle, 0.25, 1.0, 0.0) <= left
    assert fit.midpoint is None and not fit.due(late["total_steps"] - 1)   # once only

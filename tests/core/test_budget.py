"""OverheadBudget: intervals from measured costs, computed by hand."""

from __future__ import annotations

import pytest

from grad_callbacks.core.budget import OverheadBudget


def test_interval_keeps_the_check_within_its_share() -> None:
    budget = OverheadBudget(max_overhead=0.05)
    budget.record_step(train_seconds=0.02, check_seconds=0.0)
    # 0.1 s per run, allowed 0.5 * 5% * 20 ms = 0.5 ms per step: one run every 200 steps
    assert budget.interval(run_seconds=0.1, share=0.5) == 200


def test_unknown_step_time_and_cheap_runs_give_one() -> None:
    budget = OverheadBudget()
    assert budget.interval(run_seconds=1.0, share=1.0) == 1
    budget.record_step(1.0, 0.0)
    assert budget.interval(run_seconds=1e-6, share=1.0) == 1


def test_step_time_is_smoothed_and_overhead_accumulates() -> None:
    budget = OverheadBudget(smoothing=0.5)
    budget.record_step(0.010, 0.001)
    budget.record_step(0.030, 0.001)
    assert budget.step_seconds == pytest.approx(0.020)
    assert budget.overhead == pytest.approx(0.002 / 0.040)


def test_interval_is_capped_and_bad_budgets_rejected() -> None:
    budget = OverheadBudget(max_interval=50)
    budget.record_step(1e-3, 0.0)
    assert budget.interval(run_seconds=100.0, share=0.1) == 50
    with pytest.raises(ValueError):
        OverheadBudget(max_overhead=0)

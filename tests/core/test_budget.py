"""OverheadBudget: intervals from measured costs, computed by hand."""

from __future__ import annotations

import pytest

from grad_callbacks.core.budget import OverheadBudget, WatchWindows


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


def test_the_fixed_cost_is_taken_out_of_the_budget_first() -> None:
    budget = OverheadBudget(max_overhead=0.03, min_spare=0.1)
    # 10 ms steps, 0.2 ms of checks per step of which 0.05 ms scheduled: 0.15 ms fixed
    budget.record_step(train_seconds=0.010, check_seconds=0.0002, scheduled_seconds=0.00005)
    assert budget.fixed_seconds == pytest.approx(0.00015)
    # 3% of 10 ms = 0.3 ms; 0.15 ms left; a check with share 0.5 gets 0.075 ms per step
    assert budget.interval(run_seconds=0.0074, share=0.5) == 99  # 98.7 steps
    # A fixed cost above the whole budget leaves min_spare of it: 0.1 * 0.3 ms * 0.5
    budget.record_step(train_seconds=0.010, check_seconds=0.00515, scheduled_seconds=0.0)
    assert budget.fixed_seconds > 0.0003
    assert budget.interval(run_seconds=0.00149, share=0.5) == 100  # 99.3 steps


def test_watch_windows_follow_the_budget() -> None:
    budget = OverheadBudget(max_overhead=0.03)
    budget.record_step(train_seconds=0.010, check_seconds=0.0)
    windows = WatchWindows(budget, share=1.0, length=4)
    spent, watched = 0.0, []
    for _ in range(40):
        watched.append(windows.watch(spent))
        spent += 0.00059 if watched[-1] else 0.0  # 2.36 ms per window / 0.3 ms: 7.9
    assert [b for b, w in enumerate(watched) if w] == [
        b for start in range(0, 40, 8) for b in range(start, start + 4)
    ]
    assert windows.watched_share == pytest.approx(0.5)


def test_cheap_watching_watches_every_batch_and_windows_open_only_where_allowed() -> None:
    budget = OverheadBudget(max_overhead=0.03)
    budget.record_step(train_seconds=0.010, check_seconds=0.0)
    windows = WatchWindows(budget, share=1.0, length=3)
    assert all(windows.watch(spent=1e-6 * b) for b in range(20))
    # Expensive windows, and a window may open only at even batches.
    windows = WatchWindows(budget, share=1.0, length=2)
    spent, opened = 0.0, []
    for batch in range(30):
        was = windows._opened_at
        if windows.watch(spent, may_open=batch % 2 == 0):
            spent += 0.00089  # 1.78 ms per window: 5.9 batches apart
            if windows._opened_at != was:
                opened.append(batch)
    assert opened == [0, 6, 12, 18, 24]
    assert all(b % 2 == 0 for b in opened)
    assert WatchWindows(None, share=1.0, length=2).watch(0.0)


def test_windows_open_at_least_every_max_gap_batches_and_on_request() -> None:
    budget = OverheadBudget(max_overhead=0.03)
    budget.record_step(train_seconds=0.001, check_seconds=0.0)
    windows = WatchWindows(budget, share=0.4, length=3, max_gap=10)
    spent, watched = 0.0, []
    for batch in range(40):
        if batch == 25:
            windows.request()
        watched.append(windows.watch(spent))
        spent += 0.01 if watched[-1] else 0.0  # far over the budget: the gap would be huge
    # every 10 batches (max_gap), and a window asked for at batch 25
    expected = [0, 1, 2, 10, 11, 12, 20, 21, 22, 25, 26, 27, 35, 36, 37]
    assert [b for b, w in enumerate(watched) if w] == expected
    assert windows.requested == 1
    assert windows.capped  # the budget alone would have waited far longer


def test_one_time_and_steady_state_are_apart() -> None:
    budget = OverheadBudget(max_overhead=0.03, steady_from=2)
    budget.record_step(train_seconds=0.010, check_seconds=0.050)  # the first-batch audit
    budget.record_step(train_seconds=0.010, check_seconds=0.001)
    assert budget.steady_overhead is None
    for _ in range(3):
        budget.record_step(train_seconds=0.010, check_seconds=0.0002)
    assert budget.one_time_seconds == 0.050
    assert budget.one_time_steps == pytest.approx(5.0)
    assert budget.steady_overhead == pytest.approx(0.02)
    assert budget.overhead == pytest.approx(0.0516 / 0.05)


def test_batches_recorded_at_once_count_as_many_single_ones() -> None:
    """Idle batches go to the budget in bulk: the totals, the steady part and the smoothed step
    time come out as if they had been recorded one by one."""
    one, bulk = OverheadBudget(steady_from=5), OverheadBudget(steady_from=5)
    for budget in (one, bulk):
        budget.record_step(train_seconds=0.02, check_seconds=0.002)
    for _ in range(8):
        one.record_step(train_seconds=0.01, check_seconds=0.0005)
    bulk.record_steps(train_seconds=0.08, check_seconds=0.004, batches=8)
    assert bulk.steps == one.steps == 9
    for name in ("train_seconds", "check_seconds", "steady_train_seconds", "step_seconds",
                 "fixed_seconds"):
        assert abs(getattr(bulk, name) - getattr(one, name)) < 1e-12, name
    assert bulk.steady_check_seconds == pytest.approx(one.steady_check_seconds)

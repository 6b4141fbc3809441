"""Inside GradientAudit, the sanity check watches the first window and the windows its sentinel
asks for; the spaced windows are the zero-grad check's alone.

The audit's always-on look (every few optimizer steps) sees every gradient of the stepping
optimizer: a NaN/Inf, and a parameter without a gradient (None, or all zeros). A parameter
without one opens a window in which the sanity check counts ``patience`` steps in a row; one
that only misses some steps (an auxiliary head used on every other batch) makes the hints wait
longer each time, and one already reported opens none. The budget here behaves as on a slow
machine (windows as far apart as the audit allows), as in test_latency.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from grad_callbacks import GradientSanityCheck, ZeroGradCheck
from grad_callbacks.callbacks.pacing import (
    FINITE_EVERY_STEPS_CPU,
    LATENCY_BOUNDS,
    MAX_WINDOW_GAP_STEPS,
    SANITY_WINDOW_STEPS,
    WATCH_WINDOW_STEPS,
)
from tests import zoo
from tests.callbacks.test_latency import run
from tests.callbacks.test_watch_windows import DetachedFrom

BATCHES = 200


def _checks(audit: Any) -> tuple[ZeroGradCheck, GradientSanityCheck]:
    zero_grad = next(c for c in audit.checks if isinstance(c, ZeroGradCheck))
    sanity = next(c for c in audit.checks if isinstance(c, GradientSanityCheck))
    return zero_grad, sanity


def test_on_a_clean_run_the_sanity_check_watches_the_first_window_only() -> None:
    audit, _ = run(zoo.MLP(), zoo.regression_data(n=4 * BATCHES), BATCHES)
    zero_grad, sanity = _checks(audit)
    assert [f for f in audit.findings if f.severity != "info"] == []
    assert audit.missing_hints == 0
    assert sanity.steps_checked == 8  # the first window (FIRST_WINDOW_STEPS)
    # the zero-grad check watches the first window and short spaced ones
    windows = audit.watch_windows
    assert windows is not None and windows.length == WATCH_WINDOW_STEPS
    spaced = (BATCHES - 1) // MAX_WINDOW_GAP_STEPS
    assert zero_grad.steps_checked == 8 + WATCH_WINDOW_STEPS * spaced


def test_a_layer_cut_off_in_a_gap_is_found_through_a_hint() -> None:
    onset = 61  # in a gap of the spaced windows, just after a look
    audit, seen = run(DetachedFrom(onset), zoo.regression_data(n=4 * BATCHES), BATCHES)
    (finding,) = [f for f in audit.findings if f.code == "missing-grad"]
    assert finding.params == ("net.0.weight", "net.0.bias")
    assert audit.missing_hints >= 1
    latency = seen.at["missing-grad"] - onset
    # the next look, then a window of patience + 1 steps that opens at the next batch
    assert 0 <= latency <= FINITE_EVERY_STEPS_CPU + SANITY_WINDOW_STEPS + 1
    assert latency <= LATENCY_BOUNDS["missing-grad"]
    # once reported, the layer opens no more windows
    _, sanity = _checks(audit)
    assert sanity.steps_checked <= 8 + SANITY_WINDOW_STEPS * audit.missing_hints


def test_a_head_used_on_every_other_batch_is_not_missing_and_its_hints_back_off() -> None:
    for set_to_none in (True, False):  # None, or zeros, on the batches without it
        module = zoo.TwoHeads("all", set_to_none=set_to_none)
        audit, _ = run(module, zoo.regression_data(n=4 * BATCHES), BATCHES)
        assert [f for f in audit.findings if f.severity != "info"] == []
        # the looks (every 8 steps) all come on odd batches, without the head's gradient; the
        # waits between windows double from 5 up to 30 steps
        assert 3 <= audit.missing_hints <= 8, audit.missing_hints
        _, sanity = _checks(audit)
        # (the last window may be cut short, or never open, at the end of the run)
        hinted = sanity.steps_checked - 8
        assert SANITY_WINDOW_STEPS * (audit.missing_hints - 1) <= hinted
        assert hinted <= SANITY_WINDOW_STEPS * audit.missing_hints


class UnusedLayer(zoo.MLP):
    """A trainable layer the loss never reaches (reported once, in the first window)."""

    def __init__(self) -> None:
        super().__init__("sgd")
        self.unused = nn.Linear(4, 4)


def test_a_parameter_already_reported_opens_no_window() -> None:
    audit, _ = run(UnusedLayer(), zoo.regression_data(n=4 * BATCHES), BATCHES)
    (finding,) = [f for f in audit.findings if f.code == "missing-grad"]
    assert finding.params == ("unused.weight", "unused.bias")
    assert audit.missing_hints == 0
    _, sanity = _checks(audit)
    assert sanity.steps_checked == 8


def test_without_the_zero_grad_check_the_sanity_check_keeps_the_spaced_windows() -> None:
    """Alone, it has the spaced windows to itself (they would otherwise watch nothing)."""
    from grad_callbacks import GradientAudit

    audit = GradientAudit(checks=[GradientSanityCheck], on_finding="log")
    assert audit.budget is not None
    audit.budget.interval = lambda run_seconds, share: 10**6  # type: ignore[method-assign]
    data = zoo.regression_data(n=4 * BATCHES)
    zoo.fit(zoo.MLP(), [audit], data=data, limit_train_batches=BATCHES)
    (sanity,) = audit.checks
    assert isinstance(sanity, GradientSanityCheck)
    assert audit.watch_windows is not None and audit.watch_windows.length == SANITY_WINDOW_STEPS
    assert sanity.steps_checked > 8

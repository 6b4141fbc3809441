"""GradientAudit's watch windows: the per-step checks watching some batches only.

The windows here are fixed (``FixedWindows``: one every 31 batches, so that
windows must wait for an accumulation boundary) instead of timed, so
that what is watched is known; the checks must stay silent on clean runs across the gaps, find
bugs that start inside a window or inside a gap, and leave training bitwise unchanged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from grad_callbacks import (
    Finding,
    GradientAudit,
    GradientAuditWarning,
    GradientSanityCheck,
    ZeroGradCheck,
)
from grad_callbacks.callbacks.pacing import MAX_WINDOW_GAP_STEPS
from grad_callbacks.core.budget import WatchWindows
from tests import zoo

PERIOD = 31
BATCHES = 72  # a multiple of the accumulations tested: no short last window


class FixedWindows(WatchWindows):
    """A window every ``PERIOD`` batches, whatever the time it took."""

    def gap(self, window_seconds: float) -> int:
        return PERIOD

    def request(self, length: int = 0) -> None:
        """No extra windows (the sentinels' are tested in test_latency.py)."""


def _audit(**kwargs: Any) -> GradientAudit:
    """Both checks watch every window, of 4 batches (by default the sanity check watches only
    the first window and those its sentinel asks for, and the others last 2 batches: see
    test_sanity_hints.py)."""
    audit = GradientAudit(checks=[ZeroGradCheck, GradientSanityCheck], **kwargs)
    # length and max_gap are set at train start; max_gap no shorter than PERIOD here
    audit.watch_windows = FixedWindows(None, share=1.0, length=1)
    audit._sanity_hints_allowed = False
    return audit


def _watched(
    length: int, batches: int = BATCHES, accumulate: int = 1, period: int = PERIOD
) -> list[int]:
    """The batches FixedWindows watches when windows open at accumulation boundaries (the
    first window lasts 8 steps)."""
    out: list[int] = []
    start = 0
    while start < batches:
        n = max(length, 8 * accumulate) if start == 0 else length
        out += range(start, min(start + n, batches))
        start += max(period, n)
        start += -start % accumulate
    return out


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


def _data(n: int = 4 * BATCHES) -> Any:
    return zoo.regression_data(n=n)


class GANZeros(zoo.GAN):
    """Lightning's GAN recipe, clearing gradients in place: windows open on gradients that hold
    zeros from before them, in both optimizers."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        for opt, index in ((opt_d, 1), (opt_g, 0)):
            self.toggle_optimizer(opt)
            self.manual_backward(self._losses(real)[index])
            opt.step()
            opt.zero_grad(set_to_none=False)
            self.untoggle_optimizer(opt)


CLEAN_CASES = {
    "mlp-sgd": lambda: (zoo.MLP("sgd"), {}, _data()),
    "mlp-accumulate-2": lambda: (zoo.MLP("adam"), {"accumulate_grad_batches": 2}, _data()),
    "mlp-accumulate-3": lambda: (zoo.MLP("adam"), {"accumulate_grad_batches": 3}, _data()),
    "mlp-clip": lambda: (zoo.MLP(), {"gradient_clip_val": 0.1}, _data()),
    "mlp-bf16": lambda: (zoo.MLP(), {"precision": "bf16-mixed"}, _data()),
    "set-to-none-false": lambda: (zoo.SetToNoneFalse(), {"accumulate_grad_batches": 2}, _data()),
    "two-heads": lambda: (zoo.TwoHeads("all"), {}, _data()),
    "two-heads-zeros": lambda: (zoo.TwoHeads("all", set_to_none=False), {}, _data()),
    "manual": lambda: (zoo.ManualMLP(), {}, _data()),
    "manual-accumulation": lambda: (zoo.ManualMLP(accumulate=2), {}, _data()),
    "gan-toggle": lambda: (zoo.GAN("toggle"), {}, zoo.gan_data(n=4 * BATCHES)),
    "gan-alternate": lambda: (zoo.GAN("alternate"), {}, zoo.gan_data(n=4 * BATCHES)),
    "gan-zeros": lambda: (GANZeros(), {}, zoo.gan_data(n=4 * BATCHES)),
}


@pytest.mark.parametrize("case", sorted(CLEAN_CASES))
def test_clean_runs_stay_silent_across_the_gaps(case: str) -> None:
    module, kwargs, data = CLEAN_CASES[case]()
    audit = _audit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        trainer = zoo.fit(module, [audit], data=data, **kwargs)
    assert _alarms(audit.findings) == []
    # no short-accumulation-window either: windows open where accumulation windows do
    assert audit.findings == []
    windows = audit.watch_windows
    assert windows is not None and windows.batches == BATCHES
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    # Gaps are at most MAX_WINDOW_GAP_STEPS optimizer steps: 20 batches where a GAN takes two
    # steps per batch.
    per_batch = trainer.global_step / BATCHES
    period = min(PERIOD, int(MAX_WINDOW_GAP_STEPS / per_batch)) if per_batch > 1 else PERIOD
    expected = _watched(windows.length, accumulate=accumulate, period=period)
    assert windows.watched == len(expected) < BATCHES


class ZeroGradUntil(zoo.ManualMLP):
    """Manual optimization that stops calling ``opt.zero_grad()`` from batch ``broken_from``."""

    def __init__(self, broken_from: int) -> None:
        super().__init__()
        self.broken_from = broken_from

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.zero_grad_enabled = batch_idx < self.broken_from
        super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("broken_from", "first_step"),
    [
        (3, 4),  # inside the first window (batches 0-7): caught at the next step
        (33, 34),  # inside the second window (batches 31-34)
        (45, 63),  # in a gap: the window from 62 judges its second step
    ],
)
def test_missing_zero_grad_is_caught_in_the_next_window(broken_from: int, first_step: int) -> None:
    audit = _audit(on_finding="log")
    zoo.fit(ZeroGradUntil(broken_from), [audit], data=_data())
    (finding,) = [f for f in audit.findings if f.code == "missing-zero-grad"]
    assert finding.step == first_step
    assert _watched(4).count(first_step) == 1


class NaNFrom(zoo.MLP):
    """The loss becomes NaN from batch ``bad_from``: the gradients (and weights) go NaN."""

    def __init__(self, bad_from: int) -> None:
        super().__init__("sgd")
        self.bad_from = bad_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx >= self.bad_from else loss


def test_nonfinite_gradients_from_a_gap_are_reported_naming_their_first_step() -> None:
    audit = _audit(on_finding="log")
    zoo.fit(NaNFrom(45), [audit], data=_data())
    (finding,) = [f for f in audit.findings if f.code == "nonfinite-grad"]
    # GradientAudit's always-on sentinel saw the loss go NaN at batch 45; the parameters are
    # those of the first watched step (62, with no extra window here)
    assert finding.step == 45
    assert finding.data["first_batch_idx"] == 45 and finding.data["first_seen_in"] == "loss"
    assert finding.data["sampled"] is True
    assert "step 45 (batch_idx 45)" in finding.message


class DetachedFrom(zoo.MLP):
    """The first layer is cut off from the loss from batch ``cut_from`` on."""

    def __init__(self, cut_from: int) -> None:
        super().__init__("sgd")
        self.cut_from = cut_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.net[0](x)
        if batch_idx >= self.cut_from:
            h = h.detach()
        return nn.functional.mse_loss(self.net[2](self.net[1](h)), y)


def test_missing_grad_counts_watched_steps_in_a_row() -> None:
    audit = _audit(on_finding="log")
    zoo.fit(DetachedFrom(37), [audit], data=_data())
    (finding,) = [f for f in audit.findings if f.code == "missing-grad"]
    # batches 37 and 38 are 2 steps in a row without a gradient (patience 3); the streak starts
    # again after the gap, and reaches 3 at batch 64
    assert finding.step == 64
    assert finding.params == ("net.0.weight", "net.0.bias")


@pytest.mark.parametrize("case", ["manual", "gan-toggle", "mlp-accumulate-2"])
def test_windows_leave_training_bitwise_unchanged(case: str) -> None:
    results = []
    for callbacks in ([], [_audit(on_finding="log")]):
        torch.manual_seed(0)
        module, kwargs, data = CLEAN_CASES[case]()
        zoo.fit(module, callbacks, data=data, **kwargs)
        results.append(zoo.params_of(module))
    bare, audited = results
    assert bare.keys() == audited.keys()
    for name in bare:
        assert torch.equal(bare[name], audited[name]), name


def test_the_report_states_the_share_of_batches_watched(tmp_path: Path) -> None:
    audit = _audit(on_finding="log")
    audit.report_dir = str(tmp_path)
    zoo.fit(zoo.MLP(), [audit], data=_data())
    report = json.loads((tmp_path / "grad_audit.json").read_text())
    overhead = report["overhead"]
    assert overhead["watched_share"] == pytest.approx(len(_watched(4)) / BATCHES, abs=1e-6)
    assert overhead["watch_window_batches"] == 4
    assert 0 < overhead["measured"]


def test_the_report_states_one_time_and_steady_cost_and_the_bounds(tmp_path: Path) -> None:
    audit = GradientAudit(on_finding="log", report_dir=str(tmp_path))
    assert audit.budget is not None
    audit.budget.steady_from = 20
    zoo.fit(zoo.MLP(), [audit], data=_data())
    overhead = json.loads((tmp_path / "grad_audit.json").read_text())["overhead"]
    one, steady = overhead["one_time"], overhead["steady_state"]
    # the first batch carries the first runs of the expensive checks: it is the one-time part
    assert 0 < one["seconds"] <= overhead["check_seconds"]
    assert one["training_steps"] > 0
    assert steady["from_step"] == 20 and steady["steps"] == BATCHES - 20
    assert steady["measured"] == pytest.approx(
        steady["check_seconds"] / steady["train_seconds"], rel=1e-3
    )
    assert steady["check_seconds"] + one["seconds"] <= overhead["check_seconds"] + 1e-6
    assert overhead["latency_bounds_steps"] == {
        "nonfinite-grad": 10,
        "missing-zero-grad": 50,
        "gradient-leak": 50,
        "stale-grad": 50,
        "missing-grad": 50,
    }
    assert overhead["max_window_gap_batches"] == 40


def test_no_windows_under_raise_or_without_a_budget() -> None:
    assert GradientAudit(on_finding="raise").watch_windows is None
    assert GradientAudit(max_overhead=None).watch_windows is None
    audit = GradientAudit(max_overhead=None, checks=[ZeroGradCheck, GradientSanityCheck])
    zoo.fit(zoo.MLP(), [audit], data=_data())
    assert all(check.watching for check in audit.checks)
    sanity = audit.checks[1]
    assert sanity.steps_checked == BATCHES


def test_a_checkpoint_saved_in_a_gap_does_not_carry_streaks_over_it() -> None:
    audit = _audit(on_finding="log")
    zoo.fit(DetachedFrom(64), [audit], data=_data())  # batches 64, 65 watched; 66-71 not
    sanity = audit.checks[1]
    assert isinstance(sanity, GradientSanityCheck) and not sanity.watching
    assert sanity._monitor is not None and sanity._monitor.streaks()  # a streak of 2 at 65
    assert sanity.extra_state()["streaks"] == []


class UnfreezeInStep(zoo.MLP):
    """Clean: the first layer is in the optimizer but frozen until ``training_step`` of batch
    ``at`` unfreezes it (after the callbacks' on_train_batch_start)."""

    def __init__(self, at: int) -> None:
        super().__init__("sgd")
        self.at = at
        self.net[0].requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == self.at:
            self.net[0].requires_grad_(True)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("at", [5, 33])  # in the first window, and in the second
def test_a_layer_unfrozen_inside_a_watched_batch_is_not_stale(at: int) -> None:
    """Hooked mid-batch, the layer's .grad already holds this batch's gradient: not an old one."""
    for audit in (_audit(on_finding="log"), ZeroGradCheck(on_finding="log")):
        zoo.fit(UnfreezeInStep(at), [audit], data=_data())
        assert _alarms(audit.findings) == []


def test_a_watching_check_that_raises_turns_the_windows_off() -> None:
    assert GradientAudit(checks=[ZeroGradCheck(on_finding="raise")]).watch_windows is None
    assert GradientAudit(checks=[GradientSanityCheck(on_finding="raise")]).watch_windows is None
    assert GradientAudit(checks=[ZeroGradCheck, GradientSanityCheck]).watch_windows is not None


def test_windows_follow_a_gradient_accumulation_scheduler() -> None:
    """accumulate_grad_batches goes from 1 to 2 at epoch 1: windows then last 8 batches and
    open at even batches, so no window's first step sees half an accumulation window."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    audit = _audit(on_finding="log")
    scheduler = GradientAccumulationScheduler(scheduling={1: 2})
    zoo.fit(zoo.MLP(), [scheduler, audit], data=zoo.regression_data(n=4 * 41), max_epochs=2)
    windows = audit.watch_windows
    assert windows is not None and windows.length == 8
    # the third window would open at epoch 1's batch 21, and waits for batch 22
    assert audit.findings == []


def test_watching_checks_log_a_scalar_at_every_step_they_check() -> None:
    """Under windows, the per-step checks' charts are lines: one point per watched step (they
    were logged only where a window met the log_every_n_steps cadence: step 0)."""
    logger = zoo.RecordingLogger()
    audit = _audit(on_finding="log")
    zoo.fit(zoo.MLP(), [audit], data=_data(), logger=logger, log_every_n_steps=50)
    zero_grad, sanity = audit.checks
    watched = _watched(audit.watch_windows.length)
    # more than the first window (8 steps; later windows watch 4)
    assert len(watched) == zero_grad.steps_checked == sanity.steps_checked > 8

    def steps(tag: str) -> list[int]:
        return sorted(s for s, m in logger.metrics.items() if tag in m)

    assert steps("grad_audit/zero_grad/uncleared_params") == watched
    assert steps("grad_audit/sanity/missing_params") == watched
    assert steps("grad_audit/sanity/nonfinite_params") == watched
    assert {logger.metrics[s]["grad_audit/sanity/missing_params"] for s in watched} == {0.0}

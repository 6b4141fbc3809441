"""GradientAudit()'s detection latency, in optimizer steps, on a machine where the budget allows
little watching.

The budget is made to behave as on a slow machine for the checks (every interval it computes is
huge, as when the checks cost far more than the steps), so that the watch windows are as far
apart as GradientAudit allows and only its bounds and sentinels keep the latency down. Bugs are
planted at a batch inside a gap between windows (and at the worst place: right after a window
closed); the test counts the batches from onset to the first batch at whose end the finding is
in ``audit.findings``. The bounds are the contract (SPEC: 10 steps for a NaN/Inf, 50 for the
rest), and pinned here, not timed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.pacing import (
    LATENCY_BOUNDS,
    MAX_WINDOW_GAP_STEPS,
    WATCH_WINDOW_STEPS,
)
from tests import zoo
from tests.zoo import FirstSeen


def slow_machine_audit(**kwargs: Any) -> GradientAudit:
    """``GradientAudit(on_finding="log", **kwargs)`` whose budget spaces everything as far as it
    can."""
    audit = GradientAudit(on_finding="log", **kwargs)
    assert audit.budget is not None
    audit.budget.interval = lambda run_seconds, share: 10**6  # type: ignore[method-assign]
    return audit


def run(module: L.LightningModule, data: Any, batches: int) -> tuple[GradientAudit, FirstSeen]:
    audit = slow_machine_audit()
    seen = FirstSeen(audit)
    torch.manual_seed(0)
    zoo.fit(module, [audit, seen], data=data, max_steps=-1, limit_train_batches=batches)
    return audit, seen


# Onsets: inside a gap, and right after a window closed (windows open every
# MAX_WINDOW_GAP_STEPS batches and watch WATCH_WINDOW_STEPS).
ONSETS = (17, MAX_WINDOW_GAP_STEPS + WATCH_WINDOW_STEPS)
BATCHES = MAX_WINDOW_GAP_STEPS * 2 + 20


def _mlp() -> tuple[L.LightningModule, Any, torch.nn.Module]:
    module = zoo.MLP()
    return module, zoo.regression_data(n=4 * BATCHES), module.net[0]


def _cnn() -> tuple[L.LightningModule, Any, torch.nn.Module]:
    module = zoo.CNN()
    return module, zoo.image_data(n=4 * BATCHES), module.net[0]


MODELS = {"mlp": _mlp, "cnn": _cnn}
CODE = {"nan": "nonfinite-grad", "no_zero_grad": "missing-zero-grad", "detach": "missing-grad"}


# The CNN's steps are slower here: its bugs start at the worst place only.
CASES = [("mlp", bug, onset) for bug in zoo.PLANTED_BUGS for onset in ONSETS] + [
    ("cnn", bug, ONSETS[-1]) for bug in zoo.PLANTED_BUGS
]


@pytest.mark.parametrize(("model", "bug", "onset"), CASES)
def test_planted_bug_is_found_within_its_bound(model: str, bug: str, onset: int) -> None:
    module, data, layer = MODELS[model]()
    zoo.plant(module, bug, onset, layer)
    audit, seen = run(module, data, BATCHES)
    code = CODE[bug]
    assert code in seen.at, (code, [f.code for f in audit.findings])
    assert 0 <= seen.at[code] - onset <= LATENCY_BOUNDS[code]
    assert audit.watch_windows is not None and audit.watch_windows.watched_share < 0.5
    if bug == "nan":
        (finding,) = [f for f in audit.findings if f.code == code]
        # The first step and batch where it appeared (one step per batch here).
        assert finding.step == onset
        assert finding.data["first_batch_idx"] == onset


@pytest.mark.parametrize("onset", ONSETS)
def test_gan_leak_is_found_within_its_bound(onset: int) -> None:
    """In optimizer steps: the GAN's two optimizers take two per batch (windows were spaced 40
    batches apart, 80 steps: the leak was found 74-78 steps after its onset)."""
    audit, seen = run(zoo.LeakingGAN(onset), zoo.gan_data(n=4 * BATCHES), BATCHES)
    assert "gradient-leak" in seen.at, [f.code for f in audit.findings]
    steps = seen.steps_after("gradient-leak", onset)
    assert steps is not None and 0 <= steps <= LATENCY_BOUNDS["gradient-leak"]
    assert seen.at["gradient-leak"] - onset < steps  # more steps than batches


def test_clean_runs_stay_silent_with_the_sentinels() -> None:
    for module, data in (
        (zoo.MLP(), zoo.regression_data(n=4 * BATCHES)),
        (zoo.SetToNoneFalse(), zoo.regression_data(n=4 * BATCHES)),
        (zoo.GAN("zero_first"), zoo.gan_data(n=4 * BATCHES)),
        (zoo.GAN("toggle"), zoo.gan_data(n=4 * BATCHES)),
    ):
        audit, _ = run(module, data, BATCHES)
        assert [f for f in audit.findings if f.severity != "info"] == []


def test_windows_alone_bound_a_missing_zero_grad_in_place() -> None:
    """Gradients cleared in place (``set_to_none=False``) fool the clear sentinel: its first
    window finds nothing and it stands down; a zero_grad that stops later is still found by the
    spaced windows within the bound."""
    onset = ONSETS[-1]
    module = zoo.SetToNoneFalse()
    zoo.plant(module, "no_zero_grad", onset, module.net[0])
    audit, seen = run(module, zoo.regression_data(n=4 * BATCHES), BATCHES)
    assert audit.clear_sentinel is None  # stood down
    assert 0 <= seen.at["missing-zero-grad"] - onset <= LATENCY_BOUNDS["missing-zero-grad"]


def test_windows_closer_than_their_share_allows_are_fixed_cost() -> None:
    """Windows kept 40 steps apart against the budget's wish cost more than their share: the
    budget counts their time as fixed (taken out first), so the periodic checks space out."""
    audit = slow_machine_audit()
    assert audit.budget is not None and audit.watch_windows is not None
    windows, record = audit.watch_windows, audit.budget.record_step
    seen: list[tuple[bool, float]] = []

    def record_step(train: float, check: float, scheduled: float = 0.0, **kw: Any) -> None:
        if audit.checks[0].watching:
            seen.append((windows.capped, scheduled))
        record(train, check, scheduled, **kw)

    audit.budget.record_step = record_step  # type: ignore[method-assign]
    data = zoo.regression_data(n=4 * BATCHES)
    zoo.fit(zoo.MLP(), [audit], data=data, limit_train_batches=BATCHES)
    capped = [scheduled for is_capped, scheduled in seen if is_capped]
    assert capped, seen
    assert all(abs(s) < 1e-9 for s in capped)  # no per-sample run here: nothing scheduled left


# ----------------------------------------------------------------- found in review (fixed)
class _Lagged:
    """A HostCopy whose values land after the first time it is asked (a CUDA copy still on its
    way at the next batch)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        from grad_callbacks.core.grad_stats import HostCopy

        self._copy = HostCopy(tensor)
        self._asked = 0

    def ready(self) -> bool:
        self._asked += 1
        return self._asked > 1

    def result(self) -> torch.Tensor:
        return self._copy.result()


@pytest.mark.parametrize("onset", [60, 62, 65])
def test_a_look_whose_values_land_later_is_read_within_the_bound(
    onset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on an accelerator (a look every 5 steps, its values land after it): a look taken in an
    idle batch left its read for the next look, 11 steps after the onset."""
    import grad_callbacks.callbacks.pacing as pacing
    import grad_callbacks.core.sentinel as sentinel

    monkeypatch.setattr(sentinel, "HostCopy", _Lagged)
    monkeypatch.setattr(pacing, "FINITE_EVERY_STEPS_CPU", pacing.FINITE_EVERY_STEPS)
    module, data, layer = _mlp()
    zoo.plant(module, "nan", onset, layer)
    audit, seen = run(module, data, BATCHES)
    steps = seen.steps_after("nonfinite-grad", onset)
    assert steps is not None and steps <= LATENCY_BOUNDS["nonfinite-grad"]
    (finding,) = [f for f in audit.findings if f.code == "nonfinite-grad"]
    assert finding.step == onset
    assert audit.idle_batch_count > 0


def test_a_scheduler_lowering_accumulate_keeps_the_bound() -> None:
    """accumulate 4 then 1 (GradientAccumulationScheduler): the gap chosen under 4 (160 batches)
    was kept, and a zero_grad stopping at epoch 1 (in place, so only the windows see it) was
    found 146 optimizer steps later."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    batches = 240
    module = zoo.SetToNoneFalse()
    zoo.plant(module, "no_zero_grad", batches, module.net[0])
    audit = slow_machine_audit()
    seen = FirstSeen(audit)
    torch.manual_seed(0)
    zoo.fit(
        module,
        [audit, seen, GradientAccumulationScheduler({0: 4, 1: 1})],
        data=zoo.regression_data(n=4 * batches),
        max_steps=-1,
        max_epochs=2,
        limit_train_batches=batches,
    )
    steps = seen.steps_after("missing-zero-grad", batches)
    assert steps is not None and 0 <= steps <= LATENCY_BOUNDS["missing-zero-grad"]


class _OneNaNBatch(zoo.MLP):
    """Batch 20's inputs are NaN; the module drops non-finite gradients before stepping."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.trainer.fit_loop.epoch_loop.total_batch_idx == 20:
            x = x * float("nan")
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if any(not torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
            for p in self.parameters():
                p.grad = None


def test_missing_grad_is_still_found_after_a_nan() -> None:
    """After a NaN the sentinel stops looking: its hints stopped with it, and a layer detached
    later was never reported. The sanity check now watches every window again."""
    onset = 60
    module = _OneNaNBatch()
    zoo.plant(module, "detach", onset, module.net[0])
    audit, seen = run(module, zoo.regression_data(n=4 * 150), 150)
    assert audit.finite_sentinel is None  # it saw the NaN
    steps = seen.steps_after("missing-grad", onset)
    assert steps is not None and 0 <= steps <= LATENCY_BOUNDS["missing-grad"]


def test_a_second_fit_with_the_same_audit_starts_afresh() -> None:
    """A second Trainer.fit (global_step from 0 again) kept the first fit's hint waits (in its
    steps) and windows (no first window): a layer detached early in it was not reported."""
    audit = slow_machine_audit()
    first = zoo.MLP()
    zoo.plant(first, "detach", 80, first.net[0])
    data = zoo.regression_data(n=4 * BATCHES)
    zoo.fit(first, [audit], data=data, max_steps=-1, limit_train_batches=BATCHES)
    assert audit._hint_quiet_until > 17  # waits set in the first fit's steps
    second = _Body()  # other parameter names: its finding is not merged with the first's
    zoo.plant(second, "detach", 17, second.body[0])
    zoo.fit(second, [audit], data=data, max_steps=-1, limit_train_batches=BATCHES)
    new = [f for f in audit.findings if f.code == "missing-grad" and f.params[0].startswith("body")]
    assert new and all(17 <= f.step <= 17 + LATENCY_BOUNDS["missing-grad"] for f in new)


class _Body(zoo.MLP):
    """:class:`zoo.MLP` with its layers under ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = self.net
        del self.net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)


class _NCritic(zoo.GAN):
    """WGAN-style: the discriminator steps at every batch, the generator at every 5th; the
    generator's zero_grad stops at batch ``onset``."""

    def __init__(self, onset: int) -> None:
        super().__init__()
        self.onset = onset

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        _, d_loss = self._losses(real)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if batch_idx % 5 == 4:
            g_loss, _ = self._losses(real)
            if self.trainer.fit_loop.epoch_loop.total_batch_idx < self.onset:
                opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()


def test_an_optimizer_stepping_every_few_batches_is_judged_in_the_windows() -> None:
    """Windows of 4 batches held at most one step of a generator stepping every 5th batch: its
    missing zero_grad was never found (and the clear sentinel's window, finding nothing, stood
    it down). Windows now hold two steps of the slowest optimizer."""
    onset = 30
    audit, seen = run(_NCritic(onset), zoo.gan_data(n=4 * 200), 200)
    steps = seen.steps_after("missing-zero-grad", onset)
    assert steps is not None and 0 <= steps <= LATENCY_BOUNDS["missing-zero-grad"]
    (finding,) = [f for f in audit.findings if f.code == "missing-zero-grad"]
    assert all(name.startswith("generator") for name in finding.params)

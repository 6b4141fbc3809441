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

"""PerSampleGradientCheck in manual optimization without extra user code: the losses handed to
``manual_backward`` are captured from a replay of ``training_step`` and checked per optimizer."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo


def _check() -> PerSampleGradientCheck:
    return PerSampleGradientCheck(every_n_steps=1, on_finding="log")


class SummedGAN(zoo.GAN):
    """Broken: one of the two losses is summed over the batch (``reduction-sum``)."""

    def __init__(self, mode: str, summed: str) -> None:
        super().__init__(mode)
        self.summed = summed

    def _losses(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_loss, d_loss = super()._losses(real)
        b = real.shape[0]
        return (g_loss * b, d_loss) if self.summed == "generator" else (g_loss, d_loss * b)


class HookedGAN(zoo.GAN):
    """Broken: a hook doubles one network's gradients before its optimizer steps
    (``grad-mismatch`` on that network only)."""

    def __init__(self, mode: str, hooked: str) -> None:
        super().__init__(mode)
        for p in getattr(self, hooked).parameters():
            p.register_hook(lambda g: 2 * g)


@pytest.mark.parametrize("mode", ["toggle", "zero_first", "alternate"])
def test_a_clean_gan_is_checked_per_optimizer_and_quiet(mode: str) -> None:
    """Before: check-skipped (manual optimization needed a per_sample_loss method)."""
    check = _check()
    zoo.fit(zoo.GAN(mode), [check], data=zoo.gan_data(), max_steps=4)
    assert check.findings == []
    assert check.steps_checked >= 2 and check.last_stats is not None
    assert check.last_stats.n == 4


@pytest.mark.parametrize("mode", ["toggle", "zero_first"])
@pytest.mark.parametrize("summed", ["generator", "discriminator"])
def test_a_summed_loss_is_found_for_either_optimizer(mode: str, summed: str) -> None:
    check = _check()
    zoo.fit(SummedGAN(mode, summed), [check], data=zoo.gan_data(), max_steps=2)
    assert [f.code for f in check.findings] == ["reduction-sum"]
    assert check.findings[0].step == 0  # the batch's first step, not the global step after it
    assert check.findings[0].data["scale"] == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("mode", ["toggle", "zero_first"])
@pytest.mark.parametrize("hooked", ["generator", "discriminator"])
def test_a_gradient_changed_before_the_step_is_found_on_its_optimizer(
    mode: str, hooked: str
) -> None:
    check = _check()
    zoo.fit(HookedGAN(mode, hooked), [check], data=zoo.gan_data(), max_steps=2)
    (finding,) = check.findings
    assert finding.code == "grad-mismatch"
    assert finding.params and all(name.startswith(hooked) for name in finding.params)
    assert finding.data["relative_error"] == pytest.approx(1.0, rel=1e-3)  # 2g against g


@pytest.mark.parametrize("raw_backward", [False, True])
def test_manual_single_optimizer_is_checked(raw_backward: bool) -> None:
    check = _check()
    zoo.fit(zoo.ManualMLP(raw_backward=raw_backward), [check], max_steps=3)
    assert check.findings == [] and check.steps_checked == 3


def test_a_per_sample_loss_method_stays_an_option() -> None:
    class WithPerSampleLoss(zoo.ManualMLP):
        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return ((self.net(x) - y) ** 2).mean(dim=1)

    check = _check()
    zoo.fit(WithPerSampleLoss(), [check], max_steps=2)
    assert check.findings == [] and check.last_stats is not None


def test_the_audit_leaves_a_gan_bitwise_identical_and_checks_it() -> None:
    def run(audit: bool) -> tuple[dict[str, torch.Tensor], GradientAudit | None]:
        L.seed_everything(0)
        module = zoo.GAN("toggle")
        callbacks = [GradientAudit(on_finding="log")] if audit else []
        zoo.fit(module, callbacks, data=zoo.gan_data())
        return zoo.params_of(module), (callbacks[0] if audit else None)

    plain, _ = run(False)
    audited, audit = run(True)
    assert audit is not None
    assert all(torch.equal(plain[k], audited[k]) for k in plain)
    assert [f for f in audit.findings if f.severity != "info"] == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked >= 1 and per_sample.findings == []

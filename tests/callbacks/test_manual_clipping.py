"""Gradient clipping written in a manual-optimization ``training_step``
(``clip_grad_norm_`` between ``manual_backward`` and ``opt.step()``), as users do: the
optimizer's gradient is the loss gradient scaled down, which is no ``grad-mismatch``; and the
recomputed step's clipping must not reach the real gradients (they carry over to the next step
when ``zero_grad`` is forgotten)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo


class ManualClipped(L.LightningModule):
    """Manual optimization with ``clip_grad_norm_`` (max norm 0.05: every step clips).

    Args:
        zero_grad: call ``opt.zero_grad()`` before the backward pass (False plants the bug).
        hook_scale: plant a gradient hook that scales the first layer's weight gradient.
    """

    def __init__(self, zero_grad: bool = True, hook_scale: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.zero_grad_first = zero_grad
        self.norms: list[float] = []  # before clipping (the recomputations' included)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
        if hook_scale is not None:
            self.net[0].weight.register_hook(lambda g: g * hook_scale)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        opt = self.optimizers()
        loss = F.cross_entropy(self.net(x), y)
        if self.zero_grad_first:
            opt.zero_grad()
        self.manual_backward(loss)
        self.norms.append(float(torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)))
        opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (24,), generator=g)), batch_size=8)


def _fit(audit: GradientAudit | None, **kwargs: Any) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = ManualClipped(**kwargs)
    zoo.fit(module, [audit] if audit is not None else [], data=_data(), max_steps=3)
    if audit is None:
        assert min(module.norms) > 0.05  # the test's premise: every step clips
    return zoo.params_of(module)


def _audit() -> GradientAudit:
    return GradientAudit(
        checks=[PerSampleGradientCheck], on_finding="log", every_n_steps=1, max_overhead=None
    )


@pytest.mark.parametrize("zero_grad", [True, False], ids=["zero-grad", "forgotten-zero-grad"])
def test_clipping_in_a_manual_step_is_no_mismatch_and_leaves_the_run_unchanged(
    zero_grad: bool,
) -> None:
    plain = _fit(None, zero_grad=zero_grad)
    audit = _audit()
    audited = _fit(audit, zero_grad=zero_grad)
    assert [k for k in plain if not torch.equal(plain[k], audited[k])] == []
    check = audit.checks[0]
    assert isinstance(check, PerSampleGradientCheck) and check.steps_checked == 3
    assert [f.code for f in audit.findings if f.severity != "info"] == []


def test_a_rescaling_hook_under_manual_clipping_is_still_a_mismatch() -> None:
    audit = _audit()
    _fit(audit, hook_scale=3.0)
    assert "grad-mismatch" in {f.code for f in audit.findings}

"""The audit on a CUDA device: findings as on the CPU, and no host-device synchronisation on
steps where no check is scheduled (SPEC: "Cheap by default").

Skipped without a GPU. Run on a lent GPU machine with ``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from grad_callbacks.callbacks.base import AuditCallback
from grad_callbacks.callbacks.hooks import CALLBACK_HOOKS
from tests import zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fit_cuda(module: L.LightningModule, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return zoo.fit(module, callbacks, accelerator="cuda", devices=1, **kwargs)


def test_clean_run_is_silent_and_missing_zero_grad_fires_on_cuda() -> None:
    clean = GradientAudit(on_finding="log")
    _fit_cuda(zoo.MLP(), [clean])
    assert [f for f in clean.findings if f.severity != "info"] == []
    broken = GradientAudit(on_finding="log")
    _fit_cuda(zoo.NoZeroGradAutomatic(), [broken])
    assert "missing-zero-grad" in {f.code for f in broken.findings}


def test_summed_loss_is_reduction_sum_on_cuda() -> None:
    check = PerSampleGradientCheck(on_finding="log", every_n_steps=1)
    _fit_cuda(zoo.SummedLoss(), [check])
    assert "reduction-sum" in {f.code for f in check.findings}


class _SyncGuard(L.Callback):
    """Runs an audit callback's hooks with CUDA sync debugging set to "error" on chosen steps.

    The trainer itself synchronises (logging, the loss); only the audit's own hooks are guarded.
    """

    def __init__(self, inner: AuditCallback, guarded: Callable[[int], bool]) -> None:
        self.inner = inner
        self.guarded = guarded
        self.guarded_calls = 0

    @staticmethod
    def _make(name: str) -> Callable[..., None]:
        def hook(self: _SyncGuard, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
            run = getattr(self.inner, name)
            if not self.guarded(trainer.global_step):
                run(trainer, *args, **kwargs)
                return
            self.guarded_calls += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                run(trainer, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return hook


for _name in CALLBACK_HOOKS:
    setattr(_SyncGuard, _name, _SyncGuard._make(_name))


def test_unscheduled_steps_do_no_host_device_synchronisation() -> None:
    # Scheduled work: the first two steps (per-sample, batch mixing, autograd), and every 50th
    # step (sanity read, monitor, logged scalars). Steps 3..48 have nothing scheduled.
    # Under "log", a synchronising call inside a check's guarded body becomes check-skipped.
    audit = GradientAudit(on_finding="log", max_overhead=None)
    guard = _SyncGuard(audit, lambda step: 3 <= step <= 48)
    _fit_cuda(
        zoo.MLP(),
        [guard],
        data=zoo.regression_data(n=4 * 60, batch_size=4),
        log_every_n_steps=50,
    )
    assert guard.guarded_calls > 40 * 5
    assert [f for f in audit.findings if f.code == "check-skipped"] == []

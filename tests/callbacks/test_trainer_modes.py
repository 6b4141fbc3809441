"""The whole audit under the Trainer's other modes: fast_dev_run, limit_train_batches,
validation-only runs, max_steps mid-epoch. Training is never broken and nothing false fires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from grad_callbacks import GradientAudit
from tests import zoo


class WithValidation(zoo.MLP):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        return loss


def _alarms(audit: GradientAudit) -> list[Any]:
    return [f for f in audit.findings if f.severity != "info"]


def test_fast_dev_run(tmp_path: Path) -> None:
    audit = GradientAudit()
    trainer = zoo.fit(zoo.MLP(), [audit], fast_dev_run=True, default_root_dir=tmp_path)
    assert trainer.global_step == 1
    assert _alarms(audit) == []
    assert all(c.steps_checked >= 0 for c in audit.checks)


def test_limit_train_batches_and_max_steps_mid_epoch() -> None:
    audit = GradientAudit(every_n_steps=1)
    trainer = zoo.fit(zoo.MLP(), [audit], limit_train_batches=3, max_epochs=2)
    assert trainer.global_step == 6 and _alarms(audit) == []
    audit = GradientAudit(every_n_steps=1)
    trainer = zoo.fit(zoo.MLP(), [audit], max_steps=3, accumulate_grad_batches=2)
    assert trainer.global_step == 3 and _alarms(audit) == []


def test_validation_only_run_touches_nothing(tmp_path: Path) -> None:
    audit = GradientAudit(report_dir=str(tmp_path))
    module = WithValidation()
    before = zoo.params_of(module)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[audit],
        default_root_dir=tmp_path, enable_model_summary=False,
    )
    trainer.validate(module, zoo.regression_data())
    assert audit.findings == [] and all(c.steps_checked == 0 for c in audit.checks)
    after = zoo.params_of(module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "grad_audit.json").exists()  # the report is written at fit end


def test_fit_with_validation_keeps_validation_metrics() -> None:
    results = []
    for callbacks in ([], [GradientAudit(every_n_steps=1, on_finding="log")]):
        torch.manual_seed(0)
        trainer = zoo.fit(WithValidation(), callbacks, limit_val_batches=2, max_epochs=2)
        trainer.validate(trainer.lightning_module, zoo.regression_data(), verbose=False)
        results.append(dict(trainer.callback_metrics))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


class FromIterator(zoo.MLP):
    """``training_step(dataloader_iter)``: the step draws its batch itself (Lightning's
    test_fetchers.py), so no check can hand it the batch again."""

    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.automatic_optimization = not manual

    def training_step(self, dataloader_iter: Any) -> torch.Tensor | None:  # type: ignore[override]
        (x, y), _, _ = next(dataloader_iter)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None


def test_a_training_step_that_draws_from_dataloader_iter_is_not_run_again() -> None:
    for manual in (False, True):
        audit = GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)
        trainer = zoo.fit(FromIterator(manual), [audit], limit_train_batches=4)
        assert trainer.global_step == 4
        failed = [f.message for f in audit.findings if " failed: " in f.message]
        assert failed == [], failed
        skipped = {f.check for f in audit.findings if f.code == "check-skipped"
                   and "dataloader_iter" in f.message}
        assert skipped >= {"PerSampleGradientCheck", "AutogradCheck"}, audit.findings
        assert _alarms(audit) == []

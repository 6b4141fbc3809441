"""ZeroGradCheck under 16-bit precision with a GradScaler, and across checkpoint resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision

from grad_callbacks import GradientAudit, ZeroGradCheck
from tests import zoo


class _OverflowOnBatch2(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1e30 if batch_idx == 2 else 1.0)


def test_16_mixed_with_grad_scaler_skipped_steps_are_not_stale() -> None:
    scaler = torch.amp.GradScaler("cpu")
    check = ZeroGradCheck(on_finding="log")
    module = _OverflowOnBatch2()
    real_steps: list[int] = []

    class _CountRealSteps(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(lambda *a: real_steps.append(1))

    trainer = zoo.fit(
        module,
        [check, _CountRealSteps()],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        gradient_clip_val=1.0,
    )
    assert 0 < len(real_steps) < trainer.global_step  # the overflow skipped real steps
    assert check.steps_checked == trainer.global_step  # every attempted step was audited
    assert check.findings == []


def test_16_mixed_broken_run_still_fires() -> None:
    check = ZeroGradCheck(on_finding="log")
    zoo.fit(
        zoo.NoZeroGradAutomatic(),
        [check],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
    )
    assert {f.code for f in check.findings} == {"missing-zero-grad"}


class _SaveAt(L.Callback):
    def __init__(self, batch_idx: int, path: Path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if args[-1] == self.batch_idx:
            trainer.save_checkpoint(self.path)


def _resume(
    module: L.LightningModule, path: Path, data: Any = None, **kwargs: Any
) -> GradientAudit:
    audit = GradientAudit(on_finding="log")
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[audit],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, data if data is not None else zoo.regression_data(), ckpt_path=path)
    return audit


def test_resume_mid_accumulation_window_raises_no_alarm(tmp_path: Path) -> None:
    ckpt = tmp_path / "mid.ckpt"
    first = GradientAudit(on_finding="log")
    # batch 3 opens the second window of accumulate_grad_batches=3
    zoo.fit(zoo.MLP(), [first, _SaveAt(3, ckpt)], accumulate_grad_batches=3)
    resumed = _resume(zoo.MLP(), ckpt, accumulate_grad_batches=3)
    assert resumed.checks[0].steps_checked > 0
    assert [f for f in resumed.findings if f.severity != "info"] == []
    assert {f.code for f in resumed.findings} == {"short-accumulation-window"}


def test_findings_before_resume_are_kept(tmp_path: Path) -> None:
    ckpt = tmp_path / "broken.ckpt"
    first = GradientAudit(on_finding="log")
    zoo.fit(zoo.ManualMLP(zero_grad=False), [first, _SaveAt(4, ckpt)])
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    (saved_finding,) = saved[first.checks[0].state_key]["findings"]
    assert saved_finding["code"] == "missing-zero-grad"
    assert saved_finding["count"] == 4  # steps 1..4 before the checkpoint

    resumed = _resume(zoo.ManualMLP(zero_grad=True), ckpt)
    (finding,) = [f for f in resumed.findings if f.severity != "info"]
    assert finding.code == "missing-zero-grad"
    assert finding.step == 1 and finding.count == 4  # kept, and nothing new after the fix


def test_resume_between_the_two_steps_of_an_alternating_gan(tmp_path: Path) -> None:
    ckpt = tmp_path / "gan.ckpt"
    first = GradientAudit(on_finding="log")
    # batch 2 stepped the discriminator; the generator's step comes after the resume
    zoo.fit(zoo.GAN("alternate"), [first, _SaveAt(2, ckpt)], data=zoo.gan_data())
    assert [f for f in first.findings if f.severity != "info"] == []
    resumed = _resume(zoo.GAN("alternate"), ckpt, data=zoo.gan_data())
    assert resumed.checks[0].steps_checked > 0
    assert [f for f in resumed.findings if f.severity != "info"] == []

"""GradientSanityCheck in real Lightning runs: missing and non-finite gradients."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from grad_callbacks import Finding, GradientAuditError, GradientAuditWarning
from grad_callbacks.callbacks import sanity
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.core.grad_stats import GradSanityMonitor, GroupSummary, HostCopy, LocalGradProbe
from tests import zoo
from tests import zoo_issue4 as z4


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


CLEAN_CASES = {
    "mlp-sgd": lambda: (zoo.MLP("sgd"), {}, None),
    "mlp-adam-accumulate": lambda: (zoo.MLP("adam"), {"accumulate_grad_batches": 3}, None),
    "cnn-clip": lambda: (zoo.CNN("sgd"), {"gradient_clip_val": 0.5}, zoo.image_data()),
    "mlp-bf16": lambda: (zoo.MLP(), {"precision": "bf16-mixed"}, None),
    "set-to-none-false": lambda: (zoo.SetToNoneFalse(), {}, None),
    "frozen-backbone": lambda: (zoo.FrozenBackbone(), {}, None),
    # the auxiliary head gets a gradient every other step: within patience
    "two-heads": lambda: (zoo.TwoHeads("all"), {}, None),
    "two-heads-zeros": lambda: (zoo.TwoHeads("all", set_to_none=False), {}, None),
    "manual": lambda: (zoo.ManualMLP(), {}, None),
    "manual-accumulation": lambda: (zoo.ManualMLP(accumulate=2), {}, None),
    # toggle_optimizer switches requires_grad off for the other optimizer's parameters
    "gan-toggle": lambda: (zoo.GAN("toggle"), {}, zoo.gan_data()),
    "gan-zero-first": lambda: (zoo.GAN("zero_first"), {}, zoo.gan_data()),
    "nan-feature-clean-data": lambda: (z4.NaNFeature(), {}, z4.data_with_bad_sample(None)),
}


@pytest.mark.parametrize("case", sorted(CLEAN_CASES))
def test_clean_training_is_silent(case: str) -> None:
    module, kwargs, data = CLEAN_CASES[case]()
    check = GradientSanityCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        trainer = zoo.fit(module, [check], data=data, **kwargs)
    assert check.steps_checked == trainer.global_step > 0
    assert check.findings == []


def test_detached_branch_is_missing_grad_at_the_patience_step() -> None:
    check = GradientSanityCheck(on_finding="log")
    trainer = zoo.fit(z4.DetachedBranch(), [check])
    (finding,) = check.findings
    assert finding.code == "missing-grad"
    assert finding.severity == "warning"
    assert finding.params == ("branch.weight", "branch.bias")
    assert finding.step == 2  # steps 0, 1, 2 without a gradient: patience 3 reached
    assert finding.count == trainer.global_step - 2  # read every step, seen at steps 2..6
    assert finding.data["optimizer"] == 0 and finding.data["patience"] == 3
    assert "detach()" in finding.message


def test_unused_head_is_missing_grad() -> None:
    check = GradientSanityCheck(on_finding="log", patience=5)
    zoo.fit(z4.UnusedHead(), [check])
    (finding,) = check.findings
    assert finding.code == "missing-grad"
    assert finding.params == ("aux_head.weight", "aux_head.bias")
    assert finding.step == 4


def test_patience_1_flags_a_head_used_every_other_step() -> None:
    check = GradientSanityCheck(on_finding="log", patience=1)
    zoo.fit(zoo.TwoHeads("all"), [check])
    (finding,) = check.findings
    assert (finding.code, finding.params, finding.step) == (
        "missing-grad",
        ("aux.weight", "aux.bias"),
        1,
    )


def test_zero_filled_gradients_count_as_missing() -> None:
    # zero_grad(set_to_none=False): the unused head keeps an all-zero gradient, not None
    class UnusedHeadZeros(z4.UnusedHead):
        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad(set_to_none=False)

        def on_train_start(self) -> None:
            for p in self.aux_head.parameters():
                p.grad = torch.zeros_like(p)

    check = GradientSanityCheck(on_finding="log")
    zoo.fit(UnusedHeadZeros(), [check])
    (finding,) = check.findings
    assert (finding.code, finding.params, finding.step) == (
        "missing-grad",
        ("aux_head.weight", "aux_head.bias"),
        2,
    )


def test_one_bad_sample_gives_nonfinite_grad_at_its_step() -> None:
    check = GradientSanityCheck(on_finding="log")
    zoo.fit(z4.NaNFeature(), [check], data=z4.data_with_bad_sample(index=9))  # batch 2
    (finding,) = check.findings
    assert finding.code == "nonfinite-grad"
    assert finding.severity == "error"
    assert finding.params == z4.ALL_MLP_PARAMS
    assert finding.step == 2
    assert finding.data == {
        "optimizer": 0,
        "local": False,
        "sampled": False,
        "first_batch_idx": 2,
    }


def test_bf16_has_no_scaler_so_nonfinite_is_reported() -> None:
    check = GradientSanityCheck(on_finding="log")
    zoo.fit(z4.NaNFeature(), [check], data=z4.data_with_bad_sample(index=5), precision="bf16-mixed")
    (finding,) = check.findings
    assert (finding.code, finding.step) == ("nonfinite-grad", 1)


def test_16_mixed_grad_scaler_overflow_steps_are_not_findings() -> None:
    real_steps: list[int] = []

    class _CountRealSteps(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(lambda *a: real_steps.append(1))

    check = GradientSanityCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        trainer = zoo.fit(
            z4.OverflowOnBatch2(),
            [check, _CountRealSteps()],
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        )
    assert 0 < len(real_steps) < trainer.global_step  # the scaler skipped the overflow step
    assert check.steps_checked == trainer.global_step
    assert check.findings == []


def test_overflow_without_scaler_is_reported() -> None:
    # The same model in 32-bit: a 1e30 loss overflows the float32 gradients of the first layer
    class _Overflow(z4.OverflowOnBatch2):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) * (1e10 if batch_idx == 2 else 1.0)

    check = GradientSanityCheck(on_finding="log")
    zoo.fit(_Overflow(), [check], limit_train_batches=3)
    (finding,) = check.findings
    assert (finding.code, finding.step) == ("nonfinite-grad", 2)


def test_raise_policy_stops_training_at_the_bad_step() -> None:
    check = GradientSanityCheck(on_finding="raise")
    module = z4.NaNFeature()
    with pytest.raises(GradientAuditError) as info:
        zoo.fit(module, [check], data=z4.data_with_bad_sample(index=9))
    assert info.value.finding.code == "nonfinite-grad"
    assert info.value.finding.step == 2
    # raised before the optimizer applied the NaN gradient
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_raise_policy_does_not_raise_on_missing_grad_warning() -> None:
    check = GradientSanityCheck(on_finding="raise")
    with pytest.warns(GradientAuditWarning, match="missing-grad") as record:
        zoo.fit(z4.DetachedBranch(), [check])
    assert len([w for w in record if issubclass(w.category, GradientAuditWarning)]) == 1
    assert [f.code for f in check.findings] == ["missing-grad"]


def test_log_policy_records_without_warning() -> None:
    check = GradientSanityCheck(on_finding="log")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(z4.NaNFeature(), [check], data=z4.data_with_bad_sample(index=9))
    assert [f.code for f in check.findings] == ["nonfinite-grad"]


class _CountingHostCopy(sanity.HostCopy):
    made: ClassVar[list[int]] = []

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tensor)
        _CountingHostCopy.made.append(1)


def test_device_is_read_only_on_scheduled_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    _CountingHostCopy.made = []
    monkeypatch.setattr(sanity, "HostCopy", _CountingHostCopy)
    check = GradientSanityCheck(on_finding="log", every_n_steps=4)
    zoo.fit(z4.NaNFeature(), [check], data=z4.data_with_bad_sample(index=9))
    # steps 0 and 4 are scheduled; steps 5-6 are read once at the end of the epoch
    assert len(_CountingHostCopy.made) == 3
    # the step recorded on the device is the first bad one, not the read's
    (finding,) = check.findings
    assert (finding.code, finding.step, finding.count) == ("nonfinite-grad", 2, 2)


def test_every_step_schedule_reads_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    _CountingHostCopy.made = []
    monkeypatch.setattr(sanity, "HostCopy", _CountingHostCopy)
    trainer = zoo.fit(zoo.MLP(), [GradientSanityCheck()])
    assert len(_CountingHostCopy.made) == trainer.global_step == 7


def test_long_schedules_still_read_every_64_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    _CountingHostCopy.made = []
    monkeypatch.setattr(sanity, "HostCopy", _CountingHostCopy)
    check = GradientSanityCheck(on_finding="log", every_n_steps=1000)
    trainer = zoo.fit(z4.DetachedBranch(), [check], data=zoo.regression_data(n=70, batch_size=1))
    assert trainer.global_step == 70
    # step 0 (scheduled), steps 1-64 (64 rows waiting), steps 65-69 at the end of the epoch
    assert len(_CountingHostCopy.made) == 3
    (finding,) = check.findings
    assert (finding.code, finding.step) == ("missing-grad", 2)

def test_scalars_follow_the_log_cadence() -> None:
    logger = zoo.RecordingLogger()
    check = GradientSanityCheck(on_finding="log")
    zoo.fit(z4.DetachedBranch(), [check], logger=logger, log_every_n_steps=2)
    missing = {
        s: m["grad_audit/sanity/missing_params"]
        for s, m in logger.metrics.items()
        if "grad_audit/sanity/missing_params" in m
    }
    assert missing == {0: 2.0, 2: 2.0, 4: 2.0, 6: 2.0}
    assert logger.metrics[0]["grad_audit/sanity/nonfinite_params"] == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: (zoo.MLP("adam"), {"accumulate_grad_batches": 3, "gradient_clip_val": 0.5}, None),
        lambda: (z4.DetachedBranch(), {}, None),
        lambda: (zoo.GAN("toggle"), {}, zoo.gan_data()),
    ],
    ids=["clean-accumulate-clip", "detached", "gan-toggle"],
)
def test_non_invasive_final_parameters_bitwise_equal(make) -> None:  # type: ignore[no-untyped-def]
    results = []
    for with_check in (False, True):
        torch.manual_seed(0)
        module, kwargs, data = make()
        callbacks = [GradientSanityCheck(on_finding="log")] if with_check else []
        zoo.fit(module, callbacks, data=data, **kwargs)
        results.append(zoo.params_of(module))
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="patience"):
        GradientSanityCheck(patience=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientSanityCheck(every_n_steps=0)


def test_patience_is_part_of_the_state_key() -> None:
    assert GradientSanityCheck(patience=2).state_key != GradientSanityCheck().state_key


# ---------------------------------------------------------------------- the core, directly
def _read(monitor: GradSanityMonitor) -> list[GroupSummary]:
    collected = monitor.collect()
    assert collected is not None
    tensor, layout = collected
    return monitor.decode(HostCopy(tensor).result(), layout)


def test_streaks_run_across_reads_and_frozen_parameters_never_miss() -> None:
    used = torch.nn.Parameter(torch.ones(2))
    unused = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    monitor = GradSanityMonitor([[("used", used), ("unused", unused), ("frozen", frozen)]])
    used.grad = torch.ones(2)
    for step in (0, 1):
        monitor.observe(0, step)
    (first,) = _read(monitor)
    assert first.missing == () and first.without_grad == 1
    monitor.observe(0, 2)
    (second,) = _read(monitor)
    assert (second.missing, second.missing_step, second.streak) == (("unused",), 2, 3)


def test_16_bit_gradients_are_summed_in_float32() -> None:
    p = torch.nn.Parameter(torch.ones(100_000, dtype=torch.float16))
    p.grad = torch.ones_like(p)  # a sum of squares of 1e5 overflows float16 (max 65504)
    monitor = GradSanityMonitor([[("p", p)]])
    monitor.observe(0, 0)
    (summary,) = _read(monitor)
    assert summary.nonfinite == () and summary.missing == ()


def test_local_probe_adds_up_backward_passes_and_keeps_nan() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    probe = LocalGradProbe([w])
    (w * 2).sum().backward()
    (w * 3).sum().backward()
    # L2 norms of the two local gradients [2, 2] and [3, 3], added up: 2*sqrt(2) + 3*sqrt(2)
    assert probe.take([w]).tolist() == pytest.approx([5 * 2**0.5])
    assert probe.take([w]) is None
    (w * float("nan")).sum().backward()
    (w * 3).sum().backward()
    assert torch.isnan(probe.take([w])).all()
    probe.remove()


def test_sparse_embedding_gradients_are_checked_not_skipped() -> None:
    from torch import nn as _nn

    class SparseEmbedding(zoo.MLP):
        def __init__(self) -> None:
            super().__init__()
            self.emb = _nn.Embedding(10, 8, sparse=True)
            self.unused = _nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            tokens = (x.abs() * 3).long().clamp(max=9)[:, 0]
            return torch.nn.functional.mse_loss(self.net(x + self.emb(tokens)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    check = GradientSanityCheck(on_finding="log", patience=2)
    zoo.fit(SparseEmbedding(), [check])
    codes = {f.code for f in check.findings}
    assert "check-skipped" not in codes
    (missing,) = [f for f in check.findings if f.code == "missing-grad"]
    assert missing.params == ("unused.weight", "unused.bias")


def test_streaks_survive_a_resume_so_missing_grad_fires_at_the_same_step(tmp_path: Path) -> None:
    import lightning as L

    class SaveAfterBatch(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if args[-1] == 1:  # after steps 0 and 1: the branch's streak is 2
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    uninterrupted = GradientSanityCheck(on_finding="log", every_n_steps=50)
    zoo.fit(z4.DetachedBranch(), [uninterrupted, SaveAfterBatch()])
    (expected,) = uninterrupted.findings
    assert expected.step == 2

    resumed = GradientSanityCheck(on_finding="log", every_n_steps=50)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[resumed],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(z4.DetachedBranch(), zoo.regression_data(), ckpt_path=tmp_path / "mid.ckpt")
    (finding,) = resumed.findings
    assert (finding.code, finding.params, finding.step) == (
        "missing-grad",
        expected.params,
        2,  # the first step after the resume: 2 steps before it, 1 after
    )


def test_the_local_probe_times_its_hooks() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    probe = LocalGradProbe([w])
    assert probe.hook_seconds == 0.0
    (w * 2).sum().backward()
    assert probe.hook_seconds > 0.0
    probe.remove()

"""ZeroGradCheck in real Lightning runs: silent on clean training, the right code on broken."""

from __future__ import annotations

import warnings

import pytest
import torch

from grad_callbacks import (
    Finding,
    GradientAudit,
    GradientAuditError,
    GradientAuditWarning,
    ZeroGradCheck,
)
from tests import zoo

ALARMS = ("warning", "error")


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ALARMS]


def _codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


CLEAN_CASES = {
    "mlp-sgd": lambda: (zoo.MLP("sgd"), {}, None),
    "mlp-adam": lambda: (zoo.MLP("adam"), {}, None),
    "cnn-adam": lambda: (zoo.CNN("adam"), {}, zoo.image_data()),
    "cnn-sgd-clip": lambda: (zoo.CNN("sgd"), {"gradient_clip_val": 0.5}, zoo.image_data()),
    "mlp-clip-norm": lambda: (zoo.MLP(), {"gradient_clip_val": 0.1}, None),
    "mlp-bf16": lambda: (zoo.MLP(), {"precision": "bf16-mixed"}, None),
    "set-to-none-false": lambda: (zoo.SetToNoneFalse(), {"accumulate_grad_batches": 2}, None),
    "frozen-backbone": lambda: (zoo.FrozenBackbone(), {}, None),
    "two-heads": lambda: (zoo.TwoHeads("all"), {}, None),
    "two-heads-zeros": lambda: (zoo.TwoHeads("all", set_to_none=False), {}, None),
    "manual": lambda: (zoo.ManualMLP(), {}, None),
    "manual-raw-backward": lambda: (zoo.ManualMLP(raw_backward=True), {}, None),
    "manual-accumulation": lambda: (zoo.ManualMLP(accumulate=2), {}, None),
    "gan-toggle": lambda: (zoo.GAN("toggle"), {}, zoo.gan_data()),
    "gan-zero-first": lambda: (zoo.GAN("zero_first"), {}, zoo.gan_data()),
}


@pytest.mark.parametrize("case", sorted(CLEAN_CASES))
def test_clean_training_is_silent(case: str) -> None:
    module, kwargs, data = CLEAN_CASES[case]()
    check = ZeroGradCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(module, [check], data=data, **kwargs)
    assert check.steps_checked > 0
    assert _alarms(check.findings) == []


def test_accumulation_3_over_7_batches_reports_the_short_window_as_info() -> None:
    check = ZeroGradCheck()
    trainer = zoo.fit(zoo.MLP(), [check], accumulate_grad_batches=3)  # 28 / 4 = 7 batches
    assert trainer.global_step == 3
    assert check.steps_checked == 3
    (finding,) = check.findings
    assert finding.code == "short-accumulation-window"
    assert finding.severity == "info"
    assert finding.step == 2
    assert finding.data["microbatches"] == 1
    assert finding.data["weight"] == pytest.approx(1 / 3)


def test_full_windows_have_no_short_window_note() -> None:
    check = ZeroGradCheck()
    zoo.fit(zoo.MLP(), [check], accumulate_grad_batches=3, limit_train_batches=6)
    assert check.findings == []


def test_manual_without_zero_grad_fires_missing_zero_grad_at_step_1() -> None:
    check = ZeroGradCheck(on_finding="log")
    zoo.fit(zoo.ManualMLP(zero_grad=False), [check])
    (finding,) = _alarms(check.findings)
    assert finding.code == "missing-zero-grad"
    assert finding.severity == "error"
    assert finding.step == 1  # the first step is fine, the second reuses its gradient
    assert finding.count == 6  # every step after the first of 7
    assert finding.params == ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    assert "zero_grad" in finding.message


def test_automatic_with_noop_optimizer_zero_grad_fires() -> None:
    check = ZeroGradCheck(on_finding="log")
    zoo.fit(zoo.NoZeroGradAutomatic(), [check], accumulate_grad_batches=2)
    assert _codes(_alarms(check.findings)) == {"missing-zero-grad"}
    assert min(f.step for f in check.findings if f.code == "missing-zero-grad") == 1


def test_gan_leak_fires_gradient_leak_on_the_discriminator_step() -> None:
    check = ZeroGradCheck(on_finding="log")
    zoo.fit(zoo.GAN("leak"), [check], data=zoo.gan_data())
    (finding,) = _alarms(check.findings)
    assert finding.code == "gradient-leak"
    assert set(finding.params) == {
        "discriminator.0.weight",
        "discriminator.0.bias",
        "discriminator.2.weight",
        "discriminator.2.bias",
    }
    assert finding.data == {"optimizer": 1, "leaked_from": [0]}
    assert finding.step == 1  # generator step is global step 0, discriminator step is 1
    assert "optimizer 0 (Adam)" in finding.message


def test_old_gradient_reapplied_on_unused_steps_is_stale_grad() -> None:
    check = ZeroGradCheck(on_finding="log")
    zoo.fit(zoo.TwoHeads("backbone"), [check])
    by_code = {f.code: f for f in check.findings}
    assert set(by_code) == {"stale-grad", "missing-zero-grad"}
    assert by_code["stale-grad"].params == ("aux.weight", "aux.bias")
    assert by_code["stale-grad"].step == 1
    assert by_code["missing-zero-grad"].params == ("aux.weight", "aux.bias")


def test_warn_policy_warns_once_per_distinct_finding() -> None:
    with pytest.warns(GradientAuditWarning, match="missing-zero-grad") as record:
        zoo.fit(zoo.ManualMLP(zero_grad=False), [ZeroGradCheck()])
    assert len([w for w in record if issubclass(w.category, GradientAuditWarning)]) == 1


def test_raise_policy_raises_with_the_finding() -> None:
    check = ZeroGradCheck(on_finding="raise")
    with pytest.raises(GradientAuditError) as info:
        zoo.fit(zoo.ManualMLP(zero_grad=False), [check])
    assert info.value.finding.code == "missing-zero-grad"
    assert info.value.finding.step == 1


def test_raise_policy_does_not_raise_on_info() -> None:
    check = ZeroGradCheck(on_finding="raise")
    zoo.fit(zoo.MLP(), [check], accumulate_grad_batches=3)
    assert _codes(check.findings) == {"short-accumulation-window"}


def test_log_policy_records_without_warning() -> None:
    check = ZeroGradCheck(on_finding="log")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(zoo.ManualMLP(zero_grad=False), [check])
    assert _codes(check.findings) == {"missing-zero-grad"}


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="on_finding"):
        ZeroGradCheck(on_finding="shout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps"):
        ZeroGradCheck(every_n_steps=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (zoo.MLP("adam"), {"accumulate_grad_batches": 3, "gradient_clip_val": 0.5}, None),
        lambda: (zoo.ManualMLP(zero_grad=False), {}, None),
        lambda: (zoo.GAN("leak"), {}, zoo.gan_data()),
    ],
    ids=["clean-accumulate-clip", "manual-broken", "gan-leak"],
)
def test_non_invasive_final_parameters_bitwise_equal(make) -> None:  # type: ignore[no-untyped-def]
    results = []
    for with_check in (False, True):
        torch.manual_seed(0)
        module, kwargs, data = make()
        callbacks = [GradientAudit(on_finding="log")] if with_check else []
        zoo.fit(module, callbacks, data=data, **kwargs)
        results.append(zoo.params_of(module))
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_gradient_audit_bundles_zero_grad_check() -> None:
    audit = GradientAudit(on_finding="log")
    zoo.fit(zoo.ManualMLP(zero_grad=False), [audit])
    assert _codes(_alarms(audit.findings)) == {"missing-zero-grad"}
    zero_grad, per_sample = audit.checks[:2]
    assert _alarms(audit.findings) == zero_grad.findings
    # the per-sample check runs on the manual step, and a forgotten zero_grad is not also a
    # grad-mismatch (the replay adds what .grad held when the step began)
    assert per_sample.steps_checked >= 1 and per_sample.findings == []


def test_two_instances_have_distinct_state_keys() -> None:
    assert ZeroGradCheck(every_n_steps=1).state_key != ZeroGradCheck(every_n_steps=5).state_key


def test_gradient_audit_reads_sanity_every_20_steps_unless_told_or_raising() -> None:
    from grad_callbacks import GradientSanityCheck

    def sanity(audit: GradientAudit) -> GradientSanityCheck:
        (check,) = [c for c in audit.checks if isinstance(c, GradientSanityCheck)]
        return check

    assert sanity(GradientAudit()).every_n_steps == 20
    assert sanity(GradientAudit(every_n_steps=3)).every_n_steps == 3
    assert sanity(GradientAudit(on_finding="raise")).every_n_steps == 1


def test_gradient_accumulation_scheduler_short_window_is_read_at_each_step() -> None:
    """accumulate_grad_batches changes from 1 to 3 at epoch 1 (GradientAccumulationScheduler):
    the 7-batch epoch ends with a 1-micro-batch window, reported as such."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    check = ZeroGradCheck(on_finding="log")
    scheduler = GradientAccumulationScheduler(scheduling={1: 3})
    zoo.fit(zoo.MLP(), [scheduler, check], max_epochs=2)
    (finding,) = check.findings
    assert finding.code == "short-accumulation-window"
    assert finding.data == {"microbatches": 1, "accumulate_grad_batches": 3, "weight": 1 / 3}
    assert finding.step == 7 + 2  # epoch 0: 7 steps; epoch 1: steps after batches 2 and 5


class _SGDCallingSuper(torch.optim.SGD):
    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().step(*args, **kwargs)


class _MLPWithSubclassedSGD(zoo.MLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _SGDCallingSuper(self.parameters(), lr=1e-2)


class _ManualWithSubclassedSGD(zoo.ManualMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _SGDCallingSuper(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_optimizer_subclass_calling_super_step_after_a_plain_sgd_run_is_clean(
    manual: bool,
) -> None:
    # Issue 18: a fit with a plain SGD makes torch wrap SGD.step, so the subclass's step fires
    # the step hooks twice per step; the ledger counted two steps, the second one stale.
    zoo.fit(zoo.MLP("sgd"), [])
    model = _ManualWithSubclassedSGD() if manual else _MLPWithSubclassedSGD()
    audit = GradientAudit(on_finding="log", max_overhead=None)
    trainer = zoo.fit(model, [audit])
    assert _alarms(audit.findings) == []
    (check,) = [c for c in audit.checks if isinstance(c, ZeroGradCheck)]
    assert check.extra_state()["steps_taken"] == [trainer.global_step]

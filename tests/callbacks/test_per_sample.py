"""PerSampleGradientCheck in real Lightning runs: silent when clean, the right code when broken."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from grad_callbacks import Finding, GradientAuditWarning
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from tests import zoo
from tests.callbacks.test_recompute import Busy


def _check(**kwargs: Any) -> PerSampleGradientCheck:
    return PerSampleGradientCheck(every_n_steps=1, on_finding="log", **kwargs)


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity != "info"]


def _data8() -> zoo.DataLoader:
    return zoo.regression_data(n=32, batch_size=8)


CLEAN = {
    "mlp": lambda: (zoo.MLP(), {}, _data8()),
    "mlp-dict-output": lambda: (zoo.PerSampleMean(), {}, _data8()),
    "cnn": lambda: (zoo.CNN(), {}, zoo.image_data(n=24, batch_size=8)),
    "transformer-dropout": lambda: (zoo.TinyTransformer(), {}, zoo.token_data()),
    "accumulate-clip": lambda: (
        zoo.MLP("adam"),
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.1},
        zoo.regression_data(n=56, batch_size=8),
    ),
    "bf16": lambda: (zoo.MLP(), {"precision": "bf16-mixed"}, _data8()),
    "16-mixed-scaler": lambda: (
        zoo.MLP(),
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]},
        _data8(),
    ),
    "frozen-backbone": lambda: (zoo.FrozenBackbone(), {}, _data8()),
    "gan-two-optimizers": lambda: (zoo.GAN("toggle"), {}, zoo.gan_data()),
}


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_clean_training_is_silent(case: str) -> None:
    module, kwargs, data = CLEAN[case]()
    check = PerSampleGradientCheck(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(module, [check], data=data, **kwargs)
    assert check.steps_checked > 0
    assert _alarms(check.findings) == []
    if case != "gan-two-optimizers":
        assert check.last_stats is not None and check.last_stats.n == 8


def test_summed_loss_is_reduction_sum() -> None:
    check = _check()
    zoo.fit(zoo.SummedLoss(), [check], data=_data8())
    (finding,) = check.findings
    assert finding.code == "reduction-sum" and finding.severity == "warning"
    assert finding.step == 0 and finding.count == 4
    assert finding.data["scale"] == pytest.approx(8.0, rel=1e-4)


def test_scaled_loss_is_reduction_scale_info() -> None:
    check = _check()
    zoo.fit(zoo.SqrtNormalizedLoss(), [check], data=_data8())
    (finding,) = check.findings
    assert finding.code == "reduction-scale" and finding.severity == "info"
    assert finding.data["scale"] == pytest.approx(8**0.5, rel=1e-4)


@pytest.mark.parametrize(
    "make", [zoo.BatchNormMLP, zoo.BatchNormCNN], ids=["batchnorm1d", "batchnorm2d"]
)
def test_batchnorm_coupling_is_info_and_explained(make: Any) -> None:
    module = make()
    data = zoo.image_data(n=16, batch_size=8) if isinstance(module, zoo.CNN) else _data8()
    check = _check()
    zoo.fit(module, [check], data=data)
    (finding,) = check.findings
    assert finding.code == "batch-coupling" and finding.severity == "info"
    assert finding.data["explained_by"] == "BatchNorm"


def test_reshape_mixing_samples_is_batch_coupling_warning() -> None:
    check = _check()
    zoo.fit(zoo.ReshapeMixesSamples(), [check], data=_data8())
    (finding,) = _alarms(check.findings)
    assert finding.code == "batch-coupling" and finding.severity == "warning"
    assert finding.count == 4  # one finding, seen at every step
    assert finding.data["residual"] > 0.5
    assert finding.data["modules"] == ["net.0", "net.2"]


def test_nan_sample_is_named_by_index() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 8, generator=g) + 0.5
    x[5, 0] = -1.0  # log of a negative number
    data = zoo.DataLoader(zoo.TensorDataset(x, torch.randn(8, 1, generator=g)), batch_size=8)
    check = _check(check_optimizer_grad=False)
    zoo.fit(zoo.LogOfInput(), [check], data=data)
    (finding,) = check.findings
    assert finding.code == "per-sample-nonfinite" and finding.severity == "error"
    assert finding.data["indices"] == [5]


def test_dominating_sample_is_an_outlier() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    y[3] = 1000.0  # a mislabelled target
    data = zoo.DataLoader(zoo.TensorDataset(x, y), batch_size=16)
    check = _check()
    zoo.fit(zoo.MLP(), [check], data=data)
    (finding,) = _alarms(check.findings)
    assert finding.code == "per-sample-outlier"
    assert finding.data["indices"] == [3]


def test_gradient_hook_that_doubles_is_grad_mismatch() -> None:
    check = _check()
    zoo.fit(zoo.DoublingHook(), [check], data=_data8())
    (finding,) = _alarms(check.findings)
    assert finding.code == "grad-mismatch" and finding.step == 0
    assert finding.data["relative_error"] == pytest.approx(1.0, rel=1e-3)


def test_stale_accumulation_is_grad_mismatch() -> None:
    check = _check()
    zoo.fit(zoo.NoZeroGradAutomatic(), [check], data=_data8())
    (finding,) = _alarms(check.findings)
    assert finding.code == "grad-mismatch"
    assert finding.step == 1  # step 0's gradient was fresh
    assert finding.count == 3
    assert finding.params == ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")


def test_every_n_steps_schedules_the_check() -> None:
    check = PerSampleGradientCheck(every_n_steps=3, on_finding="log")
    zoo.fit(zoo.SummedLoss(), [check], data=zoo.regression_data(n=56, batch_size=8))
    assert check.steps_checked == 3  # steps 0, 3, 6 of 7
    assert check.findings[0].count == 3


def test_per_sample_loss_method_is_used_when_defined() -> None:
    class WithPerSampleLoss(zoo.ManualMLP):
        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y, reduction="none").mean(dim=1)

    check = _check()
    zoo.fit(WithPerSampleLoss(), [check], data=_data8())
    assert check.steps_checked == 4 and check.findings == []
    assert check.last_stats is not None and check.last_stats.n == 8


def test_batch_of_one_is_skipped_with_a_reason() -> None:
    check = _check()
    zoo.fit(zoo.MLP(), [check], data=zoo.regression_data(n=3, batch_size=1))
    (finding,) = check.findings
    assert finding.code == "check-skipped" and "1 sample" in finding.message
    # the grad-mismatch comparison still ran on each of the 3 steps
    assert check.steps_checked == 3


def test_a_skipped_run_is_not_counted_as_a_checked_step() -> None:
    """Before: every scheduled run counted, so the report said 3 steps checked of a run that
    compared nothing."""
    check = _check(check_optimizer_grad=False)
    zoo.fit(zoo.MLP(), [check], data=zoo.regression_data(n=3, batch_size=1))
    assert [f.code for f in check.findings] == ["check-skipped"]
    assert check.steps_checked == 0
    entry = check.report_entry()
    assert entry["steps_checked"] == 0 and "1 sample" in entry["idle_reason"]


def test_non_invasive_bitwise() -> None:
    """Parameters, BatchNorm buffers, metric states, logged metrics, RNG: all bitwise equal."""
    results = []
    for callbacks in ([], [PerSampleGradientCheck(every_n_steps=1, on_finding="log")]):
        torch.manual_seed(0)
        module = Busy()
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        data = zoo.DataLoader(zoo.TensorDataset(x, y), batch_size=8)
        trainer = zoo.fit(module, callbacks, data=data, accumulate_grad_batches=2)
        results.append(
            (
                module.state_dict(),
                {k: v.clone() for k, v in trainer.callback_metrics.items()},
                torch.get_rng_state(),
                module.acc.compute(),
            )
        )
    (s0, m0, r0, a0), (s1, m1, r1, a1) = results
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert torch.equal(r0, r1)
    assert torch.equal(a0, a1)


def test_noise_augmentation_in_training_step_is_no_false_alarm() -> None:
    check = _check()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(zoo.NoisyInputs(), [check], data=_data8())
    # randn_like(x) has the batch as first dimension: cut sample by sample, so compared
    assert check.findings == []
    assert check.steps_checked >= 1


def test_loop_fallback_is_silent_on_a_clean_model_and_reported() -> None:
    check = _check()
    zoo.fit(zoo.ItemControlFlow(), [check], data=_data8())
    assert check.findings == []
    assert check.last_stats is not None and check.last_stats.method == "loop"
    entry = check.report_entry()
    assert entry["per_sample_method"] == "loop" and entry["vmap_fallback_reason"]


def test_loop_fallback_sees_no_hooks_so_only_grad_mismatch_fires() -> None:
    check = _check()
    zoo.fit(zoo.ItemControlFlowDoublingHook(), [check], data=_data8())
    assert {f.code for f in check.findings} == {"grad-mismatch"}


def test_per_sample_loss_tells_the_batch_size_of_an_odd_batch() -> None:
    class DictBatch(zoo.MLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch["x"], batch["y"]
            return torch.nn.functional.mse_loss(self.net(x), y, reduction="none").mean(dim=1)

    g = torch.Generator().manual_seed(0)
    # "x" and "y" have 8 rows; "w" has 3: leading dimensions disagree
    batch = {"x": torch.randn(8, 8, generator=g), "y": torch.randn(8, 1, generator=g),
             "w": torch.ones(3), "name": "run"}
    check = _check()
    zoo.fit(DictBatch(), [check], data=zoo.DataLoader([batch, batch], batch_size=None))
    assert check.findings == []
    assert check.last_stats is not None and check.last_stats.n == 8


def test_budget_spaces_the_check_by_its_measured_cost() -> None:
    from grad_callbacks import GradientAudit

    audit = GradientAudit(checks=[PerSampleGradientCheck(every_n_steps=1, on_finding="log")],
                          max_overhead=0.03)
    (check,) = audit.checks
    assert check.budget is audit.budget and check.budget_share > 0
    zoo.fit(zoo.SummedLoss(), [audit], data=zoo.regression_data(n=400, batch_size=8))
    # Step 0 always; the next run is planned once a training step has been timed (not at
    # every_n_steps=1): a run costs more than a step, so at 60% of 3% it is far beyond 50 steps.
    assert check.steps_checked == 1
    assert check._next_due > 50
    assert audit.budget is not None and audit.budget.steps == 50
    assert {f.code for f in check.findings} == {"reduction-sum"}


def test_without_budget_every_n_steps_rules() -> None:
    from grad_callbacks import GradientAudit

    audit = GradientAudit(checks=[PerSampleGradientCheck(every_n_steps=5, on_finding="log")],
                          max_overhead=None)
    zoo.fit(zoo.MLP(), [audit], data=zoo.regression_data(n=160, batch_size=8))
    assert audit.checks[0].steps_checked == 4  # steps 0, 5, 10, 15 of 20

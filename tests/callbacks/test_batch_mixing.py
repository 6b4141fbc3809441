"""BatchMixingCheck in real Lightning runs: the exact pairs and module on models that mix
samples, silence on clean ones, check-skipped where it cannot run, and no trace on training."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.findings import Finding, GradientAuditError
from grad_callbacks.sinks.warnings import GradientAuditWarning
from tests import zoo, zoo_mixing

ALL_BUT_0 = [[i, j] for i in (0, 2, 3) for j in range(4) if j != i]


def _fit(
    module: Any, check: BatchMixingCheck, data: DataLoader | None = None, **kwargs: Any
) -> Any:
    kwargs.setdefault("limit_train_batches", 2)
    return zoo.fit(module, [check], data=data, **kwargs)


def _only(findings: list[Finding], code: str) -> Finding:
    (finding,) = findings
    assert finding.code == code, finding
    return finding


# ---------------------------------------------------------------------------------- broken
BROKEN: dict[str, Callable[[], tuple[Any, DataLoader | None, dict[str, Any]]]] = {
    "fold": lambda: (zoo_mixing.FoldsBatch(), None, {}),
    "transpose": lambda: (zoo_mixing.TransposeMixer(), None, {}),
    "mean-dim0": lambda: (zoo_mixing.MeanOverDim0(), None, {}),
    "two-in-two-out": lambda: (
        zoo_mixing.TwoInTwoOut(),
        zoo_mixing.two_input_data(),
        {"input_mapping": lambda batch: (batch[0], batch[1])},
    ),
    "dict-out": lambda: (zoo_mixing.DictOut(), None, {}),
    "transformer": lambda: (zoo_mixing.TinyTransformer(bug=True), zoo_mixing.token_data(), {}),
    "token-mean": lambda: (zoo_mixing.TokenMeanOverBatch(mix=True), zoo_mixing.token_data(), {}),
}
EXPECTED = {  # params, pairs, outputs, inputs
    "fold": (("model.mixer",), [[0, 1], [2, 3], [3, 2]], ["output"], ["x"]),
    "transpose": (("model.mixer",), ALL_BUT_0, ["output"], ["x"]),
    "mean-dim0": (("MeanOverDim0",), ALL_BUT_0, ["output"], ["x"]),
    "two-in-two-out": (("TwoInTwoOut",), [[0, 3], [2, 1], [3, 2]], ["output[1]"], ["input[0]"]),
    "dict-out": (("pool",), ALL_BUT_0, ["output['score']"], ["x"]),
    "transformer": (("attn",), ALL_BUT_0, ["output"], ["tok output for ids"]),
    "token-mean": (("TokenMeanOverBatch",), ALL_BUT_0, ["output"], ["emb output for ids"]),
}


# Mixing in a module's own code, before its call of this submodule.
CODE_LEVEL = {"mean-dim0": "head", "token-mean": "head", "two-in-two-out": "head_b"}
TESTED = {
    "transformer": "pl_module(ids)",
    "token-mean": "pl_module(ids)",
    "two-in-two-out": "pl_module(input_mapping(batch))",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_mixing_models_fire_with_the_pairs_and_the_first_mixing_module(case: str) -> None:
    module, data, kwargs = BROKEN[case]()
    check = BatchMixingCheck(on_finding="log", **kwargs)
    _fit(module, check, data=data)
    finding = _only(check.findings, "batch-mixing")
    params, pairs, outputs, inputs = EXPECTED[case]
    assert finding.severity == "error"
    assert finding.step == 0
    assert finding.params == params
    assert finding.data["pairs"] == pairs
    assert finding.data["outputs"] == outputs
    assert finding.data["inputs"] == inputs
    assert finding.data["max_grad"] > 0
    if case in CODE_LEVEL:
        assert f"Samples mix in the code of `{params[0]}` ({params[0]}).forward" in (
            finding.message
        )
        assert f"before its call of `{CODE_LEVEL[case]}`, whose inputs" in finding.message
    else:
        assert f"The first module whose output mixes samples is `{params[0]}`" in finding.message
    assert check.steps_checked == 1
    assert check.tested_calls == [TESTED.get(case, "pl_module(x)")]


def test_message_names_samples_output_module_and_fix() -> None:
    check = BatchMixingCheck(on_finding="log")
    _fit(zoo_mixing.TransposeMixer(), check)
    message = check.findings[0].message
    assert "the output of sample 0 depends on the inputs of samples 1, 2, 3" in message
    assert "the output of sample 3 depends on the inputs of samples 0, 1, 2" in message
    assert "`model.mixer` (Linear), after `model.enc` whose output does not" in message
    assert "Fix: look for view/reshape/permute across the batch dimension" in message


def test_dict_output_message_names_the_call_and_the_output_key() -> None:
    check = BatchMixingCheck(on_finding="log")
    _fit(zoo_mixing.DictOut(), check)
    assert check.findings[0].message.startswith(
        "In the call `pl_module(x)` that training_step made: Samples of a batch of 4 mix: "
        "output['score']: the output of sample 0 depends"
    )
    assert check.findings[0].data["call"] == "pl_module(x)"


def test_mixing_in_the_top_level_forward_is_attributed_to_it() -> None:
    check = BatchMixingCheck(on_finding="log")
    _fit(zoo_mixing.MeanOverDim0(at_end=True), check)
    finding = _only(check.findings, "batch-mixing")
    assert finding.params == ("MeanOverDim0",)
    assert "the mixing is in the code of MeanOverDim0.forward, after `head`" in finding.message


def test_raise_policy_stops_training() -> None:
    with pytest.raises(GradientAuditError, match="batch-mixing"):
        _fit(zoo_mixing.FoldsBatch(), BatchMixingCheck(on_finding="raise"))


def test_warn_policy_warns_once() -> None:
    check = BatchMixingCheck(every_n_steps=1)
    with pytest.warns(GradientAuditWarning) as record:
        _fit(zoo_mixing.FoldsBatch(), check, limit_train_batches=3)
    mixing = [w for w in record if "batch-mixing" in str(w.message)]
    assert len(mixing) == 1
    assert check.steps_checked == 3
    assert check.findings[0].count == 3


@pytest.mark.parametrize("bug", [True, False])
def test_bf16_mixed_precision(bug: bool) -> None:
    check = BatchMixingCheck(on_finding="log")
    module = zoo_mixing.TinyTransformer(bug=bug)
    _fit(module, check, data=zoo_mixing.token_data(), precision="bf16-mixed")
    if bug:
        assert _only(check.findings, "batch-mixing").data["pairs"] == ALL_BUT_0
    else:
        assert check.findings == []


# ---------------------------------------------------------------------------------- clean
CLEAN: dict[str, Callable[[], tuple[Any, DataLoader | None]]] = {
    "mlp": lambda: (zoo.MLP(), None),
    "cnn": lambda: (zoo.CNN(), zoo.image_data()),
    "batchnorm": lambda: (zoo_mixing.BatchNormNet(), None),
    "transformer": lambda: (zoo_mixing.TinyTransformer(bug=False), zoo_mixing.token_data()),
    "token-mean": lambda: (zoo_mixing.TokenMeanOverBatch(mix=False), zoo_mixing.token_data()),
    "two-in-two-out-head-a": lambda: (zoo_mixing.TwoInTwoOut(), zoo_mixing.two_input_data()),
}


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_clean_models_are_silent(case: str) -> None:
    module, data = CLEAN[case]()
    kwargs: dict[str, Any] = {}
    if case == "two-in-two-out-head-a":  # only the clean output is tested
        kwargs = {
            "input_mapping": lambda batch: (batch[0], batch[1]),
            "output_mapping": lambda out: out[0],
        }
    check = BatchMixingCheck(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        _fit(module, check, data=data)
    assert check.findings == []  # not even check-skipped: the check ran
    assert check.steps_checked == 1


def test_batchnorm_running_stats_untouched_by_the_check() -> None:
    seen: dict[str, Any] = {}

    class Spy(BatchMixingCheck):  # the test of the recorded calls runs at the end of the batch
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            bn = pl_module.net[1]
            before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
            grads = [p.grad.clone() for p in pl_module.parameters()]
            super().on_train_batch_end(trainer, pl_module, *args)
            after = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))
            seen["same"] = torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
            seen["tracked"] = (before[2], after[2])
            seen["training"] = bn.training
            seen["grads"] = all(
                torch.equal(g, p.grad) for g, p in zip(grads, pl_module.parameters(), strict=True)
            )

    check = Spy()
    _fit(zoo_mixing.BatchNormNet(), check, limit_train_batches=1)
    assert check.steps_checked == 1 and check.findings == []
    assert check.tested_calls == ["pl_module(x)"]
    assert seen["same"] and seen["tracked"] == (1, 1) and seen["training"]
    assert seen["grads"]  # nothing written to .grad


# ---------------------------------------------------------------------------------- skipped
def test_batch_size_1_is_skipped_and_training_goes_on() -> None:
    check = BatchMixingCheck(on_finding="raise")
    trainer = _fit(zoo.MLP(), check, data=zoo.regression_data(n=4, batch_size=1))
    finding = _only(check.findings, "check-skipped")
    assert finding.severity == "info"
    assert "pl_module.net(input): batch size 1: mixing needs at least two samples" in (
        finding.message
    )
    assert trainer.global_step == 2


def test_string_batch_is_skipped_with_how_to_configure() -> None:
    check = BatchMixingCheck()
    trainer = _fit(zoo_mixing.Strings(), check, data=DataLoader(zoo_mixing.StringBatches(), 4))
    finding = _only(check.findings, "check-skipped")
    assert "no call training_step made into Strings or its child modules could be tested" in (
        finding.message
    )
    assert "pl_module(texts): its inputs hold no tensor with a batch dimension" in finding.message
    assert "input_mapping=lambda batch: ..." in finding.message
    assert trainer.global_step == 2


def test_a_step_that_calls_no_module_falls_back_to_example_input_array() -> None:
    module = zoo_mixing.MeanOverDim0()
    module.example_input_array = torch.randn(4, 8)
    # calls neither forward nor a child module: nothing to record
    module.training_step = lambda batch, batch_idx: module.head.weight.pow(2).sum()  # type: ignore
    check = BatchMixingCheck(on_finding="log")
    _fit(module, check, data=DataLoader(zoo_mixing.StringBatches(), 4))
    assert _only(check.findings, "batch-mixing").params == ("MeanOverDim0",)
    assert check.tested_calls == ["pl_module(example_input_array)"]


def test_a_forward_of_two_inputs_is_tested_as_the_step_calls_it() -> None:
    """Before, the check called forward(batch[0]) and skipped: forward takes x1 and x2."""
    check = BatchMixingCheck(on_finding="log")
    _fit(zoo_mixing.TwoInTwoOut(), check, data=zoo_mixing.two_input_data())
    finding = _only(check.findings, "batch-mixing")
    assert check.tested_calls == ["pl_module(x1, x2)"]
    assert finding.data["call"] == "pl_module(x1, x2)"
    assert finding.data["outputs"] == ["output[1]"] and finding.data["inputs"] == ["x1"]
    assert finding.data["pairs"] == [[0, 3], [2, 1], [3, 2]]


def test_a_step_calling_self_forward_directly_is_recorded() -> None:
    module = zoo_mixing.MeanOverDim0()

    def training_step(batch: Any, batch_idx: int) -> torch.Tensor:
        return module.forward(batch[0]).pow(2).mean()

    module.training_step = training_step  # type: ignore[method-assign]
    check = BatchMixingCheck(on_finding="log")
    _fit(module, check)
    assert check.tested_calls == ["pl_module(x)"]
    assert _only(check.findings, "batch-mixing").params == ("MeanOverDim0",)
    assert "forward" not in module.__dict__  # the recording wrapper is gone


def test_forward_failing_on_the_configured_input_is_skipped_with_how_to_configure() -> None:
    check = BatchMixingCheck(on_finding="raise", input_mapping=lambda batch: batch[0])
    _fit(zoo_mixing.TwoInTwoOut(), check, data=zoo_mixing.two_input_data())
    finding = _only(check.findings, "check-skipped")
    assert "pl_module(inputs) with inputs from input_mapping(batch) failed: TypeError" in (
        finding.message
    )
    assert "input_mapping=lambda batch" in finding.message


def test_child_modules_called_by_the_step_are_tested_each() -> None:
    check = BatchMixingCheck()
    _fit(zoo.TwoHeads(), check)
    assert check.findings == []
    assert check.tested_calls == [
        "pl_module.backbone(input)",
        "pl_module.head(input)",
        "pl_module.aux(input)",
    ]


def test_module_without_forward_and_several_children_needs_forward_fn() -> None:
    check = BatchMixingCheck(input_mapping=lambda batch: batch[0])
    _fit(zoo.TwoHeads(), check)
    finding = _only(check.findings, "check-skipped")
    assert "TwoHeads does not implement forward and has several submodules" in finding.message
    assert "forward_fn=lambda pl_module, inputs: ..." in finding.message

    check = BatchMixingCheck(forward_fn=lambda m, x: m.head(torch.tanh(m.backbone(x))))
    _fit(zoo.TwoHeads(), check)
    assert check.findings == [] and check.steps_checked == 1


def test_forward_fn_replaces_the_forward_pass() -> None:
    check = BatchMixingCheck(on_finding="log", forward_fn=lambda m, x: m.enc(x))
    _fit(zoo_mixing.MeanOverDim0(), check)  # its forward mixes; enc alone does not
    assert check.findings == [] and check.steps_checked == 1


# ---------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("every_n_steps", "accumulate", "runs"), [(None, 1, 1), (0, 1, 1), (2, 1, 4), (1, 2, 4)]
)
def test_schedule(every_n_steps: int | None, accumulate: int, runs: int) -> None:
    check = BatchMixingCheck(every_n_steps=every_n_steps)
    _fit(zoo.MLP(), check, limit_train_batches=7, accumulate_grad_batches=accumulate)
    assert check.steps_checked == runs
    assert check.findings == []


def test_settings_are_reported() -> None:
    check = BatchMixingCheck(sample_count=2, input_mapping=lambda batch: batch[0])
    entry = check.report_entry()
    assert entry["settings"] == {
        "every_n_steps": 0,
        "on_finding": "warn",
        "sample_count": 2,
        "input_mapping": "test_settings_are_reported.<locals>.<lambda>",
        "output_mapping": None,
        "forward_fn": None,
        "atol": 0.0,
    }
    json.dumps(entry)
    with pytest.raises(ValueError, match="every_n_steps"):
        BatchMixingCheck(every_n_steps=-1)
    with pytest.raises(ValueError, match="sample_count"):
        BatchMixingCheck(sample_count=0)


# ---------------------------------------------------------------------------------- no trace
class MetricsRecorder(L.Callback):
    """Snapshots ``callback_metrics`` around every training batch (placed after the check, so
    anything the check logged before the training step would show)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append({k: v.clone() for k, v in trainer.callback_metrics.items()})

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append({k: v.clone() for k, v in trainer.callback_metrics.items()})


def _train(make: Callable[[], Any], data: Callable[[], DataLoader], check: bool) -> dict:
    torch.manual_seed(0)
    module = make()
    recorder = MetricsRecorder()
    checks = [BatchMixingCheck(every_n_steps=1)] if check else []
    trainer = zoo.fit(module, [*checks, recorder], data=data(), limit_train_batches=5)
    if check:
        assert checks[0].steps_checked == 5 and checks[0].findings == []
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "metrics": [*recorder.seen, dict(trainer.callback_metrics)],
        "rng": torch.get_rng_state(),
        "opt": trainer.optimizers[0].state_dict(),
    }


@pytest.mark.parametrize("case", ["batchnorm-dropout-logging", "transformer"])
def test_training_is_bitwise_identical_with_and_without_the_check(case: str) -> None:
    if case == "transformer":
        make: Callable[[], Any] = lambda: zoo_mixing.TinyTransformer(bug=False)  # noqa: E731
        data = zoo_mixing.token_data
    else:
        make = lambda: zoo_mixing.BatchNormNet(log_in_forward=True)  # noqa: E731
        data = zoo.regression_data
    without, with_check = _train(make, data, False), _train(make, data, True)
    assert without["state"].keys() == with_check["state"].keys()
    for k, v in without["state"].items():
        assert torch.equal(v, with_check["state"][k]), k
    assert len(without["metrics"]) == len(with_check["metrics"]) == 11
    for seen, seen_with_check in zip(without["metrics"], with_check["metrics"], strict=True):
        assert seen.keys() == seen_with_check.keys()
        assert all(torch.equal(v, seen_with_check[k]) for k, v in seen.items())
    assert torch.equal(without["rng"], with_check["rng"])
    momentum = [s.get("momentum_buffer") for s in without["opt"]["state"].values()]
    momentum2 = [s.get("momentum_buffer") for s in with_check["opt"]["state"].values()]
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(momentum, momentum2, strict=True)
    )
    if case != "transformer":
        assert "forward_mean" in without["metrics"][-1]  # logged by forward in training_step


def test_inside_gradient_audit_next_to_zero_grad_check() -> None:
    from grad_callbacks import GradientAudit, ZeroGradCheck

    zero_grad, mixing = ZeroGradCheck(), BatchMixingCheck(every_n_steps=1, on_finding="log")
    audit = GradientAudit(checks=[zero_grad, mixing])
    zoo.fit(zoo_mixing.FoldsBatch(), [audit], limit_train_batches=3)
    assert [f.code for f in audit.findings] == ["batch-mixing"]
    assert zero_grad.steps_checked == 3 and mixing.steps_checked == 3


class _RollNet(torch.nn.Module):
    """Each sample's output is the next sample's: nothing of its own input reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).roll(1, dims=0)


class _RollsBatch(zoo_mixing.Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = _RollNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model", ["fold", "roll"])
def test_the_message_is_true_of_the_sample_it_names(model: str) -> None:
    """The magnitudes in the message belong to one named sample: its own-input gradient is
    stated when there is one, and a sample whose output comes only from other samples is said
    to be so (not '0 on the sample's own input' beside samples whose own input does reach)."""
    module = zoo_mixing.FoldsBatch() if model == "fold" else _RollsBatch()
    check = BatchMixingCheck(on_finding="log")
    _fit(module, check)
    finding = _only(check.findings, "batch-mixing")
    own = finding.data["own_grad"]
    assert re.search(r"gradient of sample \d+'s output on another sample's input", finding.message)
    if model == "roll":
        assert own == 0.0
        assert "none on its own input" in finding.message
    else:
        assert own > 0.0
        assert f"against {own:.3g} on its own input" in finding.message


class _MemoryBank(zoo_mixing.Regressor):
    """Its forward appends each sample's output to a memory bank (a plain list attribute) too
    large for the check to copy (over 10,000 items): calling forward again grows it for good."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.bank: list[float] = [0.0] * 20_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.bank.extend(out.detach().flatten().tolist())
        return out


def test_state_the_check_cannot_put_back_is_named_and_the_test_stops() -> None:
    """Before: kept_python_state dropped what PythonState.restore() could not put back; the
    bank grew silently at every run of the test."""
    module = _MemoryBank()
    check = BatchMixingCheck(every_n_steps=1, on_finding="log")
    _fit(module, check, limit_train_batches=3)
    finding = _only(check.findings, "check-skipped")
    assert "self.bank (resized, too large to copy)" in finding.message
    assert "the test stops" in finding.message and finding.step == 0
    assert check.steps_checked == 1  # not run again on steps 1 and 2

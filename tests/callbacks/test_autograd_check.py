"""AutogradCheck in real Lightning runs: custom Functions and named modules."""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from grad_callbacks import Finding, GradientAuditError, GradientAuditWarning
from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.core.gradcheck import CallRecorder, check_function, find_custom_functions
from tests import zoo

# ---------------------------------------------------------------------- custom Functions
Square = zoo.Square


class BadSquare(Square):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x  # the factor 2 is missing


class ScaleRows(torch.autograd.Function):
    """``x * k[:, None]`` for an integer tensor ``k`` (setup_context style)."""

    @staticmethod
    def forward(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return x * k.unsqueeze(1).to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k.unsqueeze(1).to(grad.dtype), None


class Float32Only(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.float() * 2  # float32 whatever the input: too coarse for finite differences

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


square = Square.apply  # an alias made at import time, as libraries often do


# ---------------------------------------------------------------------- models
class FunctionNet(zoo.MLP):
    """Linear -> a custom Function -> Linear."""

    def __init__(self, function: type[torch.autograd.Function] = Square) -> None:
        super().__init__()
        self.function = function

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.function.apply(self.net[0](x))
        loss = nn.functional.mse_loss(self.net[2](torch.tanh(h)), y)
        self.log("train_loss", loss)
        return loss


class AliasNet(FunctionNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net[2](torch.tanh(square(self.net[0](x)))), y)


class IntegerInputNet(zoo.MLP):
    """Scales each sample's hidden features by its integer class (an integer Function input)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        k = (x[:, 0] > 0).long() + 1
        h = ScaleRows.apply(torch.tanh(self.net[0](x)), k)
        return nn.functional.mse_loss(self.net[2](h), y)


class HalvedGrad(nn.Module):
    """A module whose gradient is wrong without any custom Function: a tensor hook halves it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * 0.5)
        return torch.tanh(h)


class Block(nn.Module):
    def __init__(self, function: type[torch.autograd.Function] = Square) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.function = function

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.function.apply(self.drop(self.norm(self.lin(x)))) * scale)


class Encoder(nn.Module):
    def __init__(self, block1: nn.Module) -> None:
        super().__init__()
        self.block0 = Block(Square)
        self.block1 = block1


class EncoderNet(L.LightningModule):
    """Linear -> encoder.block0 (BatchNorm, dropout, Square) -> encoder.block1 -> head, with
    torch.rand noise and a logged metric: every kind of state the check must leave alone."""

    def __init__(self, block1: nn.Module | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.encoder = Encoder(block1 if block1 is not None else Block(Square))
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x + 0.01 * torch.rand_like(x)
        h = self.encoder.block1(self.encoder.block0(self.inp(x), scale=0.5))
        loss = nn.functional.mse_loss(self.head(h), y)
        self.log("train_loss", loss)
        self.log("noise", random.random())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ManualFunctionNet(FunctionNet):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__(function)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


# ---------------------------------------------------------------------- tests
def test_wrong_backward_fires_with_the_class_name_and_worst_entry() -> None:
    check = AutogradCheck(on_finding="log")
    zoo.fit(FunctionNet(BadSquare), [check])
    (finding,) = check.findings
    assert finding.code == "autograd-mismatch"
    assert finding.severity == "error"
    assert finding.params == ("BadSquare",)
    assert finding.step == 0
    data = finding.data
    assert data["kind"] == "function"
    assert data["input"] == "input 0" and data["output"] == "output 0"
    assert data["input_index"] == data["output_index"]  # element-wise: only the diagonal
    assert data["numerical"] == pytest.approx(2 * data["analytic"], rel=1e-6)
    assert data["atol"] == 1e-5 and data["rtol"] == 1e-3
    # 2 samples x 16 features: a 32 x 32 Jacobian, wrong on its 32 diagonal entries
    assert (data["mismatched"], data["checked"]) == (32, 32 * 32)
    assert "BadSquare" in finding.message and "backward" in finding.message


@pytest.mark.parametrize("model", [FunctionNet, AliasNet, IntegerInputNet])
def test_correct_functions_are_checked_and_silent(model: type[L.LightningModule]) -> None:
    check = AutogradCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(model(), [check])
    assert check.findings == []
    assert (check.graph_walks, check.recomputations, check.checks_run) == (1, 1, 1)


def test_integer_input_function_with_wrong_backward_fires() -> None:
    class BadScaleRows(ScaleRows):
        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad, None

    class Net(IntegerInputNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            k = torch.full((x.shape[0],), 3, dtype=torch.long)
            return nn.functional.mse_loss(self.net[2](BadScaleRows.apply(self.net[0](x), k)), y)

    check = AutogradCheck(on_finding="log")
    zoo.fit(Net(), [check])
    (finding,) = check.findings
    assert finding.params == ("test_integer_input_function_with_wrong_backward_fires.BadScaleRows",)
    assert finding.data["analytic"] == 1.0
    assert finding.data["numerical"] == pytest.approx(3.0)


def test_function_that_is_not_float64_compatible_is_skipped_with_reason() -> None:
    check = AutogradCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(FunctionNet(Float32Only), [check])
    (finding,) = check.findings
    assert (finding.code, finding.severity, finding.params) == (
        "check-skipped",
        "info",
        ("Float32Only",),
    )
    assert "float64" in finding.message


def test_model_without_custom_functions_is_silent_and_does_no_work_after_batch_0() -> None:
    calls: list[int] = []

    class Counted(zoo.MLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            calls.append(batch_idx)
            return super().training_step(batch, batch_idx)

    check = AutogradCheck()
    trainer = zoo.fit(Counted(), [check])
    assert check.findings == []
    assert check.graph_walks == 1  # batch 0 only
    assert (check.recomputations, check.checks_run, check.steps_checked) == (0, 0, 0)
    assert calls == list(range(trainer.global_step))  # training_step never run again


def test_named_modules_correct_block_is_silent() -> None:
    check = AutogradCheck(modules=["encoder.block0", "encoder.block1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(EncoderNet(), [check])
    assert check.findings == []
    assert check.checks_run == 3  # Square, and the two modules


def test_named_module_with_broken_custom_backward_inside_fires() -> None:
    check = AutogradCheck(modules=["encoder.block1"], on_finding="log")
    zoo.fit(EncoderNet(Block(BadSquare)), [check])
    by_params = {f.params: f for f in check.findings}
    assert set(by_params) == {("BadSquare",), ("encoder.block1",)}
    module_finding = by_params[("encoder.block1",)]
    assert module_finding.code == "autograd-mismatch"
    assert module_finding.data["kind"] == "module"
    assert "module Block" in module_finding.message


def test_named_module_with_a_gradient_hook_fires_without_any_custom_function() -> None:
    check = AutogradCheck(modules=["encoder.block1"], on_finding="log")
    zoo.fit(EncoderNet(HalvedGrad()), [check])
    (finding,) = check.findings
    assert (finding.code, finding.params) == ("autograd-mismatch", ("encoder.block1",))
    assert finding.data["analytic"] == pytest.approx(finding.data["numerical"] / 2, rel=1e-4)


def test_unknown_module_name_is_skipped() -> None:
    check = AutogradCheck(modules=["encoder.block7"])
    zoo.fit(EncoderNet(), [check])
    (finding,) = check.findings
    assert (finding.code, finding.params) == ("check-skipped", ("encoder.block7",))


def test_manual_optimization_is_checked_without_extra_steps() -> None:
    grads_after_check: list[bool] = []

    class _GradsStillThere(L.Callback):  # runs after the check at the end of each batch
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            grads_after_check.append(all(p.grad is not None for p in pl_module.parameters()))

    results = []
    checks = []
    for with_check in (False, True):
        torch.manual_seed(0)
        module = ManualFunctionNet(BadSquare)
        check = AutogradCheck(on_finding="log")
        checks.append(check)
        callbacks = [check, _GradsStillThere()] if with_check else []
        trainer = zoo.fit(module, callbacks)
        results.append((zoo.params_of(module), trainer.global_step))
    assert results[0][1] == results[1][1] == 7
    for name, value in results[0][0].items():
        assert torch.equal(value, results[1][0][name]), name
    assert [f.params for f in checks[1].findings] == [("BadSquare",)]
    # the recomputation's opt.zero_grad() was a stand-in: the live gradients were not cleared
    assert grads_after_check == [True] * 7


def test_run_now_checks_again_at_the_next_batch() -> None:
    check = AutogradCheck(on_finding="log")

    class _RequestAt3(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if args[-1] == 3:
                check.run_now()

    zoo.fit(FunctionNet(BadSquare), [check, _RequestAt3()])
    assert (check.graph_walks, check.recomputations) == (2, 2)
    (finding,) = check.findings
    assert (finding.step, finding.count) == (0, 2)


def test_raise_policy_raises_on_mismatch() -> None:
    with pytest.raises(GradientAuditError) as info:
        zoo.fit(FunctionNet(BadSquare), [AutogradCheck(on_finding="raise")])
    assert info.value.finding.code == "autograd-mismatch"


def test_warn_policy_warns_once() -> None:
    with pytest.warns(GradientAuditWarning, match="autograd-mismatch") as record:
        zoo.fit(FunctionNet(BadSquare), [AutogradCheck()])
    assert len([w for w in record if issubclass(w.category, GradientAuditWarning)]) == 1


@pytest.mark.parametrize("block1", ["square", "bad"])
def test_non_invasive_params_buffers_rng_and_logged_metrics(block1: str) -> None:
    outcomes = []
    for with_check in (False, True):
        torch.manual_seed(0)
        random.seed(0)
        module = EncoderNet(Block(Square if block1 == "square" else BadSquare))
        callbacks = [AutogradCheck(modules=["encoder.block0"], on_finding="log")]
        trainer = zoo.fit(module, callbacks if with_check else [], limit_train_batches=4)
        outcomes.append(
            (
                {k: v.clone() for k, v in module.state_dict().items()},  # BatchNorm stats too
                torch.get_rng_state(),
                random.getstate(),
                {k: v.clone() for k, v in trainer.callback_metrics.items()},
            )
        )
        if with_check:
            assert callbacks[0].recomputations == 1
    (state0, rng0, py0, metrics0), (state1, rng1, py1, metrics1) = outcomes
    assert state0.keys() == state1.keys()
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    assert torch.equal(rng0, rng1)
    assert py0 == py1
    assert metrics0.keys() == metrics1.keys() == {"train_loss", "noise"}
    for name in metrics0:
        assert torch.equal(metrics0[name], metrics1[name]), name


def test_settings_and_state_key() -> None:
    check = AutogradCheck(modules=["a"], atol=1e-4)
    assert check.settings()["modules"] == ["a"] and check.settings()["atol"] == 1e-4
    assert check.state_key != AutogradCheck().state_key


# ---------------------------------------------------------------------- core pieces
def test_graph_walk_finds_custom_functions_once_each() -> None:
    x = torch.randn(3, requires_grad=True)
    loss = (Square.apply(x) + BadSquare.apply(Square.apply(x))).sum()
    found = find_custom_functions(loss.grad_fn)
    assert sorted(found, key=lambda c: c.__name__) == [BadSquare, Square]


def test_recorder_restores_forward_and_catches_aliases() -> None:
    before = Square.__dict__["forward"]
    with torch.no_grad(), CallRecorder([Square]) as rec:
        square(torch.ones(2))
    assert Square.__dict__["forward"] is before
    assert "forward" not in BadSquare.__dict__  # inherited, never patched
    assert torch.equal(rec.function_inputs[Square][0], torch.ones(2))
    assert check_function(Square, rec.function_inputs[Square]).status == "ok"


class ClampReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype)


def test_kinks_at_exact_zeros_are_not_mismatches() -> None:
    x = torch.relu(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    zeros = int((x == 0).sum())
    assert zeros > 0
    outcome = check_function(ClampReLU, (x,))
    assert outcome.status == "ok"
    assert outcome.nondifferentiable == zeros  # d out[i] / d x[i] at x[i] == 0
    assert outcome.checked == 12 * 12 - zeros

    class LeakyBad(ClampReLU):  # wrong slope on the positive side: still caught
        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 0.9 * grad * (x > 0).to(grad.dtype)

    bad = check_function(LeakyBad, (x,))
    assert bad.status == "mismatch" and bad.mismatched == 12 - zeros


def test_both_checks_in_a_gradient_audit_bundle() -> None:
    from grad_callbacks import GradientAudit
    from grad_callbacks.callbacks.sanity import GradientSanityCheck

    audit = GradientAudit(
        checks=[GradientSanityCheck(on_finding="log"), AutogradCheck(on_finding="log")]
    )
    trainer = zoo.fit(FunctionNet(BadSquare), [audit])
    assert [f.code for f in audit.findings] == ["autograd-mismatch"]
    assert audit.checks[0].steps_checked == trainer.global_step


class MaskedMul(torch.autograd.Function):
    """Correct: the mask is a constant, so its gradient is None by design."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class StraightThrough(torch.autograd.Function):
    """A straight-through estimator: rounds forward, passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class MaskNet(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.net[0](x)
        mask = (x[:, :1] > 0).float().expand_as(h)
        return torch.nn.functional.mse_loss(self.net[2](MaskedMul.apply(h, mask)), y)


class STENet(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = StraightThrough.apply(torch.tanh(self.net[0](x)))
        return torch.nn.functional.mse_loss(self.net[2](h), y)


def test_a_float_mask_whose_gradient_is_none_by_design_is_no_false_alarm() -> None:
    check = AutogradCheck(on_finding="log")
    zoo.fit(MaskNet(), [check])
    assert check.findings == []
    assert check.checks_run >= 1


def test_excluded_surrogate_gradient_is_not_checked_and_included_one_fires() -> None:
    fired = AutogradCheck(on_finding="log")
    zoo.fit(STENet(), [fired])
    assert [f.code for f in fired.findings] == ["autograd-mismatch"]
    quiet = AutogradCheck(exclude=["StraightThrough"], on_finding="log")
    zoo.fit(STENet(), [quiet])
    assert quiet.findings == []

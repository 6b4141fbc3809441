"""The audit on ``torch.compile``d models: no crash, no false alarm, no recompilation, no trace.

Three ways a Lightning user compiles: a compiled submodule (``self.net = torch.compile(net)``),
the LightningModule itself passed to ``fit`` compiled (Lightning's ``from_compiled`` then runs
``training_step`` compiled), and ``LightningModule.compile()`` (its ``__call__`` compiled).

Most runs use the ``aot_eager`` backend: dynamo and AOTAutograd as in a real compiled run (the
guards and recompilations, the ``CompiledFunctionBackward`` node that hides the compiled code
from the autograd graph, dynamo tracing whatever a compiled frame calls), without inductor's
code generation (about 15 s cold). ``test_inductor_runs`` (slow) repeats the core with inductor.

Models compiled whole do not call ``self.log``: with Lightning 2.6.6 and torch 2.13 dynamo
fails on it (``'method' object has no attribute '__dict__'``) with or without any callback.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from grad_callbacks import Finding, GradientAudit
from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.core.grad_stats import GradSanityMonitor, LocalGradProbe
from grad_callbacks.core.ledger import GradientLedger
from tests import zoo

BACKEND = "aot_eager"


# ----------------------------------------------------------------------------- models
class Square(torch.autograd.Function):
    """A custom Function with a correct backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * grad * x


class BadSquare(Square):
    """A custom Function whose backward forgets the factor 2 (``autograd-mismatch``)."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * x


class Apply(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn.apply(x)


class CenterOverBatch(nn.Module):
    """Broken: subtracts the batch mean, so every output depends on every sample."""

    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(dim=0, keepdim=True)


class Unused(nn.Module):
    """Holds a layer that forward never calls (``missing-grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return x


def layers(*middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), *middle, nn.Linear(16, 1))


class Regressor(L.LightningModule):
    """A clean regressor around ``net``; ``log`` calls ``self.log`` (not when compiled whole);
    ``reduction="sum"`` is the summed-loss bug; ``call_self`` runs ``self(x)`` (for
    ``LightningModule.compile()``)."""

    def __init__(
        self,
        net: nn.Module | None = None,
        log: bool = False,
        reduction: str = "mean",
        call_self: bool = False,
    ) -> None:
        super().__init__()
        self.net = net if net is not None else layers(Apply(Square))
        self.log_loss = log
        self.reduction = reduction
        self.call_self = call_self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x) if self.call_self else self.net(x)
        loss = nn.functional.mse_loss(out, y, reduction=self.reduction)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    module: L.LightningModule
    trainer: L.Trainer
    callbacks: list[L.Callback]
    graphs: int  # graphs dynamo compiled during the run
    rng: Tensor  # the CPU generator's state after the run
    warnings: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for cb in self.callbacks for f in getattr(cb, "findings", [])]

    @property
    def alarms(self) -> list[Finding]:
        return [f for f in self.findings if f.severity != "info"]

    def codes(self) -> set[str]:
        return {f.code for f in self.alarms}


_HARMLESS = ("does not have many workers", "LitLogger", "log_every_n_steps")


def run(
    make: Callable[[], L.LightningModule],
    wrap: str,
    callbacks: list[L.Callback],
    backend: str = BACKEND,
) -> Run:
    """Train ``make()`` for one epoch (4 steps of 8 samples), compiled as ``wrap`` says:
    ``"net"`` (its ``net`` submodule), ``"fit"`` (the module passed to ``fit`` compiled) or
    ``"method"`` (``module.compile()``)."""
    torch._dynamo.reset()  # every run compiles from scratch: graph counts are comparable
    torch.manual_seed(0)
    module = make()
    target: Any = module
    if wrap == "net":
        module.net = torch.compile(module.net, backend=backend)
    elif wrap == "fit":
        target = torch.compile(module, backend=backend)
    elif wrap == "method":
        module.compile(backend=backend)
    else:
        raise ValueError(wrap)
    before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = zoo.fit(target, callbacks, data=zoo.regression_data(n=32, batch_size=8))
    graphs = counters["stats"]["unique_graphs"] - before
    messages = [
        str(w.message)
        for w in caught
        # torch's own deprecations surface when dynamo first builds its trace rules
        if not issubclass(w.category, (DeprecationWarning, FutureWarning))
        and not any(h in str(w.message) for h in _HARMLESS)
    ]
    return Run(module, trainer, callbacks, graphs, torch.get_rng_state(), messages)


def audit() -> GradientAudit:
    return GradientAudit(every_n_steps=1, on_finding="log", max_overhead=None)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def optimizer_states_equal(a: L.Trainer, b: L.Trainer) -> bool:
    (sa,), (sb,) = ([o.state_dict()["state"] for o in t.optimizers] for t in (a, b))
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa
    )


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- clean runs
CLEAN: dict[str, tuple[Callable[[], L.LightningModule], str]] = {
    "compiled-submodule": (lambda: Regressor(log=True), "net"),
    "compiled-module-passed-to-fit": (Regressor, "fit"),
    "module.compile()": (lambda: Regressor(call_self=True, log=True), "method"),
}


@functools.cache
def clean_runs(case: str) -> tuple[Run, Run]:
    """The run without the audit and the run with every check at every step (shared)."""
    make, wrap = CLEAN[case]
    return run(make, wrap, []), run(make, wrap, [audit()])


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_clean_compiled_run_is_silent_and_every_check_runs(case: str) -> None:
    _, audited = clean_runs(case)
    assert audited.trainer.global_step == 4
    assert audited.alarms == []
    assert audited.warnings == []  # no recompile-limit, tracing or audit warning
    checked = {c.check_name: c.steps_checked for c in audited.callbacks[0].checks}
    expected = {
        "ZeroGradCheck": 4,
        "PerSampleGradientCheck": 4,
        "BatchMixingCheck": 4,
        "GradientSanityCheck": 4,
        "GradientMonitor": 4,
        # the Square Function is found (through an eager replay where it is compiled) and
        # checked at the first batch
        "AutogradCheck": 1,
        "RankSyncCheck": 0,  # one process: nothing to compare
    }
    assert checked == expected
    per_sample = next(c for c in audited.callbacks[0].checks if c.check_name.startswith("Per"))
    # vmap falls back to the loop for the Square Function (no vmap support), not for dynamo
    assert per_sample.last_stats is not None
    reason = per_sample.last_stats.fallback_reason or ""
    assert "autograd.Function" in reason and "dynamo" not in reason.lower()


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_audit_is_non_invasive_and_never_recompiles(case: str) -> None:
    plain, audited = clean_runs(case)
    assert params_equal(plain.module, audited.module)
    assert optimizer_states_equal(plain.trainer, audited.trainer)
    assert torch.equal(plain.rng, audited.rng)
    # the recomputations (swapped parameters, vmap, inputs that require grad, float64, no_grad)
    # run eagerly: dynamo compiles exactly the graphs of the run without the audit
    assert plain.graphs >= 1
    assert audited.graphs == plain.graphs


# ----------------------------------------------------------------------------- broken runs
@pytest.mark.parametrize("wrap", ["net", "fit"])
def test_summed_loss_is_reported(wrap: str) -> None:
    result = run(lambda: Regressor(reduction="sum"), wrap, [audit()])
    assert result.codes() == {"reduction-sum"}
    (finding,) = result.alarms
    assert finding.data["scale"] == pytest.approx(8.0, rel=1e-4)  # B = 8


def test_missing_zero_grad_in_manual_optimization_is_reported() -> None:
    """Compiled submodule; for a compiled ``training_step`` see the tests on tracing below."""
    result = run(lambda: zoo.ManualMLP(zero_grad=False), "net", [audit()])
    assert result.codes() == {"missing-zero-grad"}
    (finding,) = result.alarms
    prefix = "net._orig_mod."
    assert finding.params == tuple(prefix + n for n in ("0.weight", "0.bias", "2.weight", "2.bias"))


def test_batch_mixing_inside_compiled_code_is_found_and_localised() -> None:
    check = BatchMixingCheck(on_finding="log")
    result = run(lambda: Regressor(layers(CenterOverBatch())), "net", [check])
    (finding,) = result.alarms
    assert finding.code == "batch-mixing"
    assert finding.params == ("net._orig_mod.2",)  # the CenterOverBatch layer


@pytest.mark.parametrize("wrap", ["net", "fit"])
def test_custom_function_and_unused_layer_inside_compiled_code(wrap: str) -> None:
    """The wrong backward is only visible through the eager replay; ``modules`` may name a
    layer of a compiled submodule without ``_orig_mod``."""
    checks = [
        AutogradCheck(modules=["net.0"], on_finding="log"),
        GradientSanityCheck(on_finding="log"),
        PerSampleGradientCheck(every_n_steps=1, on_finding="log"),
    ]
    net = layers(Apply(Square), Apply(BadSquare), Unused())
    result = run(lambda: Regressor(net), wrap, checks)
    assert result.codes() == {"autograd-mismatch", "missing-grad"}
    assert [f for f in result.findings if f.code == "check-skipped"] == []
    mismatch = next(f for f in result.alarms if f.code == "autograd-mismatch")
    assert mismatch.params == ("BadSquare",)
    # d(x^2)/dx is 2x; the broken backward gives x
    assert mismatch.data["numerical"] == pytest.approx(2 * mismatch.data["analytic"], rel=1e-4)
    missing = next(f for f in result.alarms if f.code == "missing-grad")
    inner = "net._orig_mod." if wrap == "net" else "net."
    assert missing.params == (inner + "4.dead.weight", inner + "4.dead.bias")
    assert checks[0].checks_run == 3  # Square, BadSquare and the module net.0


class FailsWhenRunAgain(Regressor):
    """Its ``training_step`` cannot run twice on a batch (say, it consumes a one-shot stream)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.calls: Counter[int] = Counter()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.calls[batch_idx] += 1
        if self.calls[batch_idx] > 1:
            raise RuntimeError("batch already consumed")
        return super().training_step(batch, batch_idx)


def test_custom_functions_unseen_when_the_eager_replay_fails_are_reported_as_skipped() -> None:
    check = AutogradCheck(on_finding="log")
    result = run(lambda: FailsWhenRunAgain(layers(Apply(BadSquare))), "net", [check])
    assert result.trainer.global_step == 4
    assert result.alarms == []
    (finding,) = result.findings
    assert finding.code == "check-skipped"
    assert "torch.compile" in finding.message
    assert "RuntimeError: batch already consumed" in finding.message


def test_eager_replay_never_touches_live_gradients() -> None:
    """Manual optimization with a raw ``loss.backward()`` (no ``manual_backward``) inside the
    replayed step: the replay's backward reaches detached copies of the parameters only, so
    training is bitwise the same as without the check, and the ledger sees no extra pass."""

    class RawBackward(zoo.ManualMLP):
        def __init__(self) -> None:
            super().__init__()
            self.net = layers(Apply(Square))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.manual_backward(loss)  # the live pass: AutogradCheck walks its graph here
            loss2 = nn.functional.mse_loss(self.net(x), y)
            loss2.backward()  # a raw pass: in the replay it must not reach the live .grad
            opt.step()
            opt.zero_grad()

    plain = run(RawBackward, "net", [])
    checks = [AutogradCheck(on_finding="log"), ZeroGradCheck(on_finding="log")]
    audited = run(RawBackward, "net", checks)
    assert audited.findings == []
    assert checks[0].checks_run == 1  # Square, found by the replay
    assert params_equal(plain.module, audited.module)


# ----------------------------------------------------------------------------- no tracing
@contextmanager
def probing(targets: list[tuple[type, str]]) -> Iterator[list[bool]]:
    """Wrap each ``owner.name`` to record whether dynamo is tracing it: ``is_compiling()`` is
    True only while dynamo traces the code that calls it, never when it runs as Python."""
    seen: list[bool] = []
    originals = [(owner, name, owner.__dict__[name]) for owner, name in targets]
    for owner, name, original in originals:

        def probe(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(torch.compiler.is_compiling())
            return _original(*args, **kwargs)

        setattr(owner, name, probe)
    try:
        yield seen
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def test_hooks_are_not_traced_from_a_compiled_manual_training_step() -> None:
    """In manual optimization under a compiled ``training_step``, ``manual_backward`` and
    ``opt.step()`` run the callbacks' hooks, the ledger's tensor hooks and its optimizer hook
    from compiled code: they must run as plain Python, and still find the missing zero_grad."""
    targets = [
        (GradientLedger, "audit_step"),
        (GradientLedger, "_observe_clear"),
        (GradientLedger, "_backward_seq"),
        (AutogradCheck, "_add_functions"),
    ]
    checks = [
        ZeroGradCheck(on_finding="log"),
        AutogradCheck(on_finding="log"),
        PerSampleGradientCheck(on_finding="log"),
    ]
    with probing(targets) as seen:
        result = run(lambda: zoo.ManualMLP(zero_grad=False), "fit", checks)
    assert result.codes() == {"missing-zero-grad"}
    (finding,) = result.alarms
    assert finding.params == ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    assert len(seen) > 8 and not any(seen)
    assert result.warnings == []


@functools.cache
def manual_compiled_audit() -> tuple[Run, list[bool]]:
    with probing([(GradSanityMonitor, "observe")]) as seen:
        result = run(zoo.ManualMLP, "fit", [audit()])
    return result, seen


def test_clean_manual_optimization_compiled_whole_is_silent() -> None:
    result, _ = manual_compiled_audit()
    assert result.trainer.global_step == 4
    assert result.alarms == []


def test_audit_hooks_are_not_traced_from_a_compiled_manual_training_step() -> None:
    result, seen = manual_compiled_audit()
    assert seen and not any(seen)
    assert result.warnings == []


# ----------------------------------------------------------------------------- inductor
@pytest.mark.slow
def test_inductor_runs() -> None:
    """The default backend (inductor): clean runs silent, bitwise identical and with no extra
    graph; the summed loss found."""
    for make, wrap in (
        (lambda: Regressor(log=True), "net"),
        (Regressor, "fit"),
    ):
        plain = run(make, wrap, [], backend="inductor")
        audited = run(make, wrap, [audit()], backend="inductor")
        assert audited.alarms == [] and audited.warnings == []
        assert params_equal(plain.module, audited.module)
        assert audited.graphs == plain.graphs >= 1
    summed = run(lambda: Regressor(reduction="sum"), "fit", [audit()], backend="inductor")
    assert summed.codes() == {"reduction-sum"}


@pytest.mark.parametrize("untraced", [False, True])
def test_local_grad_probe_hooks_stay_out_of_a_compiled_backward(untraced: bool) -> None:
    """GradientSanityCheck's DDP probe under a compiled manual training_step: its tensor hook,
    called from the backward pass inside compiled code, runs as Python when ``untraced`` (as
    the check sets it then), and records the same norm either way."""
    torch._dynamo.reset()
    w = nn.Parameter(torch.ones(3))
    probe = LocalGradProbe([w], untraced=untraced)

    @torch.compile(backend="aot_eager")
    def step(x: torch.Tensor) -> None:
        (w * x).sum().backward()

    x = torch.arange(3.0)
    with probing([(LocalGradProbe, "_record")]) as seen:
        step(x)
    assert seen == [not untraced]  # traced by dynamo unless untraced
    norms = probe.take([w])
    assert norms is not None and torch.allclose(norms, torch.linalg.vector_norm(x).reshape(1))
    probe.remove()

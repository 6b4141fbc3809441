"""AutogradCheck: finite differences against autograd for custom Functions and chosen modules.

How it runs, at the first training batch of every fit and at the batch after
:meth:`AutogradCheck.run_now`:

1. ``on_before_backward``: the loss's autograd graph is walked (``grad_fn`` and
   ``next_functions``) to find the custom ``torch.autograd.Function`` classes the training step
   used. The graph gives the classes but not their inputs.
2. ``on_train_batch_end`` (the live step is over), only if a Function was found or modules were
   named: ``training_step`` is run once more on the first ``max_samples`` samples of the batch,
   under ``torch.no_grad()``, while a :class:`~grad_callbacks.core.gradcheck.CallRecorder`
   records the inputs of the first call of each Function (by temporarily wrapping its
   ``forward``) and of each named module (a forward pre-hook). This recomputation is isolated
   from the run: the torch, Python and NumPy random streams are forked and restored, ``log`` and
   ``log_dict`` do nothing, the module's buffers (BatchNorm running statistics) and torchmetrics
   states are saved and restored, and in manual optimization ``optimizers()`` and
   ``lr_schedulers()`` return stand-ins whose ``step`` and ``zero_grad`` do nothing while
   ``manual_backward``, ``toggle_optimizer`` and ``untoggle_optimizer`` do nothing. No gradient
   is computed on the live graph and no ``.grad`` is touched.
3. The recorded inputs are copied to float64 and the Jacobian from the custom ``backward()``
   is compared with central finite differences
   (:func:`~grad_callbacks.core.gradcheck.check_function` and
   :func:`~grad_callbacks.core.gradcheck.check_module`).

A model without custom Functions and without named modules costs one graph walk at its first
batch, and nothing afterwards.

``torch.compile``: the custom Functions called inside compiled code are traced into the compiled
graph and do not appear in the loss's autograd graph (one ``CompiledFunctionBackward`` node stands
for the compiled region). When the walk meets such a node, ``training_step`` is run once more,
eagerly (``torch.compiler.set_stance("force_eager")``) and with gradients, on the first
``max_samples`` samples and on detached copies of the parameters (so no backward pass in it
reaches a live ``.grad``), isolated like the recomputation of step 2, and the graph of that loss
(the returned loss, or in manual optimization the losses given to ``manual_backward``, which
does nothing there) is walked instead. Every recomputation and finite-difference evaluation runs
eagerly, so nothing is recompiled. Module names may leave out the ``_orig_mod`` of compiled
submodules (``"net.0"`` for ``net._orig_mod.0``).

Example:
    >>> import lightning as L
    >>> check = AutogradCheck(modules=["encoder.block0"])
    >>> trainer = L.Trainer(callbacks=[check])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.recompute import Recomputations, isolated
from grad_callbacks.core.batch import batch_size, slice_batch
from grad_callbacks.core.gradcheck import (
    CallRecorder,
    FunctionClass,
    Outcome,
    Tolerance,
    check_function,
    check_module,
    scan_graph,
)
from grad_callbacks.findings import CODES, make_finding


def function_name(cls: type) -> str:
    """The name a Function is reported under: its qualified name (``Square``,
    ``Outer.Square``), without the ``<locals>`` of a class defined in a function.

    Example:
        >>> function_name(torch.autograd.Function)
        'Function'
    """
    return cls.__qualname__.replace("<locals>.", "")


def _collect_into(losses: list[Any]) -> Callable[..., None]:
    """A stand-in for ``manual_backward`` that keeps the loss instead of differentiating it."""

    def manual_backward(loss: Any, *args: Any, **kwargs: Any) -> None:
        losses.append(loss)

    return manual_backward


class _Step(nn.Module):
    """``training_step`` as a module's forward, for ``functional_call`` to swap the
    LightningModule's parameters for the whole step."""

    def __init__(self, inner: pl.LightningModule, batch_idx: int) -> None:
        super().__init__()
        self.inner = inner
        self.batch_idx = batch_idx

    def forward(self, batch: Any) -> Any:
        return self.inner.training_step(batch, self.batch_idx)


def _without_compile_wrappers(name: str) -> str:
    """A module name without the ``_orig_mod`` parts that ``torch.compile`` wrappers add."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def resolve_modules(
    named: dict[str, nn.Module], names: Sequence[str]
) -> tuple[dict[str, nn.Module], list[str]]:
    """The modules called ``names`` (a name may leave out ``_orig_mod``), and the unknown names.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> outer = nn.Sequential()
        >>> outer.add_module("net", torch.compile(net))
        >>> found, unknown = resolve_modules(dict(outer.named_modules()), ["net.0", "head"])
        >>> found["net.0"] is net[0], unknown
        (True, ['head'])
    """
    aliases: dict[str, nn.Module] = {}
    for full, module in named.items():
        aliases[_without_compile_wrappers(full)] = module  # the innermost (uncompiled) wins
    found: dict[str, nn.Module] = {}
    unknown: list[str] = []
    for name in names:
        module = named.get(name, aliases.get(name))
        if module is None:
            unknown.append(name)
        else:
            found[name] = module
    return found, unknown


class AutogradCheck(AuditCallback):
    """Compares autograd with finite differences for custom Functions and chosen modules.

    Every custom ``torch.autograd.Function`` that the training loss's graph goes through
    (torch's own excluded) is checked at inputs recorded from the training step, and so is
    every module named in ``modules``. Runs at the first training batch of a fit and at the
    batch after :meth:`run_now`, never on live tensors: see the module documentation for how
    the inputs are recorded and how the run is kept untouched.

    Findings: ``autograd-mismatch`` (error) names the Function (its class's qualified name) or
    module, with the worst Jacobian entry (which input and output, at which index, the
    analytic and numerical values); ``check-skipped`` (info) for a Function or module that could
    not be checked (not float64-compatible, not called in the recomputation, no floating
    input, an unknown module name), with the reason.

    Tolerances (float64): an entry is off when ``|analytic - numerical| > atol + rtol *
    |numerical|``; finite differences are central with step ``eps``. Where an entry is off,
    one-sided differences at ``eps`` and ``eps / 10`` tell a kink (a ReLU-like Function at an
    input of exactly 0, where any derivative is right) from a wrong derivative; kinks are left
    out (counted in ``data["nondifferentiable"]``). At most ``max_entries``
    input entries and ``max_entries`` output entries are compared (a seeded random subset spread
    over every input beyond that), so a check costs at most ``2 * max_entries`` forward and
    ``max_entries`` backward evaluations of the Function or module on ``max_samples`` samples.

    Limitations: Functions are found through the loss passed to ``on_before_backward``, so in
    manual optimization a raw ``loss.backward()`` (instead of ``self.manual_backward``) hides
    them (named modules are still checked). Side effects of ``training_step`` other than those
    listed in the module documentation (e.g. a counter attribute it increments, a parameter it
    changes in place) are not undone. Under DDP every process checks; ``training_step`` is
    recomputed on the unwrapped module, so DDP itself runs no collective, but one written in
    ``training_step`` (``all_gather``, ``SyncBatchNorm``) runs again on every process.

    Args:
        modules: names of submodules (as in ``named_modules()``) to check as a whole, with
            their trainable parameters and floating inputs.
        exclude: names of custom Functions (class name or qualified name) whose backward is
            meant to differ from the forward's derivative (straight-through estimators,
            gradient reversal): they are not checked.
        max_samples: how many samples of the batch the recomputation uses.
        max_entries: the budget of input (and of output) entries compared per check.
        atol: absolute tolerance.
        rtol: relative tolerance.
        eps: finite-difference step.
        every_n_steps: accepted for a uniform interface; the check runs at fit start and on
            demand.
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.
        recompute: False forbids running ``training_step`` again: the check then reports
            ``check-skipped`` once where it would have (it finds the inputs of Functions and
            modules by a recomputation).

    Example:
        >>> check = AutogradCheck(modules=["encoder"], max_samples=4)
        >>> check.run_now()  # check again at the next training batch
    """

    reruns_training_step = True
    check_name = "AutogradCheck"
    metric_prefix = "autograd"
    live_attributes = ("_functions",)

    def __init__(
        self,
        modules: Sequence[str] = (),
        *,
        exclude: Sequence[str] = (),
        max_samples: int = 2,
        max_entries: int = 256,
        atol: float = 1e-5,
        rtol: float = 1e-3,
        eps: float = 1e-6,
        every_n_steps: int = 1,
        on_finding: OnFinding = "warn",
        recompute: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        self.recompute = recompute
        # What recomputations could not put back (then the check stops recomputing).
        self._record = Recomputations()
        if isinstance(modules, str):
            modules = [modules]
        if max_samples < 1 or max_entries < 1:
            raise ValueError("max_samples and max_entries must be positive")
        self.modules = list(modules)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.max_samples = max_samples
        self.tolerance = Tolerance(atol=atol, rtol=rtol, eps=eps, max_entries=max_entries)
        self._requested = False
        self._armed = False
        self._armed_step = 0
        self._functions: list[FunctionClass] = []
        self._compiled_graph = False
        self._error_note = ""
        #: How many loss graphs were walked, training steps recomputed and checks run: the
        #: check's work, for tests and cost accounting.
        self.graph_walks = 0
        self.recomputations = 0
        self.checks_run = 0

    def scalar_charts(self) -> dict[str, list[str]]:
        """None: the check logs no scalars (its findings say everything)."""
        return {}

    def settings(self) -> dict[str, Any]:
        tol = self.tolerance
        return {
            **super().settings(),
            "modules": list(self.modules),
            "exclude": list(self.exclude),
            "max_samples": self.max_samples,
            "max_entries": tol.max_entries,
            "atol": tol.atol,
            "rtol": tol.rtol,
            "eps": tol.eps,
            **({"recompute": False} if not self.recompute else {}),
        }

    def idle_reason(self) -> str:
        if self.graph_walks and not self._functions and not self.modules:
            return (
                "nothing to compare: the loss graph of the first training batch uses no custom "
                "torch.autograd.Function, and no modules were named (AutogradCheck(modules=[...]) "
                "checks chosen modules)"
            )
        return super().idle_reason()

    def report_entry(self) -> dict[str, Any]:
        entry = super().report_entry()
        entry["recomputations"] = self.recomputations
        return entry

    def run_now(self) -> None:
        """Check again at the next training batch."""
        self._requested = True
        self.wake()

    def next_busy_step(self, step: int) -> int | None:
        return step if self._requested or self._armed or self._pending_scalars else None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._requested = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._requested:
            self._requested = False
            self._armed = True
            self._armed_step = trainer.global_step
            self._functions = []
            self._compiled_graph = False

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self._armed:
            return
        with self.timed(), self.guarded("walking the loss graph"):
            self.graph_walks += 1
            self._add_functions(loss)

    def _add_functions(self, loss: Tensor) -> None:
        scan = scan_graph(loss.grad_fn)
        self._compiled_graph = self._compiled_graph or scan.compiled
        for cls in scan.functions:
            excluded = {cls.__name__, function_name(cls)} & set(self.exclude)
            if cls not in self._functions and not excluded:
                self._functions.append(cls)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._armed:
            self._armed = False
            with self.timed(), self.guarded("the autograd check"):
                self._check(trainer, pl_module, batch, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ the check
    def _check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not (self._compiled_graph or self._functions or self.modules):
            return
        if not self.recompute or self._record.lost:
            reason = (
                "recompute=False: finding the inputs of custom Functions and modules means "
                "running training_step again, so the check does not run"
                if not self.recompute
                else "running training_step again changed " + ", ".join(self._record.lost)
                + ", which could not be put back; the check stops recomputing"
            )
            self.skip(reason, step=self._armed_step)
            return
        if self._compiled_graph:
            self._find_compiled_functions(trainer, pl_module, batch, batch_idx)
        if not self._functions and not self.modules:
            return
        self.steps_checked += 1
        modules, unknown = resolve_modules(dict(pl_module.named_modules()), self.modules)
        for name in unknown:
            self.skip(
                f"module {name!r} is not a submodule of the model",
                params=(name,),
                step=self._armed_step,
            )
        recorder = self._recompute(trainer, pl_module, batch, batch_idx, modules)
        for cls in self._functions:
            name = function_name(cls)
            if cls not in recorder.function_inputs:
                self.skip(
                    f"the custom Function {name} was not called when training_step was run "
                    f"again{self._error_note}",
                    params=(name,),
                    step=self._armed_step,
                )
                continue
            self.checks_run += 1
            self._report(
                name,
                "custom autograd.Function",
                check_function(cls, recorder.function_inputs[cls], self.tolerance),
            )
        for name, module in modules.items():
            if name not in recorder.module_inputs:
                self.skip(
                    f"module {name!r} was not called when training_step was run again"
                    f"{self._error_note}",
                    params=(name,),
                    step=self._armed_step,
                )
                continue
            self.checks_run += 1
            kind = f"module {type(module).__name__}"
            self._report(
                name, kind, check_module(module, recorder.module_inputs[name], self.tolerance)
            )

    def _find_compiled_functions(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Walk the graph of ``training_step`` run again eagerly: the custom Functions inside
        ``torch.compile``d code do not appear in the live loss's graph.

        The step runs on detached copies of the parameters (``functional_call``), so that a
        raw ``loss.backward()`` in it reaches the copies, never the live ``.grad`` or the
        hooks on the live parameters; ``manual_backward`` only keeps its loss.
        """
        self.recomputations += 1
        size = batch_size(batch)
        small = slice_batch(batch, slice(0, self.max_samples), size=size) if size else batch
        error: BaseException | None = None
        losses: list[Any] = []
        for attempt in (small, batch):
            losses, error = [], None
            copies = {
                f"inner.{name}": p.detach().requires_grad_(p.requires_grad)
                for name, p in pl_module.named_parameters()
            }
            with isolated(pl_module, trainer=trainer, record=self._record), torch.enable_grad():
                pl_module.__dict__["manual_backward"] = _collect_into(losses)
                try:
                    output = torch.func.functional_call(
                        _Step(pl_module, batch_idx), copies, (attempt,)
                    )
                except Exception as exc:
                    error = exc
                else:
                    if isinstance(output, Mapping):
                        output = output.get("loss")
                    if isinstance(output, Tensor):
                        losses.append(output)
                    for loss in losses:
                        if isinstance(loss, Tensor):
                            self._add_functions(loss)
            if error is None:
                break
        if error is not None or not losses:
            why = (
                f"it raised {type(error).__name__}: {error}"
                if error is not None
                else "it returned no loss and called no manual_backward"
            )
            self.skip(
                "the training loss goes through torch.compile'd code, where custom "
                "autograd.Functions are traced into the compiled graph and cannot be seen in "
                f"the autograd graph, and training_step run again eagerly to find them failed: "
                f"{why}; custom Functions inside the compiled code are not checked (name the "
                "modules that call them in AutogradCheck(modules=[...]) to check those)",
                step=self._armed_step,
            )

    def _recompute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        modules: dict[str, nn.Module],
    ) -> CallRecorder:
        """Run ``training_step`` once more on a slice of ``batch``, recording inputs."""
        self.recomputations += 1
        self._error_note = ""
        error: BaseException | None = None
        recorder = CallRecorder(self._functions, modules)
        size = batch_size(batch)
        small = slice_batch(batch, slice(0, self.max_samples), size=size) if size else batch
        for attempt in (small, batch):
            error = None
            with (
                recorder,
                isolated(pl_module, trainer=trainer, record=self._record),
                torch.no_grad(),
            ):
                try:
                    pl_module.training_step(attempt, batch_idx)
                except Exception as exc:  # e.g. a raw loss.backward() under no_grad
                    error = exc
            if error is None or recorder.function_inputs or recorder.module_inputs:
                break
        if error is not None:
            self._error_note = f" (it raised {type(error).__name__}: {error})"
        return recorder

    def _report(self, name: str, kind: str, outcome: Outcome) -> None:
        if outcome.status == "skipped":
            self.skip(
                f"{kind} {name} cannot be checked: {outcome.reason}",
                params=(name,),
                step=self._armed_step,
            )
            return
        if outcome.status != "mismatch" or outcome.worst is None:
            return
        w = outcome.worst
        tol = outcome.settings
        self.report(
            make_finding(
                "autograd-mismatch",
                check=self.check_name,
                step=self._armed_step,
                params=(name,),
                message=(
                    f"The backward of {kind} {name} disagrees with finite differences: "
                    f"d {w.output}{list(w.output_index)} / d {w.input}{list(w.input_index)} is "
                    f"{w.analytic:.6g} by autograd but {w.numerical:.6g} by central differences "
                    f"(float64, eps={tol['eps']:g}); {outcome.mismatched} of {outcome.checked} "
                    f"Jacobian entries checked differ by more than atol + rtol * |numerical| "
                    f"(atol={tol['atol']:g}, rtol={tol['rtol']:g}). "
                    f"Fix: {CODES['autograd-mismatch'].fix}."
                ),
                data={
                    "kind": "module" if kind.startswith("module") else "function",
                    "input": w.input,
                    "input_index": list(w.input_index),
                    "output": w.output,
                    "output_index": list(w.output_index),
                    "analytic": w.analytic,
                    "numerical": w.numerical,
                    "abs_error": w.error,
                    "mismatched": outcome.mismatched,
                    "checked": outcome.checked,
                    "nondifferentiable": outcome.nondifferentiable,
                    "constant_inputs": outcome.constant_inputs,
                    **tol,
                },
            )
        )

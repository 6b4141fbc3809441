"""How PerSampleGradientCheck obtains a loss: ``training_step`` on a (sliced) batch, or the
per-sample losses a module's ``per_sample_loss`` method (or the check's argument) gives, or, in
manual optimization, the losses ``training_step`` hands to ``manual_backward``.

Each way is one function; the recomputation itself runs inside
:func:`~grad_callbacks.callbacks.recompute.isolated`, set up by the caller, started from the
module's Python state before the real step (a hidden state carried from the previous batch is
the one the real step saw). Such a carried state that holds one row per sample is cut with the
batch (:func:`carried_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from grad_callbacks.callbacks.backward_guard import _recording_backward
from grad_callbacks.callbacks.stand_ins import ManualSteps, stood_in
from grad_callbacks.core.python_state import MISSING, PythonState

PerSampleLoss = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]


class _NoLoss(RuntimeError):
    """training_step returned no loss."""


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise _NoLoss(
        "training_step returned "
        + ("None" if output is None else type(output).__name__)
        + " instead of a loss tensor (or a dict with 'loss')"
    )


def training_loss(batch_idx: int) -> LossFn:
    """``fn(module, batch)``: the loss ``training_step(batch, batch_idx)`` returns.

    Raises ``_NoLoss`` when the step returns no loss.
    """

    def loss(module: nn.Module, batch: Any) -> Tensor:
        return _loss_of(module.training_step(batch, batch_idx))  # type: ignore[operator]

    return loss


def sample_losses(
    explicit: PerSampleLoss | None, pl_module: pl.LightningModule
) -> PerSampleLoss | None:
    """The per-sample loss function: the check's argument, else the module's
    ``per_sample_loss`` method, else None (slice ``training_step``'s batch)."""
    if explicit is not None:
        return explicit
    method = getattr(pl_module, "per_sample_loss", None)
    if callable(method):
        return lambda module, batch: module.per_sample_loss(batch)  # type: ignore[operator]
    return None


# ------------------------------------------------------------------ a stateful training_step
@dataclass(frozen=True)
class CarriedState:
    """The attributes the real step rebound (a hidden state carried from the previous batch, a
    counter), put back to their value before the step at every call of the loss, so that every
    pass (the batch, each sample, each vmap chunk) starts where the real step started. Those
    whose value holds one row per sample are cut with the batch: a sample's loss sees its row.

    ``leaves[i]`` is a tensor leaf of attribute ``paths[i]`` (of the tuple/list ``templates[i]``,
    or the tensor itself) moved so that its batch axis comes first; ``axes[i]`` says where it
    goes back.
    """

    paths: tuple[str, ...] = ()
    templates: tuple[Any, ...] = ()
    axes: tuple[tuple[int, ...], ...] = ()
    leaves: tuple[tuple[Tensor, ...], ...] = ()
    #: The other rebound attributes and their value before the step (MISSING: none).
    fixed: tuple[tuple[str, Any], ...] = ()

    def pack(self, batch: Any, n: int) -> Any:
        """``batch`` (already cut to ``n`` samples) with the state's first ``n`` rows."""
        if not self.paths:
            return batch
        return (batch, [leaf[:n] for group in self.leaves for leaf in group])

    def loss(self, fn: LossFn) -> LossFn:
        """``fn`` on a packed batch: the state's rows are put on the module first."""
        if not self.paths and not self.fixed:
            return fn

        def loss(module: nn.Module, packed: Any) -> Tensor:
            for path, value in self.fixed:
                _set_attribute(module, path, value)
            if not self.paths:
                return fn(module, packed)
            batch, flat = packed
            at = 0
            for path, template, axes in zip(self.paths, self.templates, self.axes, strict=True):
                rows = [flat[at + i].movedim(0, a) for i, a in enumerate(axes)]
                at += len(axes)
                value = rows[0] if isinstance(template, Tensor) else type(template)(rows)
                _set_attribute(module, path, value)
            return fn(module, batch)

        return loss


def _set_attribute(module: nn.Module, path: str, value: Any) -> None:
    owner, _, name = path.rpartition(".")
    target = module if owner == "self" else module.get_submodule(owner)
    if value is MISSING:
        target.__dict__.pop(name, None)
    else:
        target.__dict__[name] = value


def _batch_axis(t: Tensor, b: int) -> int | str | None:
    dims = [i for i, d in enumerate(t.shape) if d == b]
    if not dims:
        return None
    if len(dims) > 1:
        return "ambiguous"
    return dims[0]


def carried_state(start: PythonState | None, b: int) -> CarriedState | str:
    """The attributes the real step rebound whose value before it has a batch axis of size
    ``b``, or why they cannot be sliced (a tensor with several axes of that size)."""
    if start is None:
        return CarriedState()
    paths, templates, axes_all, leaves_all = [], [], [], []
    fixed: list[tuple[str, Any]] = []
    for path, before in start.rebound().items():
        if isinstance(before, Tensor):
            leaves: list[Any] = [before]
        elif type(before) in (tuple, list) and before:
            leaves = list(before)
        else:
            leaves = []
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            fixed.append((path, before))
            continue
        axes = [_batch_axis(t, b) for t in leaves]
        if "ambiguous" in axes:
            shapes = [tuple(t.shape) for t in leaves]
            return (
                f"training_step carries {path} (shape {shapes}) from one batch to the next, and "
                f"more than one of its axes has the batch size {b}, so it cannot be cut sample "
                f"by sample"
            )
        if any(a is None for a in axes):
            fixed.append((path, before))  # not per-sample: every sample sees it whole
            continue
        paths.append(path)
        templates.append(before)
        ints = tuple(int(a) for a in axes)  # type: ignore[arg-type]
        axes_all.append(ints)
        leaves_all.append(
            tuple(t.detach().movedim(a, 0) for t, a in zip(leaves, ints, strict=True))
        )
    return CarriedState(
        tuple(paths), tuple(templates), tuple(axes_all), tuple(leaves_all), tuple(fixed)
    )


# ------------------------------------------------------------------ manual optimization
def manual_step_losses(trainer: Any, batch_idx: int, step: int) -> LossFn:
    """``fn(module, batch)``: in manual optimization, the sum of the losses the ``step``-th
    optimizer step of ``training_step(batch, batch_idx)`` applies (see :class:`ManualSteps`).

    Must run inside :func:`~grad_callbacks.callbacks.recompute.isolated` (the optimizers
    inert); the events are recorded by a nested block of its own, so the caller's block may be
    any.
    """

    def loss(module: nn.Module, batch: Any) -> Tensor:
        steps = manual_steps(trainer, module, batch, batch_idx)
        if step >= len(steps):
            raise _NoLoss(f"training_step made {len(steps)} optimizer step(s) when run again")
        losses = [_loss_of(x) for x in steps[step][1]]
        if not losses:
            raise _NoLoss("no loss reached this optimizer step's parameters")
        return sum(losses[1:], losses[0])

    return loss


def manual_steps(
    trainer: Any, module: nn.Module, batch: Any, batch_idx: int
) -> list[tuple[int | None, list[Any]]]:
    """Run a manual-optimization ``training_step`` with its optimizers recording: per optimizer
    step, the optimizer's index and the losses it applies."""
    return manual_record(trainer, module, batch, batch_idx).steps()


def manual_record(trainer: Any, module: nn.Module, batch: Any, batch_idx: int) -> ManualSteps:
    """Run a manual-optimization ``training_step`` with its optimizers recording, and return
    the record (:meth:`ManualSteps.steps`, :meth:`ManualSteps.cleared`)."""
    manual = ManualSteps(trainer.optimizers)
    with stood_in(module, trainer, manual), _recording_backward(manual):
        module.training_step(batch, batch_idx)  # type: ignore[operator]
    return manual


# ------------------------------------------------------------------ random draws
_RANDOM_FACTORIES = frozenset(
    {
        torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like,
        torch.randint_like, torch.normal, torch.bernoulli, torch.poisson,
    }
)


class _Draws(TorchFunctionMode):
    """Records the tensors random factories return (``record``), or hands out the recorded
    ones' rows ``rows`` in the same order (``replay``)."""

    def __init__(self, recorded: list[Tensor], rows: Tensor | None = None) -> None:
        super().__init__()
        self.recorded, self.rows, self.at, self.mismatch = recorded, rows, 0, False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func not in _RANDOM_FACTORIES or not isinstance(out, Tensor):
            return out
        if self.rows is None:
            self.recorded.append(out.detach().clone())
            return out
        k, self.at = self.at, self.at + 1
        if k < len(self.recorded) and out.dim() >= 1:
            source = self.recorded[k]
            if out.shape[0] == len(self.rows) and out.shape[1:] == source.shape[1:]:
                return source[self.rows].to(out.dtype)
        self.mismatch = True
        return out


@dataclass(frozen=True)
class RandomDraws:
    """Random tensors ``training_step`` draws itself (``torch.randn(B, ...)`` noise, a GAN's
    latent vectors), taken from a recording pass on the batch and handed out row by row, so
    that the batch pass and each sample's pass see the same numbers. Each draw with the batch
    size as leading dimension is cut like the batch; any other draw makes the replay give up
    (the comparison then reports the loss as random).

    ``pack`` adds the sample indices to the batch; the loss reads them with ``tolist()``, which
    vmap cannot run, so the per-sample gradients come from the loop.
    """

    recorded: tuple[Tensor, ...] = ()

    @classmethod
    def record(cls, fn: LossFn, module: nn.Module, batch: Any) -> RandomDraws:
        """Run ``fn`` once (no gradient) and keep what it draws."""
        recorded: list[Tensor] = []
        with _Draws(recorded), torch.no_grad():
            fn(module, batch)
        return cls(tuple(recorded))

    def pack(self, batch: Any, n: int) -> Any:
        return (batch, torch.arange(n)) if self.recorded else batch

    def loss(self, fn: LossFn) -> LossFn:
        if not self.recorded:
            return fn

        def loss(module: nn.Module, packed: Any) -> Tensor:
            batch, index = packed
            rows = torch.tensor(index.tolist(), dtype=torch.long)
            with _Draws(list(self.recorded), rows):
                return fn(module, batch)

        return loss

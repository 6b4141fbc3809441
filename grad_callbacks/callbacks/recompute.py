"""Recomputing a LightningModule's loss from a callback without disturbing the run.

Calling ``training_step`` (or ``forward``) again from a callback has side effects (see the facts
file): ``self.log`` overwrites the user's logged values, dropout consumes random numbers,
BatchNorm updates its running statistics, torchmetrics objects accumulate, and in manual
optimization ``training_step`` even steps the optimizers. :func:`isolated` undoes or prevents
all of them:

* ``self.log`` / ``self.log_dict`` are muted (instance attributes shadowing the methods, removed
  afterwards); with ``trainer`` given, ``manual_backward``, the optimizer toggles and
  ``clip_gradients`` do nothing and ``optimizers()`` / ``lr_schedulers()`` return stand-ins whose
  ``step`` and ``zero_grad`` do nothing;
* the torch (CPU and CUDA), Python and NumPy random number generators are forked, and the torch
  ones can be set to a state captured earlier with :func:`capture_rng` (so the recomputation
  draws the same dropout masks as the step it reproduces);
* every buffer is put back (:func:`~grad_callbacks.core.state.restored_state`), and the state of
  every torchmetrics ``Metric`` submodule is restored;
* ``torch.compile``d code (a compiled submodule, or a LightningModule passed to ``fit`` compiled,
  whose ``training_step`` Lightning then runs compiled) runs eagerly
  (:func:`~grad_callbacks.core.per_sample.run_eagerly`): the recomputation never recompiles,
  replaces or warms up the training graph.

Python attributes the user's ``training_step`` changes by itself (a counter, say) cannot be
restored in general: keep ``training_step`` free of such side effects. (A ``per_sample_loss``
spares the per-sample passes, but the batch gradient and the ``grad-mismatch`` replay still run
``training_step``.)

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with isolated(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> int(bn.num_batches_tracked)
    0
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grad_callbacks.core.per_sample import run_eagerly
from grad_callbacks.core.state import restored_state

_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache", "_update_called")


def training_step_compiled(module: nn.Module) -> bool:
    """Whether ``module.training_step`` runs under ``torch.compile``: the LightningModule was
    passed to ``fit`` compiled (Lightning's ``from_compiled`` wraps its step methods), or the
    user wrapped ``training_step`` with ``torch.compile`` by hand.

    Example:
        >>> training_step_compiled(nn.Linear(2, 2))
        False
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    step = module.__dict__.get("training_step")
    return step is not None and hasattr(step, "_torchdynamo_orig_callable")


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, where CUDA is initialised, every CUDA device's."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] = ()


def capture_rng() -> RngState:
    """The current torch generator states (host copies; no device synchronisation)."""
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    return RngState(cpu=torch.get_rng_state(), cuda=cuda)


def _noop(*args: Any, **kwargs: Any) -> None:
    """Stands in for a LightningModule method during a recomputation."""


@contextmanager
def _noop_context(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


def _one_or_list(items: list[Any]) -> Any:
    if not items:
        return None
    return items[0] if len(items) == 1 else items


class _StubOptimizer:
    """Stands in for an optimizer during a recomputation: reads go to the real one, steps and
    ``zero_grad`` do nothing (a closure passed to ``step`` is still called)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    @contextmanager
    def toggle_model(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def __getattr__(self, name: str) -> Any:
        if name == "_real":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._real, name)


class _StubScheduler:
    def __init__(self, real: Any) -> None:
        self._real = real

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name == "_real":
            raise AttributeError(name)
        return getattr(self._real, name)


def _stand_ins(trainer: Any | None) -> dict[str, Any]:
    stubs: dict[str, Any] = {"log": _noop, "log_dict": _noop}
    if trainer is not None:
        optimizers = [_StubOptimizer(o) for o in trainer.optimizers]
        schedulers = [_StubScheduler(c.scheduler) for c in trainer.lr_scheduler_configs]
        stubs.update(
            manual_backward=_noop,
            toggle_optimizer=_noop,
            untoggle_optimizer=_noop,
            toggled_optimizer=_noop_context,
            clip_gradients=_noop,
            optimizers=lambda use_pl_optimizer=True: _one_or_list(optimizers),
            lr_schedulers=lambda: _one_or_list(schedulers),
        )
    return stubs


@contextmanager
def stood_in(module: nn.Module, trainer: Any | None = None) -> Iterator[None]:
    """Mute ``self.log`` / ``self.log_dict`` (and, with ``trainer``, the optimizer methods).

    Any instance attribute of the same name that existed before is put back afterwards.
    """
    stubs = _stand_ins(trainer)
    own = module.__dict__
    saved = {k: own[k] for k in stubs if k in own}
    own.update(stubs)
    try:
        yield
    finally:
        for k in stubs:
            own.pop(k, None)
        own.update(saved)


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy_state(v) for v in value]
    return copy.copy(value)


@contextmanager
def _restored_metrics(module: nn.Module) -> Iterator[None]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        yield
        return
    saved = [
        (
            m,
            {
                k: _copy_state(getattr(m, k))
                for k in (*m._defaults, *_METRIC_ATTRS)
                if k in vars(m)  # states and counters; not read-only properties
            },
        )
        for m in module.modules()
        if isinstance(m, Metric)
    ]
    try:
        yield
    finally:
        for metric, state in saved:
            for k, v in state.items():
                setattr(metric, k, v)


@contextmanager
def _forked_host_rng() -> Iterator[None]:
    py_state = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np, np_state = None, None
    try:
        yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@contextmanager
def isolated(
    module: nn.Module, rng_state: RngState | None = None, trainer: Any | None = None
) -> Iterator[None]:
    """Run the block with the module's logging muted and its state restored afterwards.

    Args:
        module: the LightningModule (or any module) whose state must not change.
        rng_state: when given, the torch generators are set to it inside the block (they are
            restored to their state before the block either way).
        trainer: when given, the optimizer-facing methods are stood in for too (needed to run
            a manual-optimization ``training_step`` again).
    """
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_in_use else []
    with ExitStack() as stack:
        stack.enter_context(run_eagerly())
        stack.enter_context(restored_state(module))
        stack.enter_context(_restored_metrics(module))
        stack.enter_context(stood_in(module, trainer))
        stack.enter_context(_forked_host_rng())
        stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
        if rng_state is not None:
            torch.set_rng_state(rng_state.cpu)
            if rng_state.cuda:
                torch.cuda.set_rng_state_all(list(rng_state.cuda))
        yield

"""Recomputing a LightningModule's loss from a callback without disturbing the run.

Calling ``training_step`` again from a callback has side effects (see the facts file): ``self.log``
overwrites the user's logged values, dropout consumes random numbers, BatchNorm updates its
running statistics, torchmetrics objects accumulate. :func:`isolated` undoes or prevents all of
them:

* ``self.log`` / ``self.log_dict`` are muted (instance attributes shadowing the methods, removed
  afterwards);
* the CPU and CUDA random number generators are forked, and can be set to a state captured
  earlier with :func:`capture_rng` (so the recomputation draws the same dropout masks as the
  step it reproduces);
* every buffer is snapshotted and copied back, and the state of every torchmetrics ``Metric``
  submodule is restored.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, where CUDA is initialised, every CUDA device's."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] = ()


def capture_rng() -> RngState:
    """The current random number generator states (host copies; no device synchronisation)."""
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    return RngState(cpu=torch.get_rng_state(), cuda=cuda)


def _metric_modules(module: nn.Module) -> list[Any]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    return [m for m in module.modules() if isinstance(m, Metric)]


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy_state(v) for v in value]
    return copy.copy(value)


_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache")


@contextmanager
def isolated(module: nn.Module, rng_state: RngState | None = None) -> Iterator[None]:
    """Run the block with the module's logging muted and its state restored afterwards.

    Args:
        module: the LightningModule (or any module) whose state must not change.
        rng_state: when given, the generators are set to it inside the block (they are restored
            to their state before the block either way).
    """
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    metrics = [
        (
            m,
            {name: _copy_state(getattr(m, name)) for name in m._defaults},
            {a: copy.copy(getattr(m, a, None)) for a in _METRIC_ATTRS},
        )
        for m in _metric_modules(module)
    ]
    muted = [name for name in ("log", "log_dict") if callable(getattr(module, name, None))]
    shadowed = {name: module.__dict__[name] for name in muted if name in module.__dict__}
    for name in muted:
        setattr(module, name, _muted)
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_in_use else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            if rng_state is not None:
                torch.set_rng_state(rng_state.cpu)
                if rng_state.cuda:
                    torch.cuda.set_rng_state_all(list(rng_state.cuda))
            yield
    finally:
        for name in muted:
            module.__dict__.pop(name, None)
        module.__dict__.update(shadowed)
        with torch.no_grad():
            for live, saved in buffers:
                if live.shape == saved.shape:
                    live.copy_(saved)
        for metric, states, attrs in metrics:
            for name, value in states.items():
                setattr(metric, name, value)
            for name, value in attrs.items():
                setattr(metric, name, value)


def _muted(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` during a recomputation."""

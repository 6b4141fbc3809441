"""Recomputing a LightningModule's loss from a callback without disturbing the run.

Calling ``training_step`` (or ``forward``) again from a callback has side effects (see the facts
file): ``self.log`` overwrites the user's logged values, dropout consumes random numbers,
BatchNorm updates its running statistics, torchmetrics objects accumulate, and in manual
optimization ``training_step`` even steps the optimizers. :func:`isolated` undoes or prevents
all of them:

* ``self.log`` / ``self.log_dict`` / ``self.print`` are muted (instance attributes shadowing
  the methods, removed afterwards);
* with a trainer (the one given, else the one the module is attached to), nothing is stepped or
  cleared: ``manual_backward``, the module's ``zero_grad``, the optimizer toggles and
  ``clip_gradients`` do nothing, ``optimizers()`` / ``lr_schedulers()`` return stand-ins whose
  ``step`` and ``zero_grad`` do nothing, and the real objects, however the step reaches them
  (``self.trainer.optimizers[i]``, the ``LightningOptimizer`` wrappers in
  ``trainer.strategy._lightning_optimizers``, ``self.trainer.lr_scheduler_configs[i].scheduler``,
  an optimizer kept in an attribute), get the same inert ``step`` / ``zero_grad`` as instance
  attributes, their own ones put back exactly afterwards; values written into the optimizers'
  ``param_groups`` (a hand-made learning-rate schedule) are put back too
  (:mod:`~grad_callbacks.callbacks.stand_ins`);
* a raw ``loss.backward()`` (or ``torch.autograd.backward``) in the block never reaches the live
  parameters: it accumulates only into the other leaves of its graph (a tensor the step made
  itself, the detached copies a check differentiates), and does nothing when the live parameters
  are its only leaves; other threads are not affected
  (:mod:`~grad_callbacks.callbacks.backward_guard`);
* the torch (CPU and CUDA), Python and NumPy random number generators are forked, and the torch
  ones can be set to a state captured earlier with :func:`capture_rng` (so the recomputation
  draws the same dropout masks as the step it reproduces);
* every buffer is put back (:func:`~grad_callbacks.core.state.restored_state`), and the state of
  every torchmetrics ``Metric`` submodule is restored;
* ``torch.compile``d code (a compiled submodule, or a LightningModule passed to ``fit`` compiled,
  whose ``training_step`` Lightning then runs compiled) runs eagerly
  (:func:`~grad_callbacks.core.per_sample.run_eagerly`): the recomputation never recompiles,
  replaces or warms up the training graph.

* the module's Python state is put back
  (:class:`~grad_callbacks.core.python_state.PythonState`): attributes that ``training_step``
  rebinds, creates or deletes on the module and its submodules (a carried hidden state, a
  counter, a cache, one created on the instance over a class attribute), attributes of the
  user's own module classes, of the objects of the user's own classes it holds
  (``self.tracker``), the globals and closure cells of ``training_step`` and
  ``forward``; plain lists, dicts, sets and deques they hold, and those held inside these or
  a tuple (two levels: ``self.logs["train"].append(x)``), are put back in place (their items
  are copied before and written back only when they changed), plain tensors they hold (also in
  a tuple, list or dict) are put back when written in place (their version counter moved);
* files the block opens for writing with ``open()`` are in-memory files whose contents are
  dropped (:mod:`~grad_callbacks.callbacks.file_guard`); one opened for reading and writing is
  opened as asked and reported as a change that could not be undone;
* what the block prints is swallowed: ``sys.stdout`` / ``sys.stderr`` are redirected, Python
  ``logging`` is disabled and warnings are ignored for the block (in every thread: the block
  is short);
* with ``state=`` (a :class:`~grad_callbacks.core.python_state.PythonState` captured before
  the real step), the block starts from that state (a faithful replay of a step that carries
  state), and the state at entry is put back afterwards.

What is not undone: effects outside the module and the functions' own globals (a file written
other than through ``open()``, a socket, another module's global, an object of a library class
mutated inside, a container nested deeper than two levels), which :class:`Recomputations`
counts runs of so that the report can say how many there were. Changes the picture saw but could
not undo (a container too large to copy resized, a large tensor written in place, a file opened
for reading and writing) are returned in :attr:`Recomputations.lost`;
the checks then report ``check-skipped`` naming them and stop recomputing. Nor are writes to
``.grad`` that bypass autograd and the optimizers (``torch.nn.utils.clip_grad_norm_`` called
directly instead of ``self.clip_gradients``, ``p.grad.zero_()``, a submodule's ``zero_grad()``)
or steps through a bound method kept from before (``self.step = opt.step``) intercepted: the
recomputation would run them on the live gradients and optimizers.
(A ``per_sample_loss`` spares the per-sample passes, but the batch gradient and the
``grad-mismatch`` replay still run ``training_step``.)

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
import io
import logging
import random
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from grad_callbacks.callbacks.backward_guard import _live_grads_guarded
from grad_callbacks.callbacks.file_guard import files_guarded
from grad_callbacks.callbacks.stand_ins import ManualSteps, stood_in
from grad_callbacks.core.isolation import forked_host_rng, numpy_random
from grad_callbacks.core.per_sample import run_eagerly
from grad_callbacks.core.python_state import PythonState
from grad_callbacks.core.state import BufferValues, restored_state

# ManualSteps, stood_in and _recording_backward are used from here by the per-sample check.
__all__ = [
    "ManualSteps",
    "Recomputations",
    "RngState",
    "capture_rng",
    "capture_state",
    "isolated",
    "kept_python_state",
    "stood_in",
    "training_step_compiled",
]

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
    """Every random stream a training step may draw from: torch's CPU generator and, where CUDA
    is initialised, every CUDA device's; Python's ``random`` and NumPy's global generator."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] = ()
    python: Any = None  # random.getstate()
    numpy: Any = None  # numpy.random.get_state(), None without NumPy

    def apply(self) -> None:
        """Set every stream to this state."""
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(list(self.cuda))
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            numpy_random().set_state(self.numpy)


def capture_rng() -> RngState:
    """The current states of every stream (host copies; no device synchronisation)."""
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    np_random = numpy_random()
    return RngState(
        cpu=torch.get_rng_state(),
        cuda=cuda,
        python=random.getstate(),
        numpy=np_random.get_state() if np_random is not None else None,
    )



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


@dataclass
class Recomputations:
    """A check's count of the times it ran the user's code again (for its report), and the
    changes they made that could not be undone.

    Example:
        >>> record = Recomputations()
        >>> with isolated(nn.Linear(2, 2), record=record):
        ...     pass
        >>> record.count, record.lost
        (1, [])
    """

    count: int = 0
    lost: list[str] = field(default_factory=list)


def step_functions(module: nn.Module) -> list[Any]:
    """The functions whose globals and closures a recomputation watches."""
    return [f for f in (getattr(module, n, None) for n in ("training_step", "forward")) if f]


def capture_state(module: nn.Module) -> PythonState:
    """The module's Python state now (see :class:`PythonState`), e.g. before a real step."""
    return PythonState.capture(module, step_functions(module))


@contextmanager
def kept_python_state(module: nn.Module, record: Recomputations | None = None) -> Iterator[None]:
    """Put the module's Python state back after the block (see :class:`PythonState`): for the
    checks that call the module's ``forward`` outside a recomputation of ``training_step``.

    What could not be put back (a container too large to copy resized, a large tensor written
    in place) is added to ``record.lost`` (the block is not counted as a recomputation), as
    :func:`isolated` does: the check then reports ``check-skipped`` naming it.

    Example:
        >>> class Cache(nn.Linear):
        ...     def forward(self, x):
        ...         self.seen.extend(range(2))
        ...         return super().forward(x)
        >>> layer, record = Cache(2, 2), Recomputations()
        >>> layer.seen = list(range(20_000))  # too large to copy
        >>> with kept_python_state(layer, record):
        ...     _ = layer(torch.ones(1, 2))
        >>> record.lost, record.count
        (['self.seen (resized, too large to copy)'], 0)
    """
    state = capture_state(module)
    lost: list[str] = []
    try:
        with files_guarded(lost):
            yield
    finally:
        lost += state.restore()
        if record is not None:
            record.lost.extend(x for x in lost if x not in record.lost)


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


@contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what the block prints, logs and warns."""
    previous = logging.root.manager.disable
    sink = _Discard()
    logging.disable(logging.CRITICAL)
    try:
        with redirect_stdout(sink), redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextmanager
def _python_state_kept(
    module: nn.Module, start: PythonState | None, record: Recomputations | None
) -> Iterator[None]:
    entry = capture_state(module)
    lost: list[str] = []
    try:
        if start is not None:
            lost += start.restore()
        yield
    finally:
        lost += entry.restore()
        if record is not None:
            record.lost.extend(x for x in lost if x not in record.lost)


@contextmanager
def isolated(
    module: nn.Module,
    rng_state: RngState | None = None,
    trainer: Any | None = None,
    *,
    state: PythonState | None = None,
    buffers: BufferValues | None = None,
    record: Recomputations | None = None,
    manual: ManualSteps | None = None,
) -> Iterator[None]:
    """Run the block with the module's logging muted and its state restored afterwards.

    Args:
        module: the LightningModule (or any module) whose state must not change.
        rng_state: when given, every random stream (torch's, Python's ``random``, NumPy's) is
            set to it inside the block (they are restored to their state before the block
            either way).
        trainer: whose optimizers and schedulers the block must not step or clear (needed to run
            a manual-optimization ``training_step`` again); by default the trainer the module is
            attached to, if any.
        state: the module's Python state to start the block from (captured with
            :func:`capture_state` before the real step); the state at entry is put back either
            way.
        buffers: the buffer values to start the block from (taken before the real step: a
            forward that updates buffers its output depends on, as ``spectral_norm`` does, ran
            since); the values at entry are put back either way.
        record: counts the block, and receives the changes that could not be undone.
        manual: records the losses handed to ``manual_backward`` (or a raw
            ``loss.backward()``) and the optimizers' steps, instead of dropping them.
    """
    if trainer is None:
        trainer = getattr(module, "_trainer", None)
    if record is not None:
        record.count += 1
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_in_use else []
    with ExitStack() as stack:
        stack.enter_context(_python_state_kept(module, state, record))
        stack.enter_context(_quiet())
        stack.enter_context(run_eagerly())
        stack.enter_context(restored_state(module))
        stack.enter_context(_restored_metrics(module))
        stack.enter_context(stood_in(module, trainer, manual))
        stack.enter_context(_live_grads_guarded(module, trainer, manual))
        stack.enter_context(files_guarded(record.lost if record is not None else []))
        stack.enter_context(forked_host_rng())
        stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
        if rng_state is not None:
            rng_state.apply()
        if buffers is not None:
            buffers.apply()
        yield

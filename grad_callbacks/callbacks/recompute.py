"""Recomputing a LightningModule's loss from a callback without disturbing the run.

Calling ``training_step`` (or ``forward``) again from a callback has side effects (see the facts
file): ``self.log`` overwrites the user's logged values, dropout consumes random numbers,
BatchNorm updates its running statistics, torchmetrics objects accumulate, and in manual
optimization ``training_step`` even steps the optimizers. :func:`isolated` undoes or prevents
all of them:

* ``self.log`` / ``self.log_dict`` are muted (instance attributes shadowing the methods, removed
  afterwards);
* with a trainer (the one given, else the one the module is attached to), nothing is stepped or
  cleared: ``manual_backward``, the module's ``zero_grad``, the optimizer toggles and
  ``clip_gradients`` do nothing, ``optimizers()`` / ``lr_schedulers()`` return stand-ins whose
  ``step`` and ``zero_grad`` do nothing, and the real objects, however the step reaches them
  (``self.trainer.optimizers[i]``, the ``LightningOptimizer`` wrappers in
  ``trainer.strategy._lightning_optimizers``, ``self.trainer.lr_scheduler_configs[i].scheduler``,
  an optimizer kept in an attribute), get the same inert ``step`` / ``zero_grad`` as instance
  attributes, their own ones put back exactly afterwards; values written into the optimizers'
  ``param_groups`` (a hand-made learning-rate schedule) are put back too;
* a raw ``loss.backward()`` (or ``torch.autograd.backward``) in the block never reaches the live
  parameters: it accumulates only into the other leaves of its graph (a tensor the step made
  itself, the detached copies a check differentiates), and does nothing when the live parameters
  are its only leaves; other threads are not affected;
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
  user's own module classes, the globals and closure cells of ``training_step`` and
  ``forward``; plain lists, dicts, sets and deques they hold are put back in place (shallow,
  one level: their items are copied before and written back only when they changed), plain
  tensors they hold are put back when written in place (their version counter moved);
* what the block prints is swallowed: ``sys.stdout`` / ``sys.stderr`` are redirected, Python
  ``logging`` is disabled and warnings are ignored for the block (in every thread: the block
  is short);
* with ``state=`` (a :class:`~grad_callbacks.core.python_state.PythonState` captured before
  the real step), the block starts from that state (a faithful replay of a step that carries
  state), and the state at entry is put back afterwards.

What is not undone: effects outside the module and the functions' own globals (a file written,
a socket, another module's global, an object of another class mutated inside, a container
nested deeper than one level), which :class:`Recomputations` counts runs of so that the report
can say how many there were. Changes the picture saw but could not undo (a container too large
to copy resized, a large tensor written in place) are returned in :attr:`Recomputations.lost`;
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
import functools
import inspect
import io
import logging
import random
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from grad_callbacks.core.per_sample import run_eagerly
from grad_callbacks.core.python_state import PythonState
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


def _raw_optimizer(opt: Any) -> Any:
    """The torch optimizer behind a stand-in or a ``LightningOptimizer``."""
    opt = opt.__dict__.get("_real", opt) if hasattr(opt, "__dict__") else opt
    return getattr(opt, "_optimizer", opt)


class ManualSteps:
    """What a recomputed manual-optimization ``training_step`` does with its optimizers: the
    losses it hands to ``manual_backward`` (or to a raw ``loss.backward()``), and each
    optimizer's ``step``, ``zero_grad`` and toggling, in order. Pass it to :func:`isolated`.

    :meth:`steps` turns the events into the losses each optimizer step applies: those
    backwarded since that optimizer's last ``zero_grad`` (or the start of the step), leaving
    out those backwarded while another optimizer was toggled (its parameters alone required
    gradients then).

    Args:
        optimizers: the trainer's optimizers, in order (their index names them).
        on_step: called with the number of steps so far after each step.
    """

    def __init__(
        self, optimizers: Iterable[Any], on_step: Callable[[int], None] | None = None
    ) -> None:
        self._index = {id(_raw_optimizer(o)): i for i, o in enumerate(optimizers)}
        self.events: list[tuple[str, int | None, Any]] = []
        self._toggled: int | None = None
        self._on_step = on_step
        self._steps = 0

    def index(self, opt: Any) -> int | None:
        return self._index.get(id(_raw_optimizer(opt)))

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        self.events.append(("backward", self._toggled, loss))

    def step(self, opt: Any) -> None:
        self.events.append(("step", self.index(opt), None))
        self._steps += 1
        if self._on_step is not None:
            self._on_step(self._steps)

    def zero_grad(self, opt: Any) -> None:
        self.events.append(("zero_grad", self.index(opt), None))

    def toggle(self, opt: Any) -> None:
        self._toggled = self.index(opt)

    def untoggle(self, opt: Any = None) -> None:
        self._toggled = None

    @contextmanager
    def toggled(self, opt: Any) -> Iterator[None]:
        self.toggle(opt)
        try:
            yield
        finally:
            self.untoggle()

    def cleared(self) -> list[bool]:
        """Per optimizer step, in order: whether that optimizer's ``zero_grad`` ran before it
        in the step (if not, the gradients it held when the step began are applied too)."""
        seen: set[int | None] = set()
        out: list[bool] = []
        for kind, i, _ in self.events:
            if kind == "zero_grad":
                seen.add(i)
            elif kind == "step":
                out.append(i in seen)
        return out

    def steps(self) -> list[tuple[int | None, list[Any]]]:
        """Per optimizer step, in order: the optimizer's index and the losses it applies."""
        pending: dict[int | None, list[Any]] = {i: [] for i in self._index.values()}
        out: list[tuple[int | None, list[Any]]] = []
        for kind, i, loss in self.events:
            if kind == "backward":
                for j in pending:
                    if i is None or i == j:
                        pending[j].append(loss)
            elif kind == "zero_grad":
                pending[i] = []
            elif kind == "step":
                out.append((i, list(pending.get(i, []))))
        return out


class _StubOptimizer:
    """Stands in for an optimizer during a recomputation: reads go to the real one, steps and
    ``zero_grad`` do nothing (a closure passed to ``step`` is still called)."""

    def __init__(self, real: Any, manual: ManualSteps | None = None) -> None:
        self._real = real
        self._manual = manual

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        if self._manual is not None:
            self._manual.step(self._real)
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._manual is not None:
            self._manual.zero_grad(self._real)

    @contextmanager
    def toggle_model(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def __getattr__(self, name: str) -> Any:
        if name in ("_real", "_manual"):  # not set yet (copy, pickle): no recursion
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


def _stand_ins(trainer: Any | None, manual: ManualSteps | None = None) -> dict[str, Any]:
    stubs: dict[str, Any] = {"log": _noop, "log_dict": _noop}
    if trainer is not None:
        optimizers = [_StubOptimizer(o, manual) for o in trainer.optimizers]
        schedulers = [_StubScheduler(c.scheduler) for c in trainer.lr_scheduler_configs]
        stubs.update(
            manual_backward=manual.backward if manual is not None else _noop,
            zero_grad=_noop,
            toggle_optimizer=manual.toggle if manual is not None else _noop,
            untoggle_optimizer=manual.untoggle if manual is not None else _noop,
            toggled_optimizer=manual.toggled if manual is not None else _noop_context,
            clip_gradients=_noop,
            optimizers=lambda use_pl_optimizer=True: _one_or_list(optimizers),
            lr_schedulers=lambda: _one_or_list(schedulers),
        )
    return stubs


def _inert_step(closure: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Stands in for a real optimizer's or scheduler's ``step``: calls a closure, steps nothing.

    A scheduler's ``step(metrics)`` passes a number, not a closure: it is ignored.
    """
    return closure() if callable(closure) else None


@contextmanager
def _shadowed(objects: Iterable[Any], stubs: dict[str, Any]) -> Iterator[None]:
    """Instance attributes ``stubs`` on every object, each object's own ones put back after.

    The instance dictionary is written directly (no ``__setattr__``), and an attribute the object
    had of its own (the ``step`` that an ``LRScheduler`` wraps onto its optimizer) is put back as
    the very same object. Objects without an instance dictionary are left alone.
    """
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = []
    seen: set[int] = set()
    try:
        for obj in objects:
            own = getattr(obj, "__dict__", None)
            if id(obj) in seen or not isinstance(own, dict):
                continue
            seen.add(id(obj))
            saved.append((own, {k: own[k] for k in stubs if k in own}))
            own.update(stubs)
        yield
    finally:
        for own, before in saved:
            for k in stubs:
                own.pop(k, None)
            own.update(before)


def _same_items(a: Iterable[Any], b: Iterable[Any]) -> bool:
    """Whether two collections hold the very same objects in the same order."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


@contextmanager
def _restored_param_groups(optimizers: Iterable[Any]) -> Iterator[None]:
    """Put back every value of every param group (``lr``, ``momentum``, ...) that the block
    replaced, and the groups themselves; groups left as they were are not written to."""
    found = {id(o): getattr(o, "param_groups", None) for o in optimizers}
    saved = [
        (groups, list(groups), [dict(g) for g in groups])
        for groups in found.values()
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
    ]
    try:
        yield
    finally:
        for groups, members, values in saved:
            if not _same_items(groups, members):
                groups[:] = members
            for group, before in zip(members, values, strict=True):
                keys_kept = group.keys() == before.keys()
                if not (keys_kept and _same_items(group.values(), before.values())):
                    group.clear()
                    group.update(before)


def _recording_stubs(manual: ManualSteps, opt: Any) -> dict[str, Any]:
    def step(closure: Any = None, *args: Any, **kwargs: Any) -> Any:
        manual.step(opt)
        return _inert_step(closure)

    def zero_grad(*args: Any, **kwargs: Any) -> None:
        manual.zero_grad(opt)

    return {"step": step, "zero_grad": zero_grad}


@contextmanager
def _inert_optimizers(trainer: Any, manual: ManualSteps | None = None) -> Iterator[None]:
    """The trainer's real optimizers, their ``LightningOptimizer`` wrappers and its schedulers
    step and clear nothing, however the block reaches them (with ``manual``, they record it)."""
    optimizers = list(getattr(trainer, "optimizers", None) or ())
    wrappers = list(getattr(getattr(trainer, "strategy", None), "_lightning_optimizers", ()))
    schedulers = [c.scheduler for c in getattr(trainer, "lr_scheduler_configs", None) or ()]
    raw = [getattr(o, "_optimizer", o) for o in optimizers + wrappers]
    with ExitStack() as stack:
        if manual is None:
            stack.enter_context(
                _shadowed([*optimizers, *wrappers, *raw], {"step": _inert_step, "zero_grad": _noop})
            )
        else:
            for opt in [*optimizers, *wrappers, *raw]:
                stack.enter_context(_shadowed([opt], _recording_stubs(manual, opt)))
        stack.enter_context(_shadowed(schedulers, {"step": _noop}))
        stack.enter_context(_restored_param_groups(raw))
        yield


@contextmanager
def stood_in(
    module: nn.Module, trainer: Any | None = None, manual: ManualSteps | None = None
) -> Iterator[None]:
    """Mute ``self.log`` / ``self.log_dict``; with ``trainer``, also every route to its
    optimizers and schedulers (the module's optimizer methods and the real objects), which
    ``manual`` records when given.

    Any instance attribute of the same name that existed before is put back afterwards.
    """
    with ExitStack() as stack:
        stack.enter_context(_shadowed([module], _stand_ins(trainer, manual)))
        if trainer is not None:
            stack.enter_context(_inert_optimizers(trainer, manual))
        yield


# ---------------------------------------------------------------- raw backward passes
_guard_local = threading.local()
_guard_lock = threading.Lock()
_guard_users = 0
_guard_saved: Any = None
_GradientEdge: Any = getattr(torch.autograd.graph, "GradientEdge", ())  # a NamedTuple


def _protected_now() -> set[int] | None:
    """The ids of the live leaves this thread's open :func:`isolated` blocks protect."""
    stack: list[set[int]] | None = getattr(_guard_local, "stack", None)
    if not stack:
        return None
    return set().union(*stack)


def _as_list(tensors: Any) -> list[Any]:
    if tensors is None:
        return []
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, dict):
        return list(tensors.values())
    if isinstance(tensors, _GradientEdge):
        return [tensors]
    return list(tensors)


def _graph_leaves(roots: list[Any]) -> list[torch.Tensor]:
    """The leaf tensors a backward pass from ``roots`` (tensors or gradient edges) reaches."""
    leaves: list[torch.Tensor] = []
    nodes: list[Any] = []
    for root in roots:
        if isinstance(root, torch.Tensor):
            if root.grad_fn is None:
                if root.requires_grad:
                    leaves.append(root)
                continue
            nodes.append(root.grad_fn)
        else:
            nodes.append(root.node)
    seen: dict[int, Any] = {}  # holds the nodes, so that their ids stay unique
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _edge_variable(item: Any) -> Any:
    return item if isinstance(item, torch.Tensor) else getattr(item.node, "variable", None)


def _guarded_backward(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def backward(*args: Any, **kwargs: Any) -> Any:
        protected = _protected_now()
        if protected is None:  # another thread, or no isolated block open
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        recorders: list[ManualSteps | None] = getattr(_guard_local, "manual", [])
        if recorders and recorders[-1] is not None:
            tensors = bound.arguments.get("tensors")
            recorders[-1].backward(tensors)  # a raw loss.backward(): its loss, kept aside
            return None
        # Read once: the arguments may be generators, which the call below must still get.
        for name in ("tensors", "grad_tensors", "inputs"):
            value = bound.arguments.get(name)
            if value is not None and not isinstance(value, torch.Tensor):
                bound.arguments[name] = _as_list(value)
        given = _as_list(bound.arguments.get("inputs"))
        candidates = given or _graph_leaves(_as_list(bound.arguments["tensors"]))
        allowed = [c for c in candidates if id(_edge_variable(c)) not in protected]
        if not allowed and candidates:
            return None
        if len(allowed) < len(candidates):
            bound.arguments["inputs"] = allowed
        # nothing live reached: the call as made, errors included
        return original(*bound.args, **bound.kwargs)

    return backward


@contextmanager
def _recording_backward(manual: ManualSteps | None) -> Iterator[None]:
    """Inside an :func:`isolated` block, a raw backward pass in this thread only hands its
    loss to ``manual`` (None: back to the enclosing block's behaviour)."""
    recorders: list[ManualSteps | None] | None = getattr(_guard_local, "manual", None)
    if recorders is None:
        recorders = _guard_local.manual = []
    recorders.append(manual)
    try:
        yield
    finally:
        recorders.pop()


@contextmanager
def _live_grads_guarded(
    module: nn.Module, trainer: Any | None, manual: ManualSteps | None = None
) -> Iterator[None]:
    """A backward pass run in this thread during the block leaves out the module's parameters
    and the trainer's optimizers' parameters: their ``.grad`` and hooks are never reached.

    ``Tensor.backward`` calls ``torch.autograd.backward`` through the module attribute, so
    replacing that attribute for the block covers both.
    """
    global _guard_users, _guard_saved
    live = {id(p) for p in module.parameters()}
    for opt in getattr(trainer, "optimizers", None) or ():
        for group in getattr(opt, "param_groups", None) or ():
            live.update(id(p) for p in group.get("params", ()))
    with _guard_lock:
        if _guard_users == 0:
            _guard_saved = torch.autograd.backward
            torch.autograd.backward = _guarded_backward(_guard_saved)
        _guard_users += 1
    stack: list[set[int]] | None = getattr(_guard_local, "stack", None)
    if stack is None:
        stack = _guard_local.stack = []
    stack.append(live)
    try:
        with _recording_backward(manual):
            yield
    finally:
        stack.pop()
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                torch.autograd.backward = _guard_saved
                _guard_saved = None


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
def kept_python_state(module: nn.Module) -> Iterator[None]:
    """Put the module's Python state back after the block (see :class:`PythonState`): for the
    checks that call the module's ``forward`` outside a recomputation of ``training_step``."""
    state = capture_state(module)
    try:
        yield
    finally:
        state.restore()


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
    record: Recomputations | None = None,
    manual: ManualSteps | None = None,
) -> Iterator[None]:
    """Run the block with the module's logging muted and its state restored afterwards.

    Args:
        module: the LightningModule (or any module) whose state must not change.
        rng_state: when given, the torch generators are set to it inside the block (they are
            restored to their state before the block either way).
        trainer: whose optimizers and schedulers the block must not step or clear (needed to run
            a manual-optimization ``training_step`` again); by default the trainer the module is
            attached to, if any.
        state: the module's Python state to start the block from (captured with
            :func:`capture_state` before the real step); the state at entry is put back either
            way.
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
        stack.enter_context(_forked_host_rng())
        stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
        if rng_state is not None:
            torch.set_rng_state(rng_state.cpu)
            if rng_state.cuda:
                torch.cuda.set_rng_state_all(list(rng_state.cuda))
        yield

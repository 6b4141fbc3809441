"""Stand-ins that make a recomputed ``training_step`` step and clear nothing, and the recorder of
what a manual-optimization ``training_step`` does with its optimizers.

Used by :func:`~grad_callbacks.callbacks.recompute.isolated`: ``self.log`` / ``self.log_dict``
are muted; with a trainer, ``manual_backward``, the module's ``zero_grad``, the optimizer toggles
and ``clip_gradients`` do nothing, ``optimizers()`` / ``lr_schedulers()`` return stand-ins, and
the real optimizers, their ``LightningOptimizer`` wrappers and the schedulers get inert ``step``
/ ``zero_grad`` instance attributes, put back exactly afterwards (with the values written into
``param_groups``). With a :class:`ManualSteps`, the same stand-ins record the losses and steps
instead of dropping them. Nothing here writes to a gradient or a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn


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
    backwarded since that optimizer's last ``zero_grad``, or that of an optimizer holding all
    its parameters (or the start of the step), leaving
    out those backwarded while another optimizer was toggled (its parameters alone required
    gradients then).

    Args:
        optimizers: the trainer's optimizers, in order (their index names them).
        on_step: called with the number of steps so far after each step.
    """

    def __init__(
        self, optimizers: Iterable[Any], on_step: Callable[[int], None] | None = None
    ) -> None:
        raws = [_raw_optimizer(o) for o in optimizers]
        self._index = {id(raw): i for i, raw in enumerate(raws)}
        params = [
            {id(p) for group in getattr(raw, "param_groups", []) for p in group["params"]}
            for raw in raws
        ]
        # i -> the optimizers whose parameters all belong to optimizer i too: i's zero_grad
        # clears their gradients (several optimizers over the same parameters, each stepping
        # and clearing in turn)
        self._clears = {
            i: {j for j, theirs in enumerate(params) if theirs and theirs <= mine}
            for i, mine in enumerate(params)
        }
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
                seen.update(self._clears.get(i, ()))  # type: ignore[arg-type]
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
                for j in self._clears.get(i, ()):  # type: ignore[arg-type]
                    pending[j] = []
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
    # self.print goes to the progress bar (tqdm.write / rich's console), past the redirected
    # sys.stdout of the recomputation's quiet block.
    stubs: dict[str, Any] = {"log": _noop, "log_dict": _noop, "print": _noop}
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
    """Mute ``self.log`` / ``self.log_dict`` / ``self.print``; with ``trainer``, also every
    route to its optimizers and schedulers (the module's optimizer methods and the real
    objects), which ``manual`` records when given.

    Any instance attribute of the same name that existed before is put back afterwards.
    """
    with ExitStack() as stack:
        stack.enter_context(_shadowed([module], _stand_ins(trainer, manual)))
        if trainer is not None:
            stack.enter_context(_inert_optimizers(trainer, manual))
        yield

"""Record the calls a training step makes into a model, to test them afterwards.

:class:`CallRecorder` watches a root module (the LightningModule) and its direct children and
keeps, for each of them, the first call made from outside any other watched call: the root's
``forward`` when the step calls ``self(...)``; a child (``self.generator(z)``,
``self.model(input, hidden)``) when the step calls it itself. The arguments are kept as detached
copies (nothing that requires grad, no autograd graph kept alive); nothing else is kept.

It only observes: the children get forward pre-hooks (``with_kwargs=True``) that return nothing
and change no input; the root gets a wrapper in its instance's ``forward`` (so that a step calling
``self.forward(x)`` is seen too); a module compiled with ``Module.compile()`` gets a wrapper
around its compiled call instead, and its children are not watched (a hook inside the compiled
region would make dynamo recompile it). :meth:`CallRecorder.stop` removes them all and puts back
any instance attribute they shadowed.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.enc, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.head(self.enc(x))
    >>> net = Net()
    >>> recorder = CallRecorder(net).start()
    >>> _ = net(torch.randn(3, 2)); _ = net.head(torch.randn(3, 2))  # a step
    >>> [(c.target, c.call.describe(c.target or "net")) for c in recorder.stop()]
    [('', 'net(x)'), ('head', 'head(input)')]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from grad_callbacks.core.batch_mixing.call import ModelCall, positional_names
from grad_callbacks.core.batch_mixing.leaves import _map


@dataclass
class RecordedCall:
    """A call the step made: into ``module``, named ``target`` under the root (``""``: the root
    itself)."""

    target: str
    module: nn.Module
    call: ModelCall


def _copy(obj: Any) -> Any:
    return _map(obj, lambda _, t: t.detach().clone(), "")


class CallRecorder:
    """Records the first outermost call of ``root`` and of each of its direct children.

    Args:
        root: the module whose calls to record.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.calls: list[RecordedCall] = []
        self._seen: set[str] = set()
        self._depth = 0
        self._undo: list[Callable[[], None]] = []

    def start(self) -> CallRecorder:
        watched = [("", self.root)]
        if self.root.__dict__.get("_compiled_call_impl") is None:
            # Not under a root compiled by Module.compile(): hooks on its children would be
            # traced (and recompiled) with it.
            watched += list(self.root.named_children())
        for name, module in watched:
            compiled = module.__dict__.get("_compiled_call_impl")
            if compiled is not None:
                self._wrap(name, module, "_compiled_call_impl", compiled, module.forward)
            elif module is self.root:
                # ``self.forward(x)`` as well as ``self(x)``: a wrapper in the instance's
                # ``forward`` (its own one, if any, is put back by stop()).
                self._wrap(name, module, "forward", module.forward, module.forward)
            else:
                pre = module.register_forward_pre_hook(_Hook(self, name), with_kwargs=True)
                post = module.register_forward_hook(_Hook(self, None), always_call=True)
                self._undo += [pre.remove, post.remove]
        return self

    def stop(self) -> list[RecordedCall]:
        """Remove the hooks and return the calls recorded (in the order they were made)."""
        while self._undo:
            self._undo.pop()()
        self._depth = 0
        return self.calls

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def _enter(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: Any, fn: Any = None
    ) -> None:
        if self._depth == 0 and name not in self._seen:
            self._seen.add(name)
            call = ModelCall(
                _copy(tuple(args)),
                _copy(dict(kwargs or {})),
                positional_names(fn if fn is not None else module.forward, len(args)),
            )
            self.calls.append(RecordedCall(name, module, call))
        self._depth += 1

    def _wrap(self, name: str, module: nn.Module, attr: str, inner: Any, fn: Any) -> None:
        had = attr in module.__dict__
        own = module.__dict__.get(attr)

        module.__dict__[attr] = _Recording(self, name, module, inner, fn)

        def undo() -> None:
            if had:
                module.__dict__[attr] = own
            else:
                module.__dict__.pop(attr, None)

        self._undo.append(undo)


class _Hook:
    """A forward pre-hook (``name``: records the call) or forward hook (``None``: the call
    ended). Copied or pickled with its module, it does nothing."""

    def __init__(self, recorder: CallRecorder, name: str | None) -> None:
        self.recorder = recorder
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], extra: Any) -> None:
        if self.name is not None:
            self.recorder._enter(self.name, module, args, extra)
        else:
            self.recorder._depth = max(0, self.recorder._depth - 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert

    def __reduce__(self) -> Any:
        return (_inert_hook, ())


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


def _inert_hook() -> Any:
    return _inert


class _Recording:
    """What a watched module's instance ``forward`` (or compiled call) is while recorded: records
    the call, then makes it. Copied or pickled, it is the call it wraps (a module deep-copied or
    saved in the middle of a step gets its own ``forward``, not a recorder)."""

    def __init__(
        self, recorder: CallRecorder, name: str, module: nn.Module, inner: Any, fn: Any
    ) -> None:
        self.recorder = recorder
        self.name = name
        self.module = module
        self.inner = inner
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.recorder._enter(self.name, self.module, args, kwargs, self.fn)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.recorder._depth = max(0, self.recorder._depth - 1)

    @property
    def __func__(self) -> Any:  # what tools that unwrap bound methods look for
        return getattr(self.inner, "__func__", self.inner)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.inner, memo)

    def __reduce__(self) -> Any:
        return (_identity, (self.inner,))


def _identity(value: Any) -> Any:
    return value

"""Raw backward passes inside a recomputation: a ``loss.backward()`` (or
``torch.autograd.backward``) run in an :func:`~grad_callbacks.callbacks.recompute.isolated` block
never reaches the live parameters.

``torch.autograd.backward`` is replaced, while at least one block is open in any thread, by a
wrapper that leaves out the leaves the current thread's open blocks protect (the module's and the
optimizers' parameters): the pass accumulates only into the other leaves of its graph, and does
nothing when the live parameters are its only leaves. Other threads call the original. Inside a
block that records a manual-optimization step
(:class:`~grad_callbacks.callbacks.stand_ins.ManualSteps`), the loss is handed to the recorder
instead.

The gradients the live parameters hold are kept apart as well (:func:`_held_grads_kept`): the
step's own code that edits them in place (``clip_grad_norm_`` before a manual ``opt.step()``)
edits copies.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.callbacks.stand_ins import ManualSteps

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
    params = _live_params(module, trainer)
    live = {id(p) for p in params}
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
        with _recording_backward(manual), _held_grads_kept(params):
            yield
    finally:
        stack.pop()
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                torch.autograd.backward = _guard_saved
                _guard_saved = None


def _live_params(module: nn.Module, trainer: Any | None) -> list[Tensor]:
    """The module's parameters and the trainer's optimizers' parameters, each once."""
    params = {id(p): p for p in module.parameters()}
    for opt in getattr(trainer, "optimizers", None) or ():
        for group in getattr(opt, "param_groups", None) or ():
            params.update((id(p), p) for p in group.get("params", ()))
    return list(params.values())


@contextmanager
def _held_grads_kept(params: list[Tensor]) -> Iterator[None]:
    """During the block each parameter's ``.grad`` is a copy; the original tensor (untouched)
    is put back after it. A recomputed manual step clips or rescales gradients in place
    (``clip_grad_norm_(self.parameters(), ...)``); the real ones carry over to the next step
    where ``zero_grad`` is not called."""
    held = [(p, p.grad) for p in params if p.grad is not None]
    for p, g in held:
        p.grad = g.detach().clone()
    try:
        yield
    finally:
        for p, g in held:
            p.grad = g

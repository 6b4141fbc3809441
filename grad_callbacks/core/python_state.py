"""The Python state a training step can change, captured and put back (pure Python and torch).

A recomputation of ``training_step`` runs the user's code again; whatever it rebinds or
mutates must look untouched afterwards. :class:`PythonState` is a shallow picture of:

* every submodule's instance attributes (``module.__dict__``, but the parameter, buffer and
  submodule tables, which :func:`~grad_callbacks.core.state.restored_state` and
  ``torch.func.functional_call`` look after): a rebound attribute (``self.hidden = ...``, a
  counter ``self.calls += 1``), one created on the instance (also one shadowing a class
  attribute) and one deleted are put back, as the very same objects;
* the attributes of the modules' own classes (``type(self).calls += 1``), for classes defined
  outside torch, Lightning and ``transformers``;
* the instance attributes of objects of the user's own classes (defined outside the standard
  library and installed packages) that the modules' attributes hold (``self.tracker.update()``
  rebinding ``self.tracker.calls``);
* the global namespace and closure cells of the functions named (``training_step``,
  ``forward``, also when wrapped in ``functools.partial`` to record calls):
  ``global calls; calls += 1``;
* two levels inside: a plain ``list``, ``dict``, ``set`` or ``deque`` held by any of the above
  (``self.history.append(x)``), or held by such a container or a tuple
  (``self.logs["train"].append(x)``), is copied (shallow, up to :data:`MAX_CONTAINER` items)
  and its contents put back *in place* when they changed, so references the user holds to it
  stay valid; a plain tensor held by an attribute, directly or in a tuple, list or dict (a
  carried hidden state), is cloned (up to :data:`MAX_TENSOR` elements, and :data:`MAX_CLONED`
  in all) and its values put back when it was written in place (its version counter moved).
  Containers of more than :data:`MAX_SCANNED` items are not looked inside.

What this cannot undo, it names (:meth:`PythonState.restore` returns the names): a container
larger than :data:`MAX_CONTAINER` whose length changed, a tensor larger than :data:`MAX_TENSOR`
(or beyond :data:`MAX_CLONED`) written in place. It never sees: objects of the standard
library's or installed packages' classes mutated inside, objects held by such objects,
containers nested deeper than two levels (or inside a container of more than
:data:`MAX_SCANNED` items), other modules' globals, files, sockets, other processes.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> net.calls, net.history = 0, []
    >>> state = PythonState.capture(net)
    >>> net.calls += 1; net.history.append("step"); net.created = True
    >>> state.restore()
    []
    >>> net.calls, net.history, hasattr(net, "created")
    (0, [], False)
"""

from __future__ import annotations

import collections
import functools
import sys
import types
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Containers up to this many items are copied and put back in place; larger ones are only
#: watched (a changed length is reported as an effect that could not be undone).
MAX_CONTAINER = 10_000
#: Plain tensor attributes up to this many elements are cloned; larger ones are only watched
#: (a write in place is reported).
MAX_TENSOR = 1 << 22
#: Elements cloned in all by one picture: tensors beyond it are only watched, like large ones (a
#: dict of a model's worth of tensors is not copied at every recomputation).
MAX_CLONED = 1 << 24
#: How deep inside an attribute's value containers and tensors are looked for: 2 is
#: ``self.logs["train"].append(x)`` (a list in a dict), ``self.hidden[0].add_(1)`` (a tensor in
#: a tuple).
MAX_DEPTH = 2
#: Containers of more items than this are not looked inside (their own items are still copied).
MAX_SCANNED = 1_000

# Module tables left to restored_state / functional_call.
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})
# Classes of these packages are not the user's: their attributes are not watched.
_LIBRARY_PREFIXES = (
    "torch", "lightning", "pytorch_lightning", "transformers", "builtins", "grad_callbacks"
)
_CONTAINERS = (list, dict, set, collections.deque)
#: Stands for an attribute that did not exist (see :meth:`PythonState.rebound`).
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
_MISSING = MISSING


@dataclass
class _Container:
    """A copy of a plain container's items (or only its length, when too large)."""

    obj: Any
    items: Any  # list / dict copy / None when too large
    length: int

    @classmethod
    def take(cls, obj: Any) -> _Container:
        n = len(obj)
        if n > MAX_CONTAINER:
            return cls(obj, None, n)
        return cls(obj, dict(obj) if isinstance(obj, dict) else list(obj), n)

    def changed(self) -> bool:
        obj, items = self.obj, self.items
        if len(obj) != self.length:
            return True
        if items is None:
            return False
        if isinstance(obj, dict):
            return obj.keys() != items.keys() or any(obj[k] is not v for k, v in items.items())
        if isinstance(obj, set):
            return any(x not in obj for x in items)
        return any(a is not b for a, b in zip(obj, items, strict=True))

    def put_back(self) -> bool:
        """Restore the items in place; False when they changed but were not copied."""
        if not self.changed():
            return True
        if self.items is None:
            return False
        obj = self.obj
        obj.clear()
        if isinstance(obj, dict):
            obj.update(self.items)
        elif isinstance(obj, set):
            obj.update(self.items)
        else:
            obj.extend(self.items)
        return True


@dataclass
class _TensorCopy:
    tensor: torch.Tensor
    version: int
    values: torch.Tensor | None  # None when too large to clone

    @classmethod
    def take(cls, t: torch.Tensor, budget: list[int]) -> _TensorCopy | None:
        """Watch ``t``; clone it when it is small enough and ``budget[0]`` (elements left to
        clone in this picture) allows, which it then lowers."""
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter
            return None
        n = t.numel()
        values = None
        if n <= MAX_TENSOR and n <= budget[0]:
            values = t.detach().clone()
            budget[0] -= n
        return cls(t, version, values)

    def put_back(self) -> bool:
        try:
            if self.tensor._version == self.version:
                return True
        except RuntimeError:
            return True
        if self.values is None:
            return False
        with torch.no_grad():
            self.tensor.data.copy_(self.values)
        return True


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)


@dataclass
class _Namespace:
    """One namespace (an instance ``__dict__``, a class, globals, a closure cell)."""

    name: str
    kind: str  # "instance", "class", "globals", "closure"
    values: dict[str, Any]
    write: Callable[[str, Any], None]
    delete: Callable[[str], None]
    read: Callable[[], MutableMapping[str, Any] | types.MappingProxyType[str, Any]]
    inner: list[tuple[str, _Container | _TensorCopy]] = field(default_factory=list)

    @classmethod
    def over(
        cls, name: str, kind: str, own: dict[str, Any], values: dict[str, Any] | None = None
    ) -> _Namespace:
        """A namespace that is a plain dict (an instance's ``__dict__``, a module's globals),
        watching ``values`` of it (default: all of it)."""
        return cls(
            name,
            kind,
            dict(own) if values is None else values,
            own.__setitem__,
            lambda k: own.pop(k, None),
            lambda: own,
        )


def _members(value: Any) -> list[tuple[Any, Any]]:
    """``(key, item)`` of a list, tuple, deque or dict; none of a set (what it holds is
    hashable: no plain container)."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple, collections.deque)):
        return list(enumerate(value))
    return []


def _watch_inner(
    name: str, value: Any, seen: set[int], budget: list[int], depth: int = 1
) -> list[tuple[str, Any]]:
    """Copies of the containers and tensors an attribute value holds, looked for up to
    :data:`MAX_DEPTH` levels in (``self.logs["train"]`` is the second level of ``self.logs``),
    inside containers of at most :data:`MAX_SCANNED` items."""
    if id(value) in seen:
        return []
    out: list[tuple[str, Any]] = []
    if type(value) in _CONTAINERS or isinstance(value, collections.OrderedDict):
        seen.add(id(value))
        copy = _Container.take(value)
        out.append((name, copy))
        inside = copy.items is not None
    elif _is_plain_tensor(value):
        taken = _TensorCopy.take(value, budget)
        if taken is not None:
            seen.add(id(value))
            out.append((name, taken))
        return out
    else:
        inside = type(value) is tuple  # immutable, but what it holds may be changed in place
    if inside and depth < MAX_DEPTH and len(value) <= MAX_SCANNED:
        for key, item in _members(value):
            if type(item) in _CONTAINERS or type(item) is tuple or _is_plain_tensor(item):
                out += _watch_inner(f"{name}[{key!r}]", item, seen, budget, depth + 1)
    return out


def _user_class(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return not module.split(".")[0].startswith(_LIBRARY_PREFIXES)


def _user_object(value: Any) -> bool:
    """Whether ``value`` is an object of a class from the user's own code (not the standard
    library, not an installed package), with an instance dictionary: ``self.tracker``."""
    if isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType, functools.partial)):
        return False
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return False
    if not isinstance(getattr(value, "__dict__", None), dict):
        return False
    name = getattr(type(value), "__module__", "") or ""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top.startswith(_LIBRARY_PREFIXES):
        return False
    path = str(getattr(sys.modules.get(name), "__file__", "") or "")
    return "site-packages" not in path and "dist-packages" not in path


class PythonState:
    """A shallow picture of a module's Python state; see the module documentation.

    Args:
        namespaces: built by :meth:`capture`.
    """

    def __init__(self, namespaces: list[_Namespace]) -> None:
        self._namespaces = namespaces

    @classmethod
    def capture(
        cls, module: nn.Module, functions: Iterable[Callable[..., Any]] = ()
    ) -> PythonState:
        """Take the picture: ``module`` and its submodules, their own classes, and the
        globals and closure cells of ``functions`` (bound methods are unwrapped)."""
        namespaces: list[_Namespace] = []
        seen: set[int] = set()
        classes: dict[int, type] = {}
        for prefix, sub in module.named_modules(remove_duplicate=True):
            own = sub.__dict__
            label = prefix or "self"
            values = {k: v for k, v in own.items() if k not in _MODULE_TABLES}
            namespaces.append(_Namespace.over(label, "instance", own, values))
            for klass in type(sub).__mro__:
                if _user_class(klass) and klass is not object:
                    classes.setdefault(id(klass), klass)
        objects: dict[int, Any] = {}
        for ns in list(namespaces):
            for key, value in ns.values.items():
                if id(value) not in objects and _user_object(value):
                    objects[id(value)] = value
                    namespaces.append(_Namespace.over(f"{ns.name}.{key}", "object", value.__dict__))
        for klass in classes.values():
            namespaces.append(
                _Namespace(
                    klass.__qualname__,
                    "class",
                    dict(vars(klass)),
                    lambda k, v, c=klass: setattr(c, k, v),
                    lambda k, c=klass: delattr(c, k) if k in vars(c) else None,
                    lambda c=klass: vars(c),
                )
            )
        seen_globals: set[int] = set()
        for fn in functions:
            while isinstance(fn, functools.partial):  # a step wrapped to record its calls
                fn = fn.func
            fn = getattr(fn, "__func__", fn)
            globs = getattr(fn, "__globals__", None)
            if isinstance(globs, dict) and id(globs) not in seen_globals:
                seen_globals.add(id(globs))
                name = f"{globs.get('__name__', '?')} (globals)"
                namespaces.append(_Namespace.over(name, "globals", globs))
            code = getattr(fn, "__code__", None)
            for var, cell in zip(
                getattr(code, "co_freevars", ()), getattr(fn, "__closure__", None) or (),
                strict=False,
            ):
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                namespaces.append(
                    _Namespace(
                        f"{getattr(fn, '__qualname__', '?')} (closure)",
                        "closure",
                        {var: content},
                        lambda k, v, c=cell: setattr(c, "cell_contents", v),
                        lambda k: None,
                        lambda c=cell, var=var: {var: c.cell_contents},
                    )
                )
        budget = [MAX_CLONED]
        for ns in namespaces:
            for key, value in ns.values.items():
                for item in _watch_inner(f"{ns.name}.{key}", value, seen, budget):
                    ns.inner.append(item)
        return cls(namespaces)

    def rebound(self) -> dict[str, Any]:
        """The instance attributes (``"submodule.attr"``, ``"self.attr"``) whose binding
        differs now from the picture: rebound, created or deleted, with their value in the
        picture (:data:`MISSING` for one created since)."""
        out: dict[str, Any] = {}
        for ns in self._namespaces:
            if ns.kind != "instance":
                continue
            now = ns.read()
            for key in set(now) | set(ns.values):
                if key in _MODULE_TABLES:
                    continue
                before = ns.values.get(key, _MISSING)
                if now.get(key, _MISSING) is not before:
                    out[f"{ns.name}.{key}"] = before
        return out

    def restore(self) -> list[str]:
        """Put everything back; return the names of the changes that could not be undone."""
        lost: list[str] = []
        for ns in self._namespaces:
            now = ns.read()
            for key in [k for k in now if k not in ns.values and k not in _MODULE_TABLES]:
                ns.delete(key)
            for key, value in ns.values.items():
                if now.get(key, _MISSING) is not value:
                    ns.write(key, value)
            for name, copy in ns.inner:
                if not copy.put_back():
                    what = "written in place" if isinstance(copy, _TensorCopy) else "resized"
                    lost.append(f"{name} ({what}, too large to copy)")
        return lost

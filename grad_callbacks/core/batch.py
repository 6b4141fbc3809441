"""Batch structure utilities: the batch size of a nested batch, and slicing it sample by sample.

Pure torch (no Lightning). A batch is any nesting of dicts (and other mappings), lists, tuples,
namedtuples and dataclass instances whose leaves are tensors or plain Python values. Its batch
size is the leading dimension shared by its tensor leaves (0-dim tensors and non-tensor leaves do
not count). Slicing a batch indexes every tensor leaf that has that leading dimension and keeps
everything else, except that a list of exactly ``size`` values holding no tensor (e.g. the list of
``B`` strings that ``default_collate`` makes from string samples) is taken to be per-sample and is
sliced too.

Known ambiguities: a tensor whose leading dimension happens to equal the batch size is sliced even
if it is not per-sample (e.g. a class-weight vector of length B); a list of B tensors of different
lengths (variable-length samples) is not recognised as per-sample.

Example:
    >>> import torch
    >>> batch = {"x": torch.zeros(4, 3), "ids": ["a", "b", "c", "d"], "tag": "train"}
    >>> batch_size(batch)
    4
    >>> one = slice_batch(batch, 2)
    >>> tuple(one["x"].shape), one["ids"], one["tag"]
    ((1, 3), ['c'], 'train')
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: An index into the batch dimension: one sample (kept with a leading dim of 1), a slice, or a
#: 1-D integer (or bool mask) tensor.
Index = int | slice | Tensor


def is_namedtuple(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a ``namedtuple`` class (rebuilt with ``_make``)."""
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    if _is_dataclass_instance(obj):
        return any(_holds_tensor(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def _is_sample_list(obj: Any, size: int | None) -> bool:
    return (
        size is not None
        and isinstance(obj, list)
        and len(obj) == size
        and not any(_holds_tensor(v) for v in obj)
    )


def rebuild_mapping(obj: Mapping[Any, Any], items: dict[Any, Any]) -> Mapping[Any, Any]:
    """A mapping of ``obj``'s type holding ``items`` (a plain dict when the type cannot be
    rebuilt); a ``defaultdict`` keeps its factory."""
    if type(obj) is dict:
        return items
    if isinstance(obj, defaultdict):
        return defaultdict(obj.default_factory, items)
    if isinstance(obj, MutableMapping):
        try:
            new = copy.copy(obj)
            for k, v in items.items():
                new[k] = v
            return new
        except Exception:
            pass
    try:
        return type(obj)(items)  # an immutable mapping built from a dict
    except Exception:
        return items


def _map_batch(
    obj: Any,
    on_tensor: Callable[[Tensor], Any],
    on_sample_list: Callable[[list[Any]], Any],
    size: int | None,
) -> Any:
    """Rebuild ``obj`` with ``on_tensor`` applied to tensor leaves and ``on_sample_list`` to
    per-sample lists; other leaves are kept as they are (the same objects)."""

    def walk(x: Any) -> Any:
        if isinstance(x, Tensor):
            return on_tensor(x)
        if is_namedtuple(x):
            return type(x)._make(walk(v) for v in x)
        if _is_sample_list(x, size):
            return on_sample_list(x)
        if isinstance(x, (list, tuple)):
            values = [walk(v) for v in x]
            try:
                return type(x)(values)
            except Exception:
                return values if isinstance(x, list) else tuple(values)
        if isinstance(x, Mapping):
            return rebuild_mapping(x, {k: walk(v) for k, v in x.items()})
        if _is_dataclass_instance(x):
            changes = {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            return dataclasses.replace(x, **changes)
        return x

    return walk(obj)


def _tensor_leaves(batch: Any) -> list[Tensor]:
    leaves: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        leaves.append(t)
        return t

    _map_batch(batch, keep, lambda lst: lst, None)
    return leaves


def batch_size(batch: Any) -> int | None:
    """The leading dimension shared by the tensor leaves of ``batch``.

    Args:
        batch: a tensor or any nesting of mappings, lists, tuples, namedtuples and dataclasses.

    Returns:
        The common leading dimension of the tensor leaves with at least one dimension; None when
        there is no such tensor or their leading dimensions disagree.

    Example:
        >>> import torch
        >>> batch_size((torch.zeros(5, 2), torch.zeros(5), torch.tensor(1.0), "name"))
        5
        >>> batch_size({"x": torch.zeros(5, 2), "w": torch.zeros(3)}) is None
        True
    """
    sizes = {t.shape[0] for t in _tensor_leaves(batch) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _resolve_size(batch: Any, size: int | None) -> int:
    if size is None:
        size = batch_size(batch)
        if size is None:
            raise ValueError(
                "cannot tell the batch size: the batch has no tensor with a leading dimension, "
                "or its tensors disagree about it; pass size= explicitly"
            )
    return size


def _positions(index: Index, size: int) -> list[int]:
    """The sample positions ``index`` selects, as Python ints."""
    if isinstance(index, Tensor):
        return torch.arange(size, device=index.device)[index].tolist()
    return list(range(size)[index : index + 1] if isinstance(index, int) else range(size)[index])


def slice_batch(batch: Any, index: Index, *, size: int | None = None) -> Any:
    """Select samples of ``batch``, keeping its structure.

    Every tensor leaf whose leading dimension is the batch size is indexed on that dimension, and
    so is every list of ``size`` values that holds no tensor (e.g. a list of B strings). Other
    leaves (strings, None, numbers, 0-dim tensors, tensors without the batch dimension) are kept
    as they are. Namedtuples and dataclasses are rebuilt as their own type.

    Args:
        batch: a tensor or any nesting of mappings, lists, tuples, namedtuples and dataclasses.
        index: an int (one sample, kept with a leading dimension of 1: ``t[i:i+1]``; negative
            counts from the end), a slice, or a 1-D integer or bool tensor of positions.
        size: the batch size; by default :func:`batch_size` of ``batch`` (pass it when the
            batch's tensors disagree about their leading dimension).

    Returns:
        A batch of the same structure holding only the selected samples.

    Raises:
        ValueError: when the batch size cannot be told.
        IndexError: when an int index is out of range.

    Example:
        >>> import torch
        >>> x = torch.arange(6).reshape(3, 2)
        >>> slice_batch((x, ["a", "b", "c"]), -1)
        (tensor([[4, 5]]), ['c'])
        >>> slice_batch({"x": x, "w": torch.ones(2)}, torch.tensor([0, 2]), size=3)["x"]
        tensor([[0, 1],
                [4, 5]])
    """
    n = _resolve_size(batch, size)
    if isinstance(index, int):
        if not -n <= index < n:
            raise IndexError(f"sample index {index} is out of range for a batch of {n}")
        index = index % n
    elif isinstance(index, Tensor) and index.dim() != 1:
        raise ValueError(f"a tensor index must be 1-D, got shape {tuple(index.shape)}")

    def on_tensor(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != n:
            return t
        if isinstance(index, int):
            return t.narrow(0, index, 1)
        if isinstance(index, Tensor):
            return t[index.to(t.device)]
        return t[index]

    def on_sample_list(lst: list[Any]) -> list[Any]:
        return [lst[i] for i in _positions(index, n)]

    return _map_batch(batch, on_tensor, on_sample_list, n)


@dataclass
class FlatBatch:
    """A batch split into its per-sample tensors and the rest (see :func:`flatten_batch`).

    Attributes:
        size: the batch size.
        tensors: the tensor leaves whose leading dimension is ``size``, in traversal order.
        has_sample_lists: whether the batch holds per-sample Python lists (which only a
            per-sample loop, not ``torch.func.vmap``, can split).
    """

    size: int
    tensors: list[Tensor]
    has_sample_lists: bool
    _batch: Any

    def rebuild(self, tensors: Sequence[Tensor]) -> Any:
        """The original batch with its per-sample tensors replaced by ``tensors`` (same order)."""
        if len(tensors) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} tensors, got {len(tensors)}")
        it = iter(tensors)
        n = self.size

        def on_tensor(t: Tensor) -> Tensor:
            return next(it) if t.dim() > 0 and t.shape[0] == n else t

        return _map_batch(self._batch, on_tensor, lambda lst: lst, n)


def flatten_batch(batch: Any, *, size: int | None = None) -> FlatBatch:
    """Split ``batch`` into the tensors that carry the batch dimension and a way to rebuild it.

    Args:
        batch: a tensor or any nesting of mappings, lists, tuples, namedtuples and dataclasses.
        size: the batch size; by default :func:`batch_size` of ``batch``.

    Returns:
        A :class:`FlatBatch`.

    Raises:
        ValueError: when the batch size cannot be told.

    Example:
        >>> import torch
        >>> flat = flatten_batch({"x": torch.zeros(4, 3), "n": 7})
        >>> flat.size, len(flat.tensors)
        (4, 1)
        >>> flat.rebuild([torch.ones(1, 3)])["x"]
        tensor([[1., 1., 1.]])
    """
    n = _resolve_size(batch, size)
    tensors: list[Tensor] = []
    lists: list[list[Any]] = []

    def on_tensor(t: Tensor) -> Tensor:
        if t.dim() > 0 and t.shape[0] == n:
            tensors.append(t)
        return t

    def on_sample_list(lst: list[Any]) -> list[Any]:
        lists.append(lst)
        return lst

    _map_batch(batch, on_tensor, on_sample_list, n)
    return FlatBatch(n, tensors, bool(lists) and n != 1, batch)


# ---------------------------------------------------------------------------------- named leaves
Path = tuple[Any, ...]


def _map_named(obj: Any, fn: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """Rebuild ``obj`` with ``fn(path, leaf)`` applied to every leaf (tensors and plain values)."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if is_namedtuple(obj):
        return type(obj)._make(
            _map_named(v, fn, (*path, f)) for f, v in zip(obj._fields, obj, strict=True)
        )
    if isinstance(obj, (list, tuple)):
        values = [_map_named(v, fn, (*path, i)) for i, v in enumerate(obj)]
        try:
            return type(obj)(values)
        except Exception:
            return values if isinstance(obj, list) else tuple(values)
    if isinstance(obj, Mapping):
        return rebuild_mapping(obj, {k: _map_named(v, fn, (*path, k)) for k, v in obj.items()})
    if _is_dataclass_instance(obj):
        changes = {
            f.name: _map_named(getattr(obj, f.name), fn, (*path, f.name))
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **changes)
    return fn(path, obj)


def path_name(path: Path) -> str:
    """A readable name for a leaf's path: ``labels``, ``[1]``, ``inputs.mask``."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "batch"


def named_leaves(batch: Any) -> list[tuple[Path, Any]]:
    """Every leaf of ``batch`` (tensors and plain values) with its path of keys and indices.

    Example:
        >>> import torch
        >>> [(path_name(p), v) for p, v in named_leaves({"x": (torch.tensor(1), 2), "n": "a"})]
        [('x[0]', tensor(1)), ('x[1]', 2), ('n', 'a')]
    """
    leaves: list[tuple[Path, Any]] = []

    def keep(path: Path, leaf: Any) -> Any:
        leaves.append((path, leaf))
        return leaf

    _map_named(batch, keep)
    return leaves


def replace_leaf(batch: Any, path: Path, value: Any) -> Any:
    """``batch`` rebuilt with the leaf at ``path`` replaced by ``value`` (others kept as they are).

    Example:
        >>> replace_leaf({"x": [1, 2], "y": 3}, ("x", 1), 20)
        {'x': [1, 20], 'y': 3}
    """
    return _map_named(batch, lambda p, leaf: value if p == path else leaf)

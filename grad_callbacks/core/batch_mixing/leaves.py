"""The tensors the test differentiates: batch-axis inputs made leaves, integer inputs followed
through their ``nn.Embedding`` lookups, and the per-sample bump of the localisation runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.core.batch import is_namedtuple, rebuild_mapping
from grad_callbacks.core.batch_mixing.call import ModelCall


@dataclass
class _Leaf:
    """A tensor the test differentiates with respect to, with its batch axis."""

    name: str
    tensor: Tensor
    dim: int


# ---------------------------------------------------------------------------------- structures
def _map(obj: Any, fn: Callable[[str, Tensor], Any], path: str) -> Any:
    """Rebuild ``obj`` with ``fn(path, tensor)`` applied to its tensor leaves."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if isinstance(obj, ModelCall):  # its arguments are named by themselves
        args = tuple(_map(v, fn, obj.name_of(k)) for k, v in enumerate(obj.args))
        kwargs = {k: _map(v, fn, k) for k, v in obj.kwargs.items()}
        return ModelCall(args, kwargs, obj.names)
    if is_namedtuple(obj):
        return type(obj)._make(
            _map(v, fn, f"{path}.{f}") for f, v in zip(obj._fields, obj, strict=True)
        )
    if isinstance(obj, (list, tuple)):
        values = [_map(v, fn, f"{path}[{k}]") for k, v in enumerate(obj)]
        try:
            return type(obj)(values)
        except Exception:
            return values if isinstance(obj, list) else tuple(values)
    if isinstance(obj, Mapping):
        return rebuild_mapping(obj, {k: _map(v, fn, f"{path}[{k!r}]") for k, v in obj.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _map(getattr(obj, f.name), fn, f"{path}.{f.name}")
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **changes)
    return obj


def _tensors(obj: Any, path: str) -> list[tuple[str, Tensor]]:
    found: list[tuple[str, Tensor]] = []

    def keep(name: str, t: Tensor) -> Tensor:
        found.append((name, t))
        return t

    _map(obj, keep, path)
    return found


def batch_size_of(inputs: Any, dim: int = 0) -> int | None:
    """The batch size of ``inputs``: the size of dimension ``dim`` of its first tensor that has it.

    Example:
        >>> batch_size_of({"x": torch.zeros(5, 2), "w": torch.zeros(3)})
        5
    """
    for _, t in _tensors(inputs, "input"):
        if t.dim() > dim:
            return int(t.shape[dim])
    return None


def default_sample_indices(size: int, count: int) -> list[int]:
    """``count`` sample indices spread over a batch of ``size``: first, last, then between.

    Example:
        >>> default_sample_indices(8, 3), default_sample_indices(2, 4)
        ([0, 4, 7], [0, 1])
    """
    count = max(1, min(count, size))
    if count == 1:
        return [0]
    return sorted({int(k * (size - 1) / (count - 1) + 0.5) for k in range(count)})


# ---------------------------------------------------------------------------------- taps
class _EmbeddingTaps:
    """Forward hooks on ``nn.Embedding`` modules that turn lookups of the integer inputs into
    differentiable leaves (and, for localisation, perturb one sample's rows)."""

    def __init__(
        self, module: nn.Module, sources: list[_Leaf], size: int, perturb: _Perturb | None
    ) -> None:
        self.module = module
        self.sources = sources
        self.size = size
        self.perturb = perturb
        self.leaves: list[_Leaf] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _EmbeddingTaps:
        if self.sources:
            for name, m in self.module.named_modules():
                if isinstance(m, nn.Embedding):
                    # Prepended: hooks that record module outputs must see the tapped output.
                    hook = self._hook_for(name)
                    self._handles.append(m.register_forward_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _match(self, idx: Tensor) -> tuple[_Leaf, int] | None:
        for src in self.sources:
            t = src.tensor
            if idx.device != t.device or idx.dim() == 0:
                continue
            same_storage = idx.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            if same_storage:
                # A view (slice, transpose) of the input: its batch axis is the one that kept
                # the input's batch stride.
                for d in range(idx.dim()):
                    if idx.shape[d] == self.size and idx.stride(d) == t.stride(src.dim):
                        return src, d
            # Same shape is not enough: other ids (decoder inputs shifted from the labels) often
            # have the inputs' shape.
            if idx.shape == t.shape and torch.equal(idx, t):
                return src, src.dim
        return None

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            idx = args[0] if args else None
            if not isinstance(idx, Tensor) or not isinstance(out, Tensor):
                return None
            if idx.is_floating_point() or idx.is_complex():
                return None  # an Embedding subclass called with something else than the ids
            match = self._match(idx)
            if match is None:
                return None
            src, dim = match
            if out.dim() <= dim or out.shape[dim] != self.size:
                # No batch axis where the ids have one (a learned positional embedding of
                # shape (1, T, H) for ids (B, T)): shared by every sample, carried as is.
                return None
            leaf = out.detach().requires_grad_(torch.is_grad_enabled())
            self.leaves.append(_Leaf(f"{name} output for {src.name}", leaf, dim))
            value = leaf.clone()  # not a leaf: the model may change it in place
            if self.perturb is not None:
                value = self.perturb(value, dim)
            return value

        return hook


class _Perturb:
    """Adds a fixed random bump to one sample's slice of a tensor."""

    def __init__(self, sample: int, seed: int) -> None:
        self.sample = sample
        self.seed = seed

    def __call__(self, t: Tensor, dim: int) -> Tensor:
        part = t.detach().narrow(dim, self.sample, 1)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(part.shape, generator=gen, dtype=torch.float32)
        scale = float(part.float().abs().mean()) + 0.1
        bump = torch.zeros_like(t)
        bump.narrow(dim, self.sample, 1).copy_((noise * scale).to(t.dtype))
        return t + bump



def _prepare(
    inputs: Any, size: int, dim: int, perturb: _Perturb | None
) -> tuple[Any, list[_Leaf], list[_Leaf]]:
    """The inputs with floating batch tensors replaced by leaves; and the integer ones."""
    leaves: list[_Leaf] = []
    integers: list[_Leaf] = []

    def swap(name: str, t: Tensor) -> Tensor:
        if t.dim() <= dim or t.shape[dim] != size:
            return t
        if not (t.is_floating_point() or t.is_complex()):
            integers.append(_Leaf(name, t, dim))
            return t
        leaf = t.detach().clone().requires_grad_(True)
        leaves.append(_Leaf(name, leaf, dim))
        # The model gets a non-leaf copy: it may change its input in place.
        return perturb(leaf, dim) if perturb is not None else leaf.clone()

    return _map(inputs, swap, "input"), leaves, integers


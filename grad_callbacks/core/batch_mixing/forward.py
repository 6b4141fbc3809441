"""One forward pass of the test: isolated from training, on inputs made leaves, with the
outputs that carry the batch axis named."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from grad_callbacks.core.batch_mixing.leaves import (
    _EmbeddingTaps,
    _Leaf,
    _Perturb,
    _prepare,
    _tensors,
)
from grad_callbacks.core.batch_mixing.result import CannotCheckMixing
from grad_callbacks.core.isolation import cuda_devices, forked_host_rng, run_eagerly
from grad_callbacks.core.state import restored_state

Forward = Callable[[Any], Any]

_REQUIRES_GRAD = torch._C.TensorBase.__dict__["requires_grad"]


class _GradFlagsKept(TorchFunctionMode):
    """``t.requires_grad = True`` on a tensor that already requires grad does nothing.

    A model may switch on gradients for its input (Wav2Vec2's feature encoder sets
    ``hidden_states.requires_grad = True`` on ``input_values[:, None]``); with the test's inputs
    made leaves that tensor is a view of a leaf, where torch refuses the assignment although
    it asks for nothing new.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if (
            getattr(func, "__self__", None) is _REQUIRES_GRAD
            and getattr(func, "__name__", "") == "__set__"
            and len(args) == 2
            and isinstance(args[0], Tensor)
            and bool(args[1])
            and args[0].requires_grad
        ):
            return None
        return func(*args, **(kwargs or {}))


def _freeze_batch_stats(m: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook for a BatchNorm without running statistics: give it, on its first call,
    detached statistics of that call's input, so that in eval mode it normalises with constants
    instead of the (mixing) batch statistics."""
    if m.running_mean is not None or not args or not isinstance(args[0], Tensor):
        return
    x = args[0]
    with torch.no_grad():
        dims = [d for d in range(x.dim()) if d != 1]
        m.running_mean = x.detach().mean(dim=dims)
        m.running_var = x.detach().var(dim=dims, unbiased=False)


@contextmanager
def _norms_in_eval(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    flags = [m.training for m in norms]
    untracked = [m for m in norms if m.running_mean is None and m.running_var is None]
    handles = [m.register_forward_pre_hook(_freeze_batch_stats) for m in untracked]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for h in handles:
            h.remove()
        for m in untracked:
            m.running_mean = None
            m.running_var = None
        for m, flag in zip(norms, flags, strict=True):
            m.training = flag


def _cuda_devices(*objs: Any) -> list[int]:
    tensors: list[Tensor] = []
    for obj in objs:
        if isinstance(obj, nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
        else:
            tensors += [t for _, t in _tensors(obj, "")]
    return cuda_devices(tensors)


@contextmanager
def isolated(module: nn.Module | None, inputs: Any = None) -> Iterator[None]:
    """Run extra forward passes of ``module`` without a trace on training.

    BatchNorm layers run in eval mode, buffers are restored on exit, the CPU and CUDA random
    number generators, Python's ``random`` and NumPy's are forked and ``torch.compile``d code
    runs eagerly.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> before = net[1].running_mean.clone()
        >>> with isolated(net):
        ...     _ = net(torch.randn(4, 2))
        >>> torch.equal(net[1].running_mean, before), net[1].training
        (True, True)
    """
    with ExitStack() as stack:
        stack.enter_context(run_eagerly())
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(module, inputs)))
        stack.enter_context(forked_host_rng())
        if module is not None:
            stack.enter_context(_norms_in_eval(module))
            stack.enter_context(restored_state(module))
        yield


@dataclass
class _Output:
    """An output tensor the test differentiates, with ``rows`` rows per sample on the batch axis:
    1, or k for an output of k x B rows (a batch-first ``(B, T, V)`` flattened to
    ``(B * T, V)``), which holds sample ``i`` in rows ``i*k .. i*k+k-1`` or, flattened from
    sequence-first ``(T, B, V)``, in rows ``i, i+B, i+2B, ...``."""

    name: str
    tensor: Tensor
    rows: int = 1


@dataclass
class _Run:
    outputs: list[_Output]
    leaves: list[_Leaf]


def sample_part(out: Tensor, i: int, size: int, dim: int, rows: int, interleaved: bool) -> Tensor:
    """The part of ``out`` that belongs to sample ``i`` (see :class:`_Output`)."""
    if rows == 1:
        return out.narrow(dim, i, 1)
    if not interleaved:
        return out.narrow(dim, i * rows, rows)
    return out.index_select(dim, torch.arange(i, rows * size, size, device=out.device))


def _named_outputs(outputs: Any, size: int, dim: int) -> list[_Output]:
    found = []
    for name, t in _tensors(outputs, "output"):
        if not t.is_floating_point() or t.dim() <= dim or t.shape[dim] < size:
            continue
        rows, rest = divmod(int(t.shape[dim]), size)
        if rest == 0:
            found.append(_Output(name, t, rows))
    return found


def _run(
    forward: Forward,
    inputs: Any,
    *,
    size: int,
    input_dim: int,
    output_dim: int,
    module: nn.Module | None,
    perturb: _Perturb | None = None,
) -> _Run:
    prepared, leaves, integers = _prepare(inputs, size, input_dim, perturb)
    taps = _EmbeddingTaps(module, integers, size, perturb) if module is not None else None
    with torch.enable_grad(), _GradFlagsKept():
        if taps is not None:
            with taps:
                outputs = forward(prepared)
            leaves += taps.leaves
        else:
            outputs = forward(prepared)
    if not leaves:
        if integers:
            names = ", ".join(s.name for s in integers)
            raise CannotCheckMixing(
                f"the integer input(s) {names} reach no nn.Embedding of the module, and there is "
                f"no floating input to differentiate"
            )
        raise CannotCheckMixing(f"no input tensor has the batch size {size} on dim {input_dim}")
    named = _named_outputs(outputs, size, output_dim)
    if not named:
        shapes = [tuple(t.shape) for _, t in _tensors(outputs, "output")]
        raise CannotCheckMixing(
            f"no floating output has the batch size {size} (or a multiple of it) on dim "
            f"{output_dim} (output shapes: {shapes})"
        )
    return _Run(named, leaves)


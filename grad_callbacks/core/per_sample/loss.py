"""The lowest layer of the per-sample engine: the loss as a module, and which parameters to
differentiate. Nothing here runs a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
GradChunks = Iterator[tuple[int, dict[str, Tensor]]]


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def dense(grad: Tensor) -> Tensor:
    """``grad`` as a strided tensor: the gradient of a sparse embedding
    (``nn.Embedding(..., sparse=True)``) is a sparse tensor, which the statistics and
    comparisons cannot reshape.

    Example:
        >>> dense(torch.eye(2).to_sparse()).layout
        torch.strided
    """
    return grad if grad.layout == torch.strided else grad.to_dense()


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _resolve_params(
    module: nn.Module, params: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The parameters to differentiate, and for each its name in ``module``."""
    if params is None:
        chosen = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not chosen:
            raise ValueError("the module has no parameter with requires_grad=True")
        return chosen, {n: n for n in chosen}
    names = {id(p): n for n, p in module.named_parameters()}
    module_names = {}
    for key, p in params.items():
        if id(p) not in names:
            raise ValueError(f"params[{key!r}] is not a parameter of the module")
        module_names[key] = names[id(p)]
    if not params:
        raise ValueError("params is empty")
    return dict(params), module_names


class _LossModule(nn.Module):
    """``loss_fn(inner, batch)`` as a module, so ``functional_call`` can swap the inner
    module's tensors for the duration of any user code (not just ``inner.forward``)."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return _scalar(self._loss_fn(self.inner, batch))

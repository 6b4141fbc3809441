"""Putting a module's state back after extra forward passes (pure torch).

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with restored_state(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> int(bn.num_batches_tracked)
    0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BufferValues:
    """The values of a module's buffers at one moment, to start a recomputation from them.

    A training step's forward may update buffers that its own output depends on (the power
    iteration vectors of ``spectral_norm``): a recomputation run after the real step must start
    from the values the real step started from. Take them before the step, :meth:`apply` them
    inside :func:`restored_state` (which puts the later values back).

    Example:
        >>> lin = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(3, 3))
        >>> start = BufferValues.capture(lin)
        >>> _ = lin(torch.ones(1, 3))  # the power iteration moves ``_u``
        >>> with restored_state(lin):
        ...     start.apply()
        ...     bool(torch.equal(lin.parametrizations.weight[0]._u, start.saved[0][2]))
        True
    """

    saved: tuple[tuple[nn.Module, str, torch.Tensor], ...]

    @classmethod
    def capture(cls, module: nn.Module) -> BufferValues:
        return cls(
            tuple(
                (owner, name, t.detach().clone())
                for owner in module.modules()
                for name, t in owner._buffers.items()
                if t is not None
            )
        )

    def apply(self) -> None:
        """Write the values back into the buffers (those still there with the same shape)."""
        with torch.no_grad():
            for owner, name, values in self.saved:
                t = owner._buffers.get(name)
                if t is not None and t.shape == values.shape:
                    t.data.copy_(values)


@contextmanager
def restored_state(module: nn.Module) -> Iterator[None]:
    """Put back every buffer, and the weights of max-norm embeddings (renormalised in forward).

    The same tensor objects are kept (a buffer replaced during the block is put back) and their
    values restored through ``.data``: kernels such as ``batch_norm`` update running statistics
    without bumping the version counter, and an autograd graph that saved the tensor must stay
    valid.
    """
    saved = [
        (owner, "_buffers", name, t, t.detach().clone())
        for owner in module.modules()
        for name, t in owner._buffers.items()
        if t is not None
    ]
    saved += [
        (owner, "_parameters", "weight", owner.weight, owner.weight.detach().clone())
        for owner in module.modules()
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and owner.max_norm is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, table, name, original, copy in saved:
                slots = getattr(owner, table)
                if slots.get(name) is not original:
                    slots[name] = original
                original.data.copy_(copy)

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

import torch
from torch import nn


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

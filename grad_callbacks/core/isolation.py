"""Run user code aside without changing how the live run behaves: BatchNorm in eval mode for a
block, compiled code run eagerly for a block, the host random streams (Python's ``random``,
NumPy's global generator) forked for a block. Every flag is put back on exit, even on error.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_eval", "cuda_devices", "forked_host_rng", "numpy_random", "run_eagerly"]


def numpy_random() -> Any:
    """``numpy.random`` (its global generator), or None without NumPy."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return None
    return np.random


@contextmanager
def forked_host_rng() -> Iterator[None]:
    """Put Python's ``random`` and NumPy's global generator back to their state at entry on
    exit (user code run aside may draw from them: SpecAugment-style masks, augmentation).

    Example:
        >>> import random
        >>> before = random.random(); _ = random.seed(0)
        >>> with forked_host_rng():
        ...     _ = random.random()
        >>> random.random() == random.Random(0).random()
        True
    """
    np_random = numpy_random()
    py_state = random.getstate()
    np_state = np_random.get_state() if np_random is not None else None
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_random is not None:
            np_random.set_state(np_state)


def cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    """The CUDA device indices ``tensors`` live on: the devices whose random streams a
    ``torch.random.fork_rng`` around code using them must fork.

    Example:
        >>> cuda_devices([torch.zeros(2)])
        []
    """
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextmanager
def batchnorm_eval(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every BatchNorm submodule of ``module`` in eval mode.

    Only the ``training`` flag of ``_BatchNorm`` modules (BatchNorm1d/2d/3d, SyncBatchNorm, lazy
    variants) is touched, and each is restored to its own previous value on exit, even on error.
    In eval mode they normalise with their running statistics and do not update them, which makes
    per-sample gradients well defined and vmap-able.

    Args:
        module: the module to act on; it is yielded back.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> with batchnorm_eval(net):
        ...     net[1].training, net[0].training
        (False, True)
        >>> net[1].training
        True
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    flags = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield module
    finally:
        for m, flag in zip(norms, flags, strict=True):
            m.training = flag


@contextmanager
def run_eagerly() -> Iterator[None]:
    """Run ``torch.compile``d code called inside the block as plain eager code.

    Recomputations call the user's compiled modules in ways the compiled graph was not built
    for (parameters swapped by ``functional_call``, under ``vmap``, inputs that require grad,
    float64 copies, ``no_grad``): compiled, every call would fail a guard and recompile, slowly,
    until the recompile limit, for graphs never used again. Under
    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) they run eagerly and the
    compiled training graph is neither recompiled nor replaced. A no-op on older torch, and
    while dynamo is tracing the caller (the stance cannot change inside a compiled region).

    Example:
        >>> net = torch.compile(torch.nn.Linear(2, 1))
        >>> with run_eagerly():  # no compilation happens here
        ...     out = net(torch.ones(3, 2))
        >>> out.shape
        torch.Size([3, 1])
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield

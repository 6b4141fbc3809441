"""One per-sample comparison: a batch, the parameters, and the two losses to differentiate (the
batch-reduced loss and the per-sample one), each run isolated from the live training run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from grad_callbacks.callbacks.recompute import Recomputations, RngState, isolated
from grad_callbacks.core.diagnosis import relative_error
from grad_callbacks.core.isolation import numpy_random
from grad_callbacks.core.per_sample import (
    PerSampleStats,
    ScaleFit,
    batchnorm_eval,
    fit_scale,
    loss_grad,
    per_sample_grad_stats,
)
from grad_callbacks.core.per_sample.weights import Gram, gram_of
from grad_callbacks.core.python_state import PythonState
from grad_callbacks.core.state import BufferValues


@dataclass(frozen=True)
class _MicroBatch:
    batch: Any
    batch_idx: int
    rng: RngState
    #: The module's Python state before the real step (a replay starts from it).
    state: PythonState | None = None
    #: The module's buffers before the real step.
    buffers: BufferValues | None = None

    def isolated(self, pl_module: nn.Module, record: Recomputations | None = None) -> Any:
        """A recomputation of this micro-batch's step, started from the real step's state
        (random streams, Python state, buffers)."""
        return isolated(
            pl_module, rng_state=self.rng, state=self.state, buffers=self.buffers, record=record
        )


@dataclass
class Measured:
    """What one comparison measured: the scale fit on the mean, the per-sample statistics, the
    Gram matrices of the per-sample gradients with the batch gradient, and the batch gradient."""

    fit: ScaleFit
    stats: PerSampleStats
    gram: Gram | None
    batch_grad: dict[str, Tensor]


@dataclass(frozen=True)
class _Comparison:
    """One per-sample comparison: a batch, the parameters, and the two losses to differentiate."""

    pl_module: pl.LightningModule
    micro: _MicroBatch
    batch: Any
    n: int
    params: dict[str, Tensor]
    per_sample_fn: Callable[[nn.Module, Any], Tensor]
    batch_fn: Callable[[nn.Module, Any], Tensor]
    chunk_size: int
    method: str
    size: int = 0  # the micro-batch's batch size B (n of B samples compared)
    record: Recomputations | None = None

    def isolated(self) -> Any:
        """The recomputation's isolation, started from the real step's state."""
        return self.micro.isolated(self.pl_module, self.record)

    def fit(self, eval_bn: bool = False) -> Measured:
        """Per-sample statistics, the fit of the batch gradient on their mean, and the Gram
        matrices for the weighted fit (the per-sample gradients themselves are not kept)."""
        with (
            self.isolated(),
            _stochastic_layers_off(self.pl_module),
            batchnorm_eval(self.pl_module) if eval_bn else nullcontext(),
        ):
            batch_grad = loss_grad(self.pl_module, self.batch_fn, self.batch, params=self.params)
            stats = per_sample_grad_stats(
                self.pl_module,
                self.per_sample_fn,
                self.batch,
                params=self.params,
                chunk_size=self.chunk_size,
                method=self.method,  # type: ignore[arg-type]
                size=self.n,
                keep_grads=True,
            )
        grads, stats.grads = stats.grads, None
        gram = gram_of(grads, batch_grad) if grads is not None else None
        return Measured(fit_scale(batch_grad, stats.mean_grad), stats, gram, batch_grad)

    def batch_grad_of(self, batch: Any) -> dict[str, Tensor]:
        """The batch loss's gradient on ``batch`` (a variant of this comparison's batch), under
        the same conditions as :meth:`fit` (BatchNorm as the module has it)."""
        with self.isolated(), _stochastic_layers_off(self.pl_module):
            return loss_grad(self.pl_module, self.batch_fn, batch, params=self.params)

    def random_streams(self, tol: float) -> list[str]:
        """The random streams the batch loss draws from, dropout layers off: ``"torch"`` (when
        the gradient changes with its seed), ``"numpy"`` (NumPy's global generator) and
        ``"random"`` (Python's), when the loss consumes them at all (a coin flip for the whole
        batch may come out alike under another seed).

        Noise drawn in ``training_step`` itself (``torch.randn_like`` augmentation, random
        masking, a flip decided by ``random.random()``, ``np.random.normal`` noise) cannot be
        drawn alike in the batch and per-sample passes, so their difference says nothing about
        coupling.
        """
        module = self.pl_module
        np_random = numpy_random()
        consumed: list[str] = []

        def grads(torch_seed: int | None) -> dict[str, Tensor]:
            with self.isolated(), _stochastic_layers_off(module):
                if torch_seed is not None:
                    torch.manual_seed(torch_seed)
                python_before = random.getstate()
                numpy_before = _numpy_position(np_random)
                out = loss_grad(module, self.batch_fn, self.batch, params=self.params)
                if random.getstate() != python_before:
                    consumed.append("random")
                if _numpy_position(np_random) != numpy_before:
                    consumed.append("numpy")
                return out

        reference = grads(None)
        streams = ["torch"] if float(relative_error(grads(1234567), reference)) > tol else []
        return streams + [s for s in ("numpy", "random") if s in consumed]


def _numpy_position(np_random: Any) -> tuple[Any, ...] | None:
    """Where NumPy's global generator stands: its key (hashed), position and cached Gaussian."""
    if np_random is None:
        return None
    _, key, pos, has_gauss, gauss = np_random.get_state()
    return (hash(key.tobytes()), pos, has_gauss, gauss)


@contextmanager
def _stochastic_layers_off(module: nn.Module) -> Iterator[None]:
    """Every submodule but normalization layers in eval mode; each flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            if not isinstance(m, _BatchNorm):
                m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


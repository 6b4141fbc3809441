"""How PerSampleGradientCheck obtains a loss: ``training_step`` on a (sliced) batch, or the
per-sample losses a module's ``per_sample_loss`` method (or the check's argument) gives.

Each way is one function; the recomputation itself runs inside
:func:`~grad_callbacks.callbacks.recompute.isolated`, set up by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

PerSampleLoss = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]


class _NoLoss(RuntimeError):
    """training_step returned no loss."""


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise _NoLoss(
        "training_step returned "
        + ("None" if output is None else type(output).__name__)
        + " instead of a loss tensor (or a dict with 'loss')"
    )


def training_loss(batch_idx: int) -> LossFn:
    """``fn(module, batch)``: the loss ``training_step(batch, batch_idx)`` returns.

    Raises ``_NoLoss`` when the step returns no loss.
    """

    def loss(module: nn.Module, batch: Any) -> Tensor:
        return _loss_of(module.training_step(batch, batch_idx))  # type: ignore[operator]

    return loss


def sample_losses(
    explicit: PerSampleLoss | None, pl_module: pl.LightningModule
) -> PerSampleLoss | None:
    """The per-sample loss function: the check's argument, else the module's
    ``per_sample_loss`` method, else None (slice ``training_step``'s batch)."""
    if explicit is not None:
        return explicit
    method = getattr(pl_module, "per_sample_loss", None)
    if callable(method):
        return lambda module, batch: module.per_sample_loss(batch)  # type: ignore[operator]
    return None

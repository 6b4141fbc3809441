"""The optimizer's gradient against the loss's: replay the accumulation window's micro-batches
(same random numbers, AMP scale and ``accumulate_grad_batches`` accounted for), and average the
replay over DDP ranks as the strategy averaged the live gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from grad_callbacks.callbacks.per_sample.comparison import _MicroBatch
from grad_callbacks.callbacks.per_sample.losses import training_loss
from grad_callbacks.callbacks.recompute import Recomputations
from grad_callbacks.core.per_sample import loss_grad


def params_of(pl_module: pl.LightningModule, optimizer: Any) -> dict[str, Tensor]:
    """The module's trainable parameters that ``optimizer`` steps, by name, in module order."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {
        name: p for name, p in pl_module.named_parameters() if id(p) in owned and p.requires_grad
    }


def replay_window(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: Any,
    window: Sequence[_MicroBatch],
    live: Mapping[str, Tensor],
    record: Recomputations | None = None,
) -> dict[str, Tensor] | None:
    """The gradient the optimizer should see: the training loss's over ``window``, divided by
    ``accumulate_grad_batches``, AMP-scaled and unscaled like the live one. None when ``live``
    is empty."""
    if not live:
        return None
    accumulate = int(trainer.accumulate_grad_batches)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    # Fused optimizers that step with the scaler keep their gradients scaled here.
    still_scaled = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
    params = {k: v for k, v in params_of(pl_module, optimizer).items() if k in live}
    total: dict[str, Tensor] | None = None
    for micro in window:
        loss_fn = training_loss(micro.batch_idx)

        def scaled(m: nn.Module, b: Any, fn: Any = loss_fn) -> Tensor:
            return fn(m, b) * scale / accumulate

        with (
            micro.isolated(pl_module, record),
            trainer.precision_plugin.forward_context(),
        ):
            grads = loss_grad(pl_module, scaled, micro.batch, params=params)
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    if total is None:
        return None
    if not still_scaled and scale != 1.0:
        total = {k: v * (1.0 / scale) for k, v in total.items()}
    return total


def average_over_ranks(
    live: Mapping[str, Tensor], recomputed: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """All-reduce the recomputed gradients; every rank enters, failed or not."""
    keys = list(live)
    ok = recomputed is not None and all(k in recomputed for k in keys)
    parts = [(recomputed[k] if ok else torch.zeros_like(live[k])).flatten() for k in keys]  # type: ignore[index]
    device = parts[0].device if parts else torch.device("cpu")
    flat = torch.cat([*parts, torch.tensor([1.0 if ok else 0.0], device=device)])
    torch.distributed.all_reduce(flat)
    world = torch.distributed.get_world_size()
    if float(flat[-1]) < world:
        return None
    averaged: dict[str, Tensor] = {}
    offset = 0
    for k in keys:
        size = live[k].numel()
        averaged[k] = (flat[offset : offset + size] / world).view_as(live[k])
        offset += size
    return averaged

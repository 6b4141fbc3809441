"""Per-sample gradients one sample at a time on the live module (``torch.autograd.grad``, never
``.backward()``), every buffer restored afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.core.batch import slice_batch
from grad_callbacks.core.per_sample.loss import GradChunks, LossFn, _LossModule, dense
from grad_callbacks.core.state import restored_state


def _loop_chunks(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    n: int,
    params: dict[str, Tensor],
    module_names: dict[str, str],
    chunk_size: int,
) -> GradChunks:
    named = (params, module_names)
    with restored_state(module):
        for start in range(0, n, chunk_size):
            rows = [
                _hook_free_grad(module, loss_fn, slice_batch(batch, i, size=n), *named)
                for i in range(start, min(start + chunk_size, n))
            ]
            yield start, {k: torch.stack([r[k] for r in rows]) for k in params}


def _hook_free_grad(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: dict[str, Tensor],
    module_names: dict[str, str],
) -> dict[str, Tensor]:
    """The gradient of ``loss_fn(module, batch)`` w.r.t. detached copies of ``params``.

    Hooks on the live parameters do not apply to the copies, so the vmap path, the loop and the
    batch gradient all see the loss's own gradient (a rescaling hook is the optimizer gradient's
    business, not the per-sample comparison's).
    """
    from torch.func import functional_call

    detached = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    tensors = {f"inner.{module_names[k]}": v for k, v in detached.items()}
    with torch.enable_grad():
        loss = functional_call(_LossModule(module, loss_fn), tensors, (batch,))
        grads = torch.autograd.grad(loss, list(detached.values()), allow_unused=True)
    return {
        k: torch.zeros_like(p) if g is None else dense(g)
        for (k, p), g in zip(detached.items(), grads, strict=True)
    }

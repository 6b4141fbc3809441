"""Manual optimization: the gradient each optimizer step applies, recomputed from the losses
``training_step`` hands to ``manual_backward``.

In a manual step the parameters change in the middle of ``training_step`` (a GAN steps the
discriminator, then computes the generator's loss with the updated discriminator). The replay
follows: it runs ``training_step`` once, with the optimizers inert and recording
(:class:`~grad_callbacks.callbacks.stand_ins.ManualSteps`), on detached copies of the
parameters that take, between the real step's optimizer steps, the values the real step had
there (copied at each ``on_before_optimizer_step``). The gradient of an optimizer step is that
of the losses it applies with respect to every copy its parameters had, summed: what
``.grad`` accumulated in the real step. Hooks on the live parameters do not apply to the
copies, so a hook that changes gradients shows as a difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from grad_callbacks.callbacks.backward_guard import _recording_backward
from grad_callbacks.callbacks.per_sample.losses import _loss_of
from grad_callbacks.callbacks.stand_ins import ManualSteps, stood_in
from grad_callbacks.core.per_sample.loss import dense


@contextmanager
def _swappable(module: nn.Module) -> Iterator[Any]:
    """``swap(values)`` puts tensors in place of the module's parameters (by the parameter's
    id; tied parameters follow); the parameters are put back afterwards."""
    slots = [
        (owner, name, p)
        for owner in module.modules()
        for name, p in owner._parameters.items()
        if p is not None
    ]

    def swap(values: Mapping[int, Tensor]) -> None:
        for owner, name, p in slots:
            if id(p) in values:
                owner._parameters[name] = values[id(p)]

    try:
        yield swap
    finally:
        for owner, name, p in slots:
            owner._parameters[name] = p


def manual_step_grads(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    micro: Any,
    segments: Sequence[Mapping[int, Tensor]],
    wanted: Sequence[Mapping[str, Tensor]],
    record: Any = None,
    held: Mapping[str, Tensor] | None = None,
) -> list[dict[str, Tensor]] | str:
    """Per optimizer step of the real ``training_step``, the gradient its losses give the
    parameters in ``wanted[k]`` (name -> live parameter); or why it cannot be said.

    Args:
        segments: ``segments[k]``: the values (by parameter id) the parameters had before the
            ``k``-th optimizer step; one more entry for after the last one.
        held: the gradients the parameters held when the step began (by name): added to a
            step whose optimizer's ``zero_grad`` did not run before it (a forgotten
            ``zero_grad`` is ``ZeroGradCheck``'s to report, not a gradient mismatch).
    """
    leaves = [
        {i: v.detach().requires_grad_(True) for i, v in segment.items()} for segment in segments
    ]
    with (
        micro.isolated(pl_module, record),
        _swappable(pl_module) as swap,
        torch.enable_grad(),
        trainer.precision_plugin.forward_context(),
    ):
        swap(leaves[0])
        manual = ManualSteps(
            trainer.optimizers, on_step=lambda k: swap(leaves[min(k, len(leaves) - 1)])
        )
        with stood_in(pl_module, trainer, manual), _recording_backward(manual):
            pl_module.training_step(micro.batch, micro.batch_idx)  # type: ignore[operator]
        steps, cleared = manual.steps(), manual.cleared()
        if len(steps) != len(wanted):
            return (
                f"training_step run again made {len(steps)} optimizer step(s), the real step "
                f"{len(wanted)}"
            )
        out: list[dict[str, Tensor]] = []
        for (_, losses), params, was_cleared in zip(steps, wanted, cleared, strict=True):
            tensors = [_loss_of(x) for x in losses]
            names = list(params)
            inputs = [leaf[id(params[n])] for leaf in leaves for n in names]
            if not tensors or not inputs:
                out.append({})
                continue
            total = sum(tensors[1:], tensors[0])
            grads = torch.autograd.grad(total, inputs, retain_graph=True, allow_unused=True)
            summed: dict[str, Tensor] = {}
            for j, g in enumerate(grads):
                name = names[j % len(names)]
                if g is not None:
                    g = dense(g)
                    summed[name] = summed[name] + g if name in summed else g
            grad = {n: summed.get(n, torch.zeros_like(params[n])) for n in names}
            if not was_cleared and held:
                grad = {n: g + held[n] if n in held else g for n, g in grad.items()}
            out.append(grad)
        return out

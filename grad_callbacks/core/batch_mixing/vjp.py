"""The test: the gradient of ``output[i].sum()`` on every other sample's inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from grad_callbacks.core.batch_mixing.forward import _Run
from grad_callbacks.core.batch_mixing.result import Mixing


def _per_sample_magnitude(grad: Tensor, dim: int) -> Tensor:
    g = grad.detach().abs().nan_to_num(nan=0.0)
    g = g.movedim(dim, 0).reshape(g.shape[dim], -1)
    return g.amax(dim=1) if g.shape[1] > 0 else g.new_zeros(g.shape[0])



def _vjp_test(
    run: _Run, samples: list[int], size: int, output_dim: int, atol: float
) -> list[Mixing]:
    found: list[Mixing] = []
    tensors = [leaf.tensor for leaf in run.leaves]
    pending = [(name, out, i) for name, out in run.outputs if out.requires_grad for i in samples]
    for k, (name, out, i) in enumerate(pending):
        target = out.narrow(output_dim, i, 1).float().sum()
        grads = torch.autograd.grad(
            target, tensors, retain_graph=k < len(pending) - 1, allow_unused=True
        )
        cross = torch.zeros(size, device=target.device)
        own = torch.zeros((), device=target.device)
        via: list[str] = []
        for leaf, g in zip(run.leaves, grads, strict=True):
            if g is None:
                continue
            per = _per_sample_magnitude(g, leaf.dim).float().to(cross.device)
            own = torch.maximum(own, per[i])
            per[i] = 0.0
            if bool((per > atol).any()):
                via.append(leaf.name)
            cross = torch.maximum(cross, per)
        sources = tuple(int(j) for j in torch.nonzero(cross > atol).flatten().tolist())
        if sources:
            found.append(
                Mixing(
                    output=name,
                    sample=i,
                    sources=sources,
                    inputs=tuple(via),
                    magnitude=float(cross.max()),
                    own_magnitude=float(own),
                )
            )
    return found


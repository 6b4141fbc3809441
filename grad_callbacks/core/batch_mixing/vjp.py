"""The test: the gradient of ``output[i].sum()`` on every other sample's inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from grad_callbacks.core.batch_mixing.forward import _Output, _Run, sample_part
from grad_callbacks.core.batch_mixing.result import Mixing


def _per_sample_magnitude(grad: Tensor, dim: int) -> Tensor:
    g = grad.detach().abs().nan_to_num(nan=0.0)
    g = g.movedim(dim, 0).reshape(g.shape[dim], -1)
    return g.amax(dim=1) if g.shape[1] > 0 else g.new_zeros(g.shape[0])


def _vjp_test(
    run: _Run, samples: list[int], size: int, output_dim: int, atol: float
) -> list[Mixing]:
    found: list[Mixing] = []
    for out in run.outputs:
        if not out.tensor.requires_grad:
            continue
        mixing = _test_output(run, out, samples, size, output_dim, atol, interleaved=False)
        if mixing and out.rows > 1:
            # k x B rows: sample i may hold the rows of a flattened sequence-first tensor
            # instead; samples mix only if they do under both readings.
            interleaved = _test_output(
                run, out, samples, size, output_dim, atol, interleaved=True, first_only=True
            )
            if not interleaved:
                mixing = []
        if mixing and _pairwise(out, size, output_dim):
            # [B, B] scores that compare samples on purpose (CLIP's logits_per_image, in-batch
            # retrieval): row i depends on every sample by design, its own entry [i, i] only
            # on sample i. A sample mixes only if its entry does too.
            diagonal = _test_output(
                run, out, samples, size, output_dim, atol, interleaved=False, diagonal=True
            )
            mixed = {m.sample for m in diagonal}
            mixing = [m for m in mixing if m.sample in mixed]
        found += mixing
    return found


def _pairwise(out: _Output, size: int, output_dim: int) -> bool:
    """Whether ``out`` is a ``[B, B]`` matrix of scores between the samples."""
    t = out.tensor
    return output_dim == 0 and out.rows == 1 and t.dim() == 2 and tuple(t.shape) == (size, size)


def _test_output(
    run: _Run,
    out: _Output,
    samples: list[int],
    size: int,
    output_dim: int,
    atol: float,
    interleaved: bool,
    first_only: bool = False,
    diagonal: bool = False,
) -> list[Mixing]:
    """The samples whose part of ``out`` mixes (only the first one with ``first_only``); with
    ``diagonal``, sample ``i``'s part is the entry ``[i, i]`` of a ``[B, B]`` output."""
    found: list[Mixing] = []
    tensors = [leaf.tensor for leaf in run.leaves]
    for i in samples:
        if diagonal:
            part = out.tensor[i, i]
        else:
            part = sample_part(out.tensor, i, size, output_dim, out.rows, interleaved)
        target = part.float().sum()
        grads = torch.autograd.grad(target, tensors, retain_graph=True, allow_unused=True)
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
                    output=out.name,
                    sample=i,
                    sources=sources,
                    inputs=tuple(via),
                    magnitude=float(cross.max()),
                    own_magnitude=float(own),
                    rows=out.rows,
                    interleaved=interleaved,
                )
            )
            if first_only:
                break
    return found

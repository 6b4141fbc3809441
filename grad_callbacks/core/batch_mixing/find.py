"""The face of the batch-mixing test: :func:`find_batch_mixing`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from grad_callbacks.core.batch_mixing.forward import Forward, _run, isolated
from grad_callbacks.core.batch_mixing.leaves import batch_size_of
from grad_callbacks.core.batch_mixing.localise import _localise_all
from grad_callbacks.core.batch_mixing.result import CannotCheckMixing, Mixing
from grad_callbacks.core.batch_mixing.vjp import _vjp_test


def find_batch_mixing(
    forward: Forward,
    inputs: Any,
    *,
    sample_indices: Sequence[int] = (0,),
    input_dim: int = 0,
    output_dim: int = 0,
    module: nn.Module | None = None,
    atol: float = 0.0,
    localize: bool = True,
    batch_size: int | None = None,
) -> list[Mixing]:
    """Which samples' inputs reach the outputs of the samples ``sample_indices``.

    Args:
        forward: called as ``forward(inputs)`` with ``inputs`` rebuilt around tensors that
            require grad (a module works).
        inputs: a tensor or any nesting of tuples, lists, dicts, namedtuples and dataclasses.
        sample_indices: the samples ``i`` whose output is differentiated (negative counts from
            the end).
        input_dim: the batch axis of the input tensors.
        output_dim: the batch axis of the output tensors.
        module: the module ``forward`` runs: enables integer inputs through ``nn.Embedding``,
            localisation, and the isolation of :func:`isolated` (eval-mode BatchNorm, restored
            buffers). Without it only the RNG is forked.
        atol: a cross-sample gradient must exceed this in absolute value to count.
        localize: name the first module whose output mixes (needs ``module``; extra forward
            passes, only when mixing is found).
        batch_size: the batch size; by default the size of dimension ``input_dim`` of the first
            input tensor that has one. Tensors whose dimension ``input_dim`` has another size (a
            hidden state ``(layers, B, H)``, a mask ``(T, T)``) are passed as they are.

    Returns:
        One :class:`Mixing` per output and sample ``i`` that mixes; empty for a correct model.

    Raises:
        CannotCheckMixing: fewer than two samples, no input to differentiate, or no output with
            the batch axis.

    Example:
        >>> import torch
        >>> mean_over_batch = lambda x: x - x.mean(dim=0)
        >>> [m.pairs for m in find_batch_mixing(mean_over_batch, torch.randn(3, 2))]
        [[(0, 1), (0, 2)]]
    """
    size = batch_size if batch_size is not None else batch_size_of(inputs, input_dim)
    if size is None:
        raise CannotCheckMixing(f"the inputs hold no tensor with a dimension {input_dim}")
    if size < 2:
        raise CannotCheckMixing(f"the batch has {size} sample: mixing needs at least two samples")
    samples = sorted({range(size)[i] for i in sample_indices})
    with isolated(module, inputs):
        run = _run(
            forward, inputs, size=size, input_dim=input_dim, output_dim=output_dim, module=module
        )
        found = _vjp_test(run, samples, size, output_dim, atol)
        del run
        if found and localize and module is not None:
            found = _localise_all(
                found,
                forward,
                inputs,
                module,
                size=size,
                input_dim=input_dim,
                output_dim=output_dim,
            )
    return found


"""The per-sample engine's faces: choose a method (vmap, the loop, or vmap falling back to the
loop), stream the chunks into a sink, and the plain batch gradient computed aside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.core.batch import flatten_batch
from grad_callbacks.core.isolation import batchnorm_eval, run_eagerly
from grad_callbacks.core.per_sample.loop import _hook_free_grad, _loop_chunks
from grad_callbacks.core.per_sample.loss import LossFn, _describe, _resolve_params
from grad_callbacks.core.per_sample.sinks import PerSampleStats, _GradsSink, _StatsSink
from grad_callbacks.core.per_sample.types import Method, Randomness
from grad_callbacks.core.per_sample.vmap import _vmap_chunks
from grad_callbacks.core.state import restored_state


class PerSampleGradError(RuntimeError):
    """Per-sample gradients could not be computed by any method (the reasons are in the message)."""



def _run(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None,
    chunk_size: int,
    randomness: Randomness,
    method: Method,
    eval_batchnorm: bool,
    size: int | None,
    make_sink: Callable[[dict[str, Tensor], int], Any],
) -> Any:
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    chosen, module_names = _resolve_params(module, params)
    flat = flatten_batch(batch, size=size)
    reason: str | None = None
    with (
        run_eagerly(),
        batchnorm_eval(module) if eval_batchnorm else nullcontext(),
        torch.enable_grad(),
    ):
        if method in ("auto", "vmap"):
            sink = make_sink(chosen, flat.size)
            try:
                chunks = _vmap_chunks(
                    module, loss_fn, flat, chosen, module_names, chunk_size, randomness
                )
                for start, grads in chunks:
                    sink.add(start, grads)
                return sink.result("vmap", None)
            except Exception as exc:
                if method == "vmap":
                    raise
                reason = _describe(exc)
        sink = make_sink(chosen, flat.size)
        try:
            chunks = _loop_chunks(
                module, loss_fn, batch, flat.size, chosen, module_names, chunk_size
            )
            for start, grads in chunks:
                sink.add(start, grads)
        except Exception as exc:
            if method == "loop":
                raise
            raise PerSampleGradError(
                f"per-sample gradients failed with vmap ({reason}) and with the loop "
                f"({_describe(exc)})"
            ) from exc
        return sink.result("loop", reason)


def per_sample_grad_stats(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 32,
    randomness: Randomness = "same",
    method: Method = "auto",
    eval_batchnorm: bool = False,
    size: int | None = None,
    keep_grads: bool = False,
) -> PerSampleStats:
    """Statistics of the per-sample gradients of ``loss_fn`` over ``batch``.

    Args:
        module: the model; none of its ``.grad``, ``requires_grad``, buffers or train/eval flags
            is changed.
        loss_fn: ``loss_fn(module, batch_of_one) -> scalar``, the loss of one sample given a batch
            of size 1 as :func:`~grad_callbacks.core.batch.slice_batch` makes it.
        batch: the batch (any nesting understood by :mod:`grad_callbacks.core.batch`).
        params: name -> parameter of ``module`` to differentiate; by default every parameter with
            ``requires_grad=True``. Results are keyed by these names.
        chunk_size: per-sample gradients held at once; bounds the extra memory.
        randomness: ``torch.func.vmap`` randomness for random ops such as dropout: ``"same"`` (one
            draw shared by the samples of a chunk), ``"different"`` or ``"error"``. The loop
            draws independently for every sample.
        method: ``"vmap"``, ``"loop"``, or ``"auto"`` (vmap, falling back to the loop on any
            exception; the reason is recorded in :attr:`PerSampleStats.fallback_reason`).
        eval_batchnorm: run with BatchNorm layers in eval mode (see :func:`batchnorm_eval`).
        size: the batch size, when the batch's tensors disagree about their leading dimension.
        keep_grads: also keep every per-sample gradient (``PerSampleStats.grads``), for the
            weighted fit of :mod:`grad_callbacks.core.per_sample.weights`; memory then grows with
            ``B x parameters``.

    Returns:
        A :class:`PerSampleStats` on the module's device (no host-device synchronisation).

    Raises:
        PerSampleGradError: with ``method="auto"``, when both vmap and the loop fail.
        ValueError: for bad arguments, or a batch whose size cannot be told.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, x: m(x).sum()
        >>> stats = per_sample_grad_stats(model, loss_fn, torch.ones(4, 2), method="loop")
        >>> stats.method, stats.mean_grad["weight"]
        ('loop', tensor([[1., 1.]]))
    """
    return _run(
        module,
        loss_fn,
        batch,
        params=params,
        chunk_size=chunk_size,
        randomness=randomness,
        method=method,
        eval_batchnorm=eval_batchnorm,
        size=size,
        make_sink=partial(_StatsSink, keep_grads=keep_grads),
    )


def per_sample_grads(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 32,
    randomness: Randomness = "same",
    method: Method = "auto",
    eval_batchnorm: bool = False,
    size: int | None = None,
) -> dict[str, Tensor]:
    """Every per-sample gradient, materialised: name -> ``[B, *param.shape]``.

    Same arguments and guarantees as :func:`per_sample_grad_stats`, but memory grows with
    ``B x parameters``: meant for small models, debugging and tests.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> per_sample_grads(model, lambda m, b: m(b).sum(), x)["weight"]
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[3., 4.]]])
    """
    return _run(
        module,
        loss_fn,
        batch,
        params=params,
        chunk_size=chunk_size,
        randomness=randomness,
        method=method,
        eval_batchnorm=eval_batchnorm,
        size=size,
        make_sink=_GradsSink,
    )


def loss_grad(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The gradient of ``loss_fn(module, batch)`` with respect to ``params``, computed aside.

    The parameters are swapped for detached copies through ``functional_call``, so hooks
    registered on the live parameters (``Tensor.register_hook``) do not apply: this is the
    gradient of the loss itself, not of whatever the hooks make of it. No ``.grad`` is written
    and every buffer is restored.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = model.weight.register_hook(lambda g: 2 * g)  # a hook that rescales
        >>> g = loss_grad(model, lambda m, x: m(x).sum(), torch.ones(3, 2))
        >>> g["weight"]
        tensor([[3., 3.]])
    """
    chosen, module_names = _resolve_params(module, params)
    with run_eagerly(), restored_state(module):
        return _hook_free_grad(module, loss_fn, batch, chosen, module_names)

"""Per-sample gradients of a module, reduced to streaming statistics.

Pure torch (no Lightning). :func:`per_sample_grad_stats` computes the gradient of the loss of every
sample of a batch with respect to a module's parameters and keeps only what the gradient checks
need: the sum over samples, per-sample squared norms, a per-sample non-finite mask and
per-parameter sums of squared norms. Extra memory is bounded by ``chunk_size`` per-sample
gradients, never by the batch size.

Two ways to get there:

* ``"vmap"``: ``torch.func.vmap(torch.func.grad(f))`` over chunks of the batch, where ``f`` runs the
  user's loss on one sample through ``torch.func.functional_call`` with detached parameters and
  *copies* of the buffers, so in-place buffer updates never reach the live module. Ops without a
  batching rule (``nn.LSTM``, CPU flash attention in torch 2.13) still work through vmap's own
  per-sample fallback, only slower; its "performance drop" warning is silenced.
* ``"loop"``: one ``torch.autograd.grad`` call per sample on the live module (never
  ``.backward()``, so no ``.grad`` is written), with every buffer snapshotted before and restored
  after. It runs what vmap cannot: data-dependent control flow (``if x.sum() > 0``), ``.item()``,
  in-place writes into tensors captured from outside, random ops under ``randomness="error"``,
  batches holding per-sample Python values (a list of B strings).

``"auto"`` tries vmap and falls back to the loop on any exception, recording why.

Random ops: under vmap, ``randomness="same"`` draws once per chunk (so dropout masks, and results,
depend on ``chunk_size``), ``"different"`` once per sample; the loop draws once per sample.

``torch.compile``: a compiled module (or one holding compiled submodules) is run eagerly here
(:func:`run_eagerly`): called with swapped, detached parameters, under vmap or with one sample at a
time, compiled code would fail its guards and recompile at every call, for nothing. The compiled
training graph is left as it was.

Non-invasive: no ``.grad``, ``requires_grad``, buffer or train/eval flag of the module is changed.
Random number streams are NOT protected here: dropout and other random ops consume the global RNG
(a failed vmap attempt too). Callers that need bitwise-identical training fork the RNG around the
call (``torch.random.fork_rng``).

BatchNorm in train mode: each sample is normalised with its own statistics (a batch of one), so
per-sample gradients differ from the batch gradient's decomposition by design (samples interact
through the batch statistics). Under vmap every sample updates its own copy of the running
statistics, so ``BatchNorm2d`` on ``(1, C, H, W)`` samples works. ``BatchNorm1d`` on ``(1, C)``
samples cannot work (one value per channel: "Expected more than 1 value per channel when
training", in vmap and in the loop alike). With ``eval_batchnorm=True`` (or inside
:func:`batchnorm_eval`) BatchNorm layers use their running statistics instead; the gradients are
then those of the eval-mode network. ``torch.func.replace_all_batch_norm_modules_`` is never used:
it mutates the module.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])
    >>> stats = per_sample_grad_stats(model, loss_fn, (x, y))
    >>> stats.method, stats.n, stats.n_finite, tuple(stats.sq_norms.shape)
    ('vmap', 8, 8, (8,))
    >>> batch_grad = torch.autograd.grad(loss_fn(model, (x, y)), model.weight)[0]
    >>> torch.allclose(stats.mean_grad["weight"], batch_grad, atol=1e-6)
    True
"""

from __future__ import annotations

from grad_callbacks.core.isolation import batchnorm_eval, run_eagerly
from grad_callbacks.core.per_sample.engine import (
    PerSampleGradError,
    loss_grad,
    per_sample_grad_stats,
    per_sample_grads,
)
from grad_callbacks.core.per_sample.fit import ScaleFit, fit_scale, gradient_noise_scale
from grad_callbacks.core.per_sample.loss import LossFn as LossFn
from grad_callbacks.core.per_sample.sinks import PerSampleStats
from grad_callbacks.core.per_sample.types import Method as Method
from grad_callbacks.core.per_sample.types import Randomness as Randomness

__all__ = [
    "PerSampleGradError",
    "PerSampleStats",
    "ScaleFit",
    "batchnorm_eval",
    "fit_scale",
    "gradient_noise_scale",
    "loss_grad",
    "per_sample_grad_stats",
    "per_sample_grads",
    "run_eagerly",
]

"""What the per-sample gradients say about the batch gradient: the scale fit and the noise
scale."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from grad_callbacks.core.per_sample.sinks import PerSampleStats, _acc_dtype


@dataclass
class ScaleFit:
    """Least-squares fit ``batch_grad ~ scale * mean_grad`` over all parameters jointly.

    All fields are tensors on the gradients' device.

    Attributes:
        scale: ``c = <g, m> / <m, m>``.
        residual: ``||g - c m|| / ||g||`` over all parameters (0 when g is an exact multiple of m).
        param_residual: per parameter, ``||g_p - c m_p|| / ||g||``; their squares sum to
            ``residual ** 2``, so they say which parameters carry the misfit.
        cosine: cosine similarity of ``g`` and ``m``.
        batch_norm: ``||g||``.
        mean_norm: ``||m||``.
    """

    scale: Tensor
    residual: Tensor
    param_residual: dict[str, Tensor]
    cosine: Tensor
    batch_norm: Tensor
    mean_norm: Tensor


def fit_scale(batch_grad: Mapping[str, Tensor], mean_grad: Mapping[str, Tensor]) -> ScaleFit:
    """Fit ``batch_grad ~ c * mean_grad`` by least squares over all parameters jointly.

    ``c = <g, m> / <m, m>``. For a loss averaged over the batch and no coupling between samples,
    c = 1 and the residual is 0; for a summed loss c = B. A residual well above float noise means
    the batch gradient is not a multiple of the mean per-sample gradient (samples interact, e.g.
    through train-mode BatchNorm).

    Args:
        batch_grad: name -> gradient of the batch-reduced loss.
        mean_grad: name -> mean per-sample gradient; its keys must all be in ``batch_grad``.

    Returns:
        A :class:`ScaleFit` of tensors (no host-device synchronisation). ``scale`` is NaN when
        ``mean_grad`` is all zeros.

    Example:
        >>> import torch
        >>> m = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0])}
        >>> fit = fit_scale({k: 3 * v for k, v in m.items()}, m)
        >>> float(fit.scale), float(fit.residual), float(fit.cosine)
        (3.0, 0.0, 1.0)
    """
    missing = [k for k in mean_grad if k not in batch_grad]
    if missing:
        raise KeyError(f"batch_grad lacks {missing}")
    if not mean_grad:
        raise ValueError("no gradients to fit")
    keys = list(mean_grad)
    g = {k: batch_grad[k].detach().to(_acc_dtype(batch_grad[k].dtype)).flatten() for k in keys}
    m = {k: mean_grad[k].detach().to(g[k].dtype).flatten() for k in keys}
    gm = torch.stack([torch.dot(g[k], m[k]) for k in keys]).sum()
    mm = torch.stack([torch.dot(m[k], m[k]) for k in keys]).sum()
    gg = torch.stack([torch.dot(g[k], g[k]) for k in keys]).sum()
    c = gm / mm
    g_norm, m_norm = gg.sqrt(), mm.sqrt()
    param_res = {k: torch.linalg.vector_norm(g[k] - c * m[k]) / g_norm for k in keys}
    residual = torch.stack(list(param_res.values())).square().sum().sqrt()
    return ScaleFit(
        scale=c,
        residual=residual,
        param_residual=param_res,
        cosine=gm / (g_norm * m_norm),
        batch_norm=g_norm,
        mean_norm=m_norm,
    )


def gradient_noise_scale(stats: PerSampleStats) -> Tensor:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of one batch.

    ``G`` is the mean per-sample gradient and ``tr(Sigma)`` the unbiased estimate of the trace of
    the per-sample gradient covariance, ``(sum_i |g_i|^2 - n |G|^2) / (n - 1)``, over the finite
    samples (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). It estimates
    the batch size above which larger batches stop paying off.

    Args:
        stats: from :func:`per_sample_grad_stats`.

    Returns:
        A 0-dim tensor on the stats' device; NaN when fewer than 2 samples are finite.

    Example:
        >>> import torch
        >>> from grad_callbacks.core.per_sample import per_sample_grad_stats
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> stats = per_sample_grad_stats(model, lambda m, b: m(b).sum(), x)
        >>> float(gradient_noise_scale(stats))  # grads 1 and 3: var 2, mean^2 4
        0.5
    """
    n = stats.finite_count
    sum_sq = torch.stack(list(stats.param_sq_norm_sum.values())).sum()
    mean_sq = torch.stack([g.square().sum() for g in stats.mean_grad.values()]).sum()
    n_f = n.to(sum_sq.dtype)
    trace = ((sum_sq - n_f * mean_sq) / (n_f - 1).clamp_min(1)).clamp_min(0)
    return torch.where(n >= 2, trace / mean_sq, torch.full_like(trace, math.nan))

"""Verdicts on per-sample statistics: reduction, coupling, outliers, gradient mismatch.

Pure torch. Each function takes tensors from :mod:`grad_callbacks.core.per_sample` and returns
plain Python values: they are called on the steps a check is scheduled for, where reading from
the device once is expected.

Thresholds (documented in the checks' docs):

* the batch gradient ``g`` is fitted as ``c * m`` (``m`` the mean per-sample gradient); with a
  relative residual ``||g - c m|| / ||g||`` above ``coupling_tol`` the samples are coupled;
  otherwise ``c`` within ``scale_tol`` (relative) of 1 is a mean, of ``n`` a sum, and anything else
  a scale;
* a sample is an outlier when its gradient norm is at least ``factor`` times the median norm of
  the batch *and* it carries at least ``share`` of the batch's summed squared norms (it dominates
  the batch), *and* it is at least the run's typical per-sample norm (a converged batch's median
  is near zero); natural spread in a well-trained model does not meet all three.

Example:
    >>> classify_scale(scale=16.02, residual=1e-7, n=16)
    'sum'
    >>> classify_scale(scale=1.0, residual=0.3, n=16)
    'coupled'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

COUPLING_TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
MISMATCH_TOL = {"32": 1e-4, "64": 1e-8, "mixed": 2e-2}
#: Below this many finite samples a median says too little to call any sample an outlier.
MIN_OUTLIER_SAMPLES = 8


def coupling_tolerance(dtype: torch.dtype) -> float:
    """The relative residual above which a batch gradient counts as coupled, per dtype."""
    return COUPLING_TOL.get(dtype, 1e-3)


def classify_scale(
    scale: float, residual: float, n: int, *, coupling_tol: float = 1e-3, scale_tol: float = 1e-2
) -> str:
    """``"mean"``, ``"sum"``, ``"scale"`` or ``"coupled"`` for a fit ``g ~ scale * m``.

    Args:
        scale: the fitted ``c``.
        residual: the relative residual of the fit.
        n: the number of samples in the comparison.
        coupling_tol: residual above which the samples are coupled.
        scale_tol: relative distance to 1 or ``n`` still counted as that value.
    """
    if not (residual <= coupling_tol):  # NaN counts as coupled
        return "coupled"
    if abs(scale - 1.0) <= scale_tol:
        return "mean"
    if n > 1 and abs(scale - n) <= scale_tol * n:
        return "sum"
    return "scale"


@dataclass(frozen=True)
class SampleVerdict:
    """Which samples of a batch are non-finite, and which dominate it."""

    nonfinite: tuple[int, ...]
    outliers: tuple[int, ...]
    norm_quantiles: tuple[float, float, float]  # median, 90th percentile, max (finite samples)
    outlier_ratio: float  # largest norm / the reference norm (NaN when the reference is 0)
    reference: float = float("nan")  # the typical per-sample norm the largest was judged against
    run_scale: float = 0.0  # the run's typical per-sample norm that entered the reference


def judge_samples(
    sq_norms: Tensor,
    nonfinite: Tensor,
    *,
    factor: float = 10.0,
    share: float = 0.5,
    run_scale: float = 0.0,
) -> SampleVerdict:
    """Non-finite samples and dominating outliers from per-sample squared gradient norms.

    A sample is an outlier when it dominates its batch (its norm is at least ``factor`` times the
    batch's median norm and ``factor`` times the root-mean-square of the other samples' norms,
    and it carries at least ``share`` of the batch's squared norms) *and* its norm is at least
    ``run_scale``, the run's typical per-sample norm (see :class:`RunNormScale`). The last
    condition keeps a converged batch (nearly every sample fitted, norms near zero) from making
    the one sample still being fitted a 10^11-fold "outlier": that sample's gradient is smaller
    than what any sample had early in the run. ``outlier_ratio`` is the largest norm over the
    larger of the median and ``run_scale``, a ratio to a scale that does not vanish.

    Example:
        >>> import torch
        >>> sq = torch.tensor([1e-24] * 15 + [1e-4])   # converged: one sample left to fit
        >>> judge_samples(sq, torch.zeros(16, dtype=torch.bool)).outliers
        (15,)
        >>> judge_samples(sq, torch.zeros(16, dtype=torch.bool), run_scale=0.5).outliers
        ()
    """
    bad = torch.nonzero(nonfinite).flatten().tolist()
    finite_sq = sq_norms[~nonfinite].double()
    if finite_sq.numel() == 0:
        return SampleVerdict(tuple(bad), (), (float("nan"),) * 3, float("nan"))
    norms = finite_sq.sqrt()
    q = torch.quantile(norms, torch.tensor([0.5, 0.9, 1.0], dtype=norms.dtype)).tolist()
    reference = max(q[0], run_scale)
    ratio = q[2] / reference if reference > 0 else float("nan")
    outliers: list[int] = []
    if finite_sq.numel() >= MIN_OUTLIER_SAMPLES:
        total = finite_sq.sum()
        # The median alone is fooled by a few near-zero gradients (well-fitted samples); the
        # root-mean-square of the *other* samples is not.
        rms_others = ((total - finite_sq) / (finite_sq.numel() - 1)).sqrt()
        dominating = (
            (norms >= factor * q[0])
            & (norms >= factor * rms_others)
            & (finite_sq >= share * total)
            & (norms >= run_scale)
            & (total > 0)
        )
        finite_index = torch.nonzero(~nonfinite).flatten()
        outliers = finite_index[dominating].tolist()
    return SampleVerdict(
        tuple(bad), tuple(outliers), (q[0], q[1], q[2]), ratio, reference, run_scale
    )


@dataclass
class RunNormScale:
    """The run's typical per-sample gradient norm: the largest batch median norm seen so far.

    A batch's median is robust to one bad sample, so an early corrupted sample does not raise it.
    It never decays: per-sample gradients shrink as a run converges, and a scale that followed
    them down would make the one sample still being fitted look like an outlier (its norm over
    a median of near-zero gradients is astronomic, and means nothing).

    Example:
        >>> scale = RunNormScale()
        >>> for median in (0.5, 0.8, 1e-6):
        ...     scale.observe(median)
        >>> scale.value
        0.8
    """

    value: float = 0.0

    def observe(self, median: float) -> None:
        """Take one checked batch's median per-sample norm into account."""
        if math.isfinite(median):
            self.value = max(self.value, median)


def relative_error(seen: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> Tensor:
    """``||seen - expected|| / ||expected||`` over every parameter of ``expected`` (a tensor)."""
    diff = torch.stack(
        [(seen[k].double() - v.double()).square().sum() for k, v in expected.items()]
    ).sum()
    ref = torch.stack([v.double().square().sum() for v in expected.values()]).sum()
    return (diff / ref.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def norm_clip_scale(
    seen: Mapping[str, Tensor], expected: Mapping[str, Tensor], tol: float
) -> float | None:
    """The factor ``c`` in ``(0, 1)`` with ``seen == c * expected`` within ``tol`` (relative), or
    None: what ``torch.nn.utils.clip_grad_norm_`` (or ``LightningModule.clip_gradients``) leaves
    of ``expected`` when the norm exceeded the limit: every gradient scaled by one factor below 1.
    """
    dot = torch.stack([(seen[k].double() * v.double()).sum() for k, v in expected.items()]).sum()
    ref = torch.stack([v.double().square().sum() for v in expected.values()]).sum()
    if float(ref) <= 0.0:
        return None
    c = float(dot / ref)
    if not 0.0 < c < 1.0 - tol:
        return None
    scaled = {k: v * c for k, v in expected.items()}
    return c if float(relative_error(seen, scaled)) <= tol else None


def worst_params(per_param: Mapping[str, Tensor], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` entries with the largest values, as ``(name, value)``."""
    values = torch.stack([v.double() for v in per_param.values()]).tolist()
    ranked = sorted(zip(per_param, values, strict=True), key=lambda kv: -kv[1])
    return [(name, value) for name, value in ranked[:k]]

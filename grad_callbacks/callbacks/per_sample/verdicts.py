"""What PerSampleGradientCheck concludes, as findings: functions that build
:class:`~grad_callbacks.findings.Finding` objects from the numbers a comparison produced; the check
only reports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from grad_callbacks.core.diagnosis import SampleVerdict, worst_params
from grad_callbacks.findings import CODES, Finding, make_finding

CHECK = "PerSampleGradientCheck"


def _over(values: Mapping[str, Tensor], tol: float) -> tuple[str, ...]:
    """Names whose value exceeds ``tol``, in the mapping's (module) order."""
    flags = torch.stack([v.double() > tol for v in values.values()]).tolist()
    return tuple(name for name, flag in zip(values, flags, strict=True) if flag)


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0] or "(root)"


def sample_findings(
    samples: SampleVerdict,
    *,
    step: int,
    n: int,
    batch_idx: int,
    outlier_factor: float,
    outlier_share: float,
) -> list[Finding]:
    """``per-sample-nonfinite`` (then nothing else) or ``per-sample-outlier``."""
    if samples.nonfinite:
        idx = list(samples.nonfinite)
        return [
            make_finding(
                "per-sample-nonfinite",
                check=CHECK,
                step=step,
                message=(
                    f"{len(idx)} of {n} samples have NaN/Inf gradients: batch indices "
                    f"{idx[:20]}{' ...' if len(idx) > 20 else ''} (batch_idx "
                    f"{batch_idx}). Fix: {CODES['per-sample-nonfinite'].fix}."
                ),
                data={"indices": idx, "batch_idx": batch_idx, "samples": n},
            )
        ]
    if samples.outliers:
        idx = list(samples.outliers)
        return [
            make_finding(
                "per-sample-outlier",
                check=CHECK,
                step=step,
                message=(
                    f"sample(s) {idx} of batch_idx {batch_idx} dominate the batch: "
                    f"gradient norm {samples.outlier_ratio:.1f}x the median of {n} samples "
                    f"(threshold {outlier_factor}x and {outlier_share:.0%} of the "
                    f"squared norms). Fix: {CODES['per-sample-outlier'].fix}."
                ),
                data={"indices": idx, "ratio": samples.outlier_ratio, "samples": n},
            )
        ]
    return []


def reduction_findings(
    verdict: str,
    *,
    step: int,
    n: int,
    scale: float,
    residual: float,
    tol: float,
    param_residual: Mapping[str, Tensor],
) -> list[Finding]:
    """``reduction-sum``, ``reduction-scale`` or ``batch-coupling`` for a scale-fit verdict."""
    if verdict == "sum":
        return [
            make_finding(
                "reduction-sum",
                check=CHECK,
                step=step,
                message=(
                    f"the batch gradient is {scale:.2f}x the mean per-sample gradient over "
                    f"{n} samples: the loss is summed over the batch, so the effective "
                    f"learning rate grows with the batch size. "
                    f"Fix: {CODES['reduction-sum'].fix}."
                ),
                data={"scale": scale, "samples": n, "residual": residual},
            )
        ]
    if verdict == "scale":
        return [
            make_finding(
                "reduction-scale",
                check=CHECK,
                step=step,
                message=(
                    f"the batch gradient is {scale:.4g}x the mean per-sample gradient over "
                    f"{n} samples (neither 1 nor the batch size). "
                    f"Fix: {CODES['reduction-scale'].fix}."
                ),
                data={"scale": scale, "samples": n},
            )
        ]
    if verdict == "coupled":
        worst = worst_params(param_residual)
        # Every parameter over the tolerance, in module order: a key stable across steps.
        names = _over(param_residual, tol) or tuple(name for name, _ in worst[:1])
        modules = sorted({_module_of(name) for name in names})
        return [
            make_finding(
                "batch-coupling",
                check=CHECK,
                step=step,
                params=names,
                message=(
                    f"the batch gradient is not a multiple of the mean per-sample gradient "
                    f"(relative residual {residual:.3g} over {n} samples, tolerance {tol:g}): "
                    f"samples influence each other's gradients. Largest residuals in "
                    f"{', '.join(f'{k} ({v:.3g})' for k, v in worst)}; modules "
                    f"{', '.join(modules)}. "
                    f"Fix: {CODES['batch-coupling'].fix}."
                ),
                data={
                    "residual": residual,
                    "scale": scale,
                    "samples": n,
                    "param_residual": dict(worst),
                    "modules": modules,
                },
            )
        ]
    return []


def bn_coupling_finding(*, step: int, n: int, residual: float, reason: str = "") -> Finding:
    """The info ``batch-coupling`` that train-mode BatchNorm explains."""
    text = (
        f"relative residual {residual:.3g}"
        if not math.isnan(residual)
        else "train-mode per-sample gradients could not be computed: " + reason
    )
    return make_finding(
        "batch-coupling",
        severity="info",
        check=CHECK,
        step=step,
        message=(
            f"train-mode BatchNorm couples the samples of a batch ({text}); with "
            f"BatchNorm in eval mode the batch gradient is a multiple of the mean "
            f"per-sample gradient, so BatchNorm explains it. Expected, not a bug."
        ),
        data={"residual": residual, "samples": n, "explained_by": "BatchNorm"},
    )


def mismatch_finding(
    *,
    step: int,
    error: float,
    tol: float,
    microbatches: int,
    per_param: Mapping[str, Tensor],
) -> Finding:
    """``grad-mismatch``: the optimizer's gradient against the replayed loss gradient."""
    worst = worst_params(per_param)
    return make_finding(
        "grad-mismatch",
        check=CHECK,
        step=step,
        params=_over(per_param, tol) or tuple(name for name, _ in worst[:1]),
        message=(
            f"the gradient the optimizer is about to apply differs from the "
            f"gradient of the training loss over the same {microbatches} "
            f"micro-batch(es) by {error:.3g} (relative; tolerance {tol:g}), "
            f"after accounting for accumulate_grad_batches, AMP scaling and DDP "
            f"averaging. Worst: "
            f"{', '.join(f'{k} ({v:.3g})' for k, v in worst)}. "
            f"Fix: {CODES['grad-mismatch'].fix}."
        ),
        data={
            "relative_error": error,
            "tolerance": tol,
            "microbatches": microbatches,
            "per_param": dict(worst),
        },
    )

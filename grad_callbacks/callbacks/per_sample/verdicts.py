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
from grad_callbacks.core.per_sample.weights import Reduction, Weighting, describe_range
from grad_callbacks.findings import CODES, Finding, make_finding

CHECK = "PerSampleGradientCheck"


def _over(values: Mapping[str, Tensor], tol: float) -> tuple[str, ...]:
    """Names whose value exceeds ``tol``, in the mapping's (module) order."""
    flags = torch.stack([v.double() > tol for v in values.values()]).tolist()
    return tuple(name for name, flag in zip(values, flags, strict=True) if flag)


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0] or "(root)"


def _of(n: int, size: int) -> str:
    """``"8 of 32 samples"``: how many samples were compared, of how many in the batch."""
    return f"{n} of {size or n} samples"


def sample_findings(
    samples: SampleVerdict,
    *,
    step: int,
    n: int,
    size: int,
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
                    f"{len(idx)} of the {_of(n, size)} compared have NaN/Inf gradients: batch "
                    f"indices {idx[:20]}{' ...' if len(idx) > 20 else ''} (batch_idx "
                    f"{batch_idx}). Fix: {CODES['per-sample-nonfinite'].fix}."
                ),
                data={"indices": idx, "batch_idx": batch_idx, "samples": n},
            )
        ]
    if samples.outliers:
        idx = list(samples.outliers)
        ratio = samples.outlier_ratio
        times = f"{ratio:.3g}x" if math.isfinite(ratio) else "far above"
        return [
            make_finding(
                "per-sample-outlier",
                check=CHECK,
                step=step,
                message=(
                    f"sample(s) {idx} of batch_idx {batch_idx} dominate the batch: gradient "
                    f"norm {samples.norm_quantiles[2]:.3g}, {times} the typical per-sample norm "
                    f"{_finite(samples.reference)} (the larger of the median of the "
                    f"{_of(n, size)} compared, {_finite(samples.norm_quantiles[0])}, and the "
                    f"run's typical per-sample norm, {samples.run_scale:.3g}; thresholds "
                    f"{outlier_factor}x the median and {outlier_share:.0%} of the squared "
                    f"norms). Fix: {CODES['per-sample-outlier'].fix}."
                ),
                data={
                    "indices": idx,
                    "ratio": ratio if math.isfinite(ratio) else None,
                    "reference": samples.reference,
                    "run_scale": samples.run_scale,
                    "samples": n,
                },
            )
        ]
    return []


def _coupled_message(
    reduction: Reduction, n: int, size: int, tol: float, alone: str | None, declared: bool
) -> str:
    worst = worst_params(reduction.param_residual)
    where = (
        f"Largest residuals in {', '.join(f'{k} ({v:.3g})' for k, v in worst)}"
        if worst and all(math.isfinite(v) for _, v in worst)
        else "No parameter's residual could be computed"
    )
    if alone is not None:
        found = (
            f"one sample alone gives {alone} gradient (over the {_of(n, size)} compared) while "
            f"the batch does: the coupling is in the loss itself (in-batch negatives as in a "
            f"contrastive loss, a softmax or normalisation over the batch axis)"
        )
        if declared:
            return f"{found}, as declared (coupled_loss=True). {where}"
        return (
            f"{found}. If that is intended, declare it: PerSampleGradientCheck(coupled_loss=True)"
            f" (in GradientAudit(checks=[...]) beside the other checks), which reports it as "
            f"info and keeps every other comparison; otherwise look for the operation that "
            f"mixes samples. {where}"
        )
    fitted = "the best per-sample weighting" if reduction.weighted else "equal weights"
    found = (
        f"the batch gradient is not a weighted sum of the per-sample gradients (relative "
        f"residual {_finite(reduction.residual)} after fitting {fitted}, over the "
        f"{_of(n, size)} compared, tolerance {tol:g}): samples influence each other's "
        f"gradients"
    )
    if declared:
        return (
            f"{found}, as the loss is declared to couple them (coupled_loss=True: a "
            f"load-balancing or other batch-level term); mixing inside the model is "
            f"BatchMixingCheck's to find. {where}"
        )
    return f"{found}. {where}"


def _finite(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "undefined"


def reduction_findings(
    reduction: Reduction,
    *,
    step: int,
    n: int,
    size: int,
    tol: float,
    alone: str | None = None,
    coupled_loss: bool = False,
) -> list[Finding]:
    """``reduction-sum``, ``reduction-scale``, ``reduction-weighted`` or ``batch-coupling`` for a
    reduction verdict (nothing for a mean, or a sum over a count the batch carries)."""
    verdict, scale, residual = reduction.verdict, reduction.scale, reduction.residual
    if verdict == "sum":
        return [
            make_finding(
                "reduction-sum",
                check=CHECK,
                step=step,
                message=(
                    f"the batch gradient is {scale:.2f}x the mean per-sample gradient over the "
                    f"{_of(n, size)} compared: the loss is summed over the batch, so the "
                    f"effective learning rate grows with the batch size. "
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
                    f"the batch gradient is {scale:.4g}x the mean per-sample gradient over the "
                    f"{_of(n, size)} compared (neither 1 nor the batch size). "
                    f"Fix: {CODES['reduction-scale'].fix}."
                ),
                data={"scale": scale, "samples": n},
            )
        ]
    if verdict == "weighted":
        return [_weighted_finding(reduction, step=step, n=n, size=size)]
    if verdict == "coupled":
        worst = worst_params(reduction.param_residual)
        # Every parameter over the tolerance, in module order: a key stable across steps.
        names = _over(reduction.param_residual, tol) or tuple(name for name, _ in worst[:1])
        modules = sorted({_module_of(name) for name in names})
        declared = coupled_loss
        return [
            make_finding(
                "batch-coupling",
                severity="info" if declared else None,
                check=CHECK,
                step=step,
                params=names,
                message=(
                    f"{_coupled_message(reduction, n, size, tol, alone, declared)}; modules "
                    f"{', '.join(modules)}. Fix: {CODES['batch-coupling'].fix}."
                ),
                data={
                    "residual": residual if math.isfinite(residual) else None,
                    "scale": scale if math.isfinite(scale) else None,
                    "samples": n,
                    "param_residual": dict(worst),
                    "modules": modules,
                    "weighted_fit": reduction.weighted,
                    "in_the_loss": alone is not None,
                    "declared": declared,
                },
            )
        ]
    return []


def _weighted_finding(reduction: Reduction, *, step: int, n: int, size: int) -> Finding:
    weights = reduction.weights or []
    total = sum(weights)
    follows = reduction.follows
    if follows is not None:
        how = "following" if follows.rule == "class" else "proportional to"
        what = f"{how} {follows.describe()}"
        if reduction.basis:
            what += f", which run from {min(reduction.basis):.3g} to {max(reduction.basis):.3g}"
        if follows.is_count and reduction.own_count:
            what += ": a mean over the batch's tokens"
    else:
        what = (
            "following nothing found in the batch (no -100 labels, mask, weight tensor or class "
            "labels match them)"
        )
    return make_finding(
        "reduction-weighted",
        check=CHECK,
        step=step,
        message=(
            f"the batch loss weights its samples unequally: over the {_of(n, size)} compared, "
            f"the batch gradient is sum_i w_i g_i with weights w_i from "
            f"{describe_range(weights)} (summing to {total:.3g}, relative residual "
            f"{reduction.residual:.2g}), {what}. "
            f"Fix: {CODES['reduction-weighted'].fix}."
        ),
        data={
            "weights": [round(w, 6) for w in weights],
            "weight_sum": total,
            "follows": follows.describe() if follows is not None else None,
            "counts": reduction.basis,
            "residual": reduction.residual,
            "samples": n,
        },
    )


def accumulation_finding(
    *, step: int, follows: Weighting, counts: list[float], accumulate: int, manual: bool = False
) -> Finding:
    """``accumulation-weighting``: each micro-batch's loss is a mean over its own count.

    ``manual``: the accumulation is written by hand in manual optimization (``manual_backward``
    on each micro-batch, the optimizer stepped every ``accumulate`` of them).
    """
    window = (
        f"hand-written accumulation: {accumulate} micro-batches backwarded per optimizer step"
        if manual
        else f"accumulate_grad_batches={accumulate}"
    )
    lo, hi = min(counts), max(counts)
    ratio = hi / lo if lo > 0 else math.inf
    shown = ", ".join(f"{c:g}" for c in counts)
    return make_finding(
        "accumulation-weighting",
        check=CHECK,
        step=step,
        message=(
            f"each micro-batch's loss is a mean over its own {follows.noun()} (the per-sample "
            f"weights fitted on the gradients follow their count), and the {len(counts)} "
            f"micro-batches of this optimizer step hold {shown} of them: a token in the "
            f"micro-batch with {lo:g} weighs "
            + (f"{ratio:.3g}x" if math.isfinite(ratio) else "infinitely more than")
            + f" one in the micro-batch with {hi:g}, so the accumulated gradient is not the "
            f"gradient of the window as one batch ({window}). "
            f"Fix: {CODES['accumulation-weighting'].fix}."
        ),
        data={
            "counts": counts,
            "ratio": ratio if math.isfinite(ratio) else None,
            "follows": follows.describe(),
            "microbatches": len(counts),
            "manual": manual,
        },
    )


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

"""How PerSampleGradientCheck judges one micro-batch: the per-sample comparison (the loss as
:mod:`~grad_callbacks.callbacks.per_sample.losses` obtains it, the gradients as
:class:`~grad_callbacks.callbacks.per_sample.comparison._Comparison` measures them), the verdicts
on its reduction and samples, and the accumulation window's weighting (``accumulation-weighting``).

A mixin of :class:`~grad_callbacks.callbacks.per_sample.check.PerSampleGradientCheck`: it reads
the check's settings and reports through it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from grad_callbacks.callbacks.per_sample.comparison import (
    Measured,
    _Comparison,
    _MicroBatch,
    _stochastic_layers_off,
)
from grad_callbacks.callbacks.per_sample.losses import (
    RandomDraws,
    _NoLoss,
    carried_state,
    sample_losses,
    training_loss,
)
from grad_callbacks.callbacks.per_sample.verdicts import (
    accumulation_finding,
    bn_coupling_finding,
    reduction_findings,
    sample_findings,
)
from grad_callbacks.core.batch import batch_size, slice_batch
from grad_callbacks.core.diagnosis import coupling_tolerance, judge_samples, relative_error
from grad_callbacks.core.per_sample import PerSampleGradError, gradient_noise_scale
from grad_callbacks.core.per_sample.weights import (
    Reduction,
    batch_weightings,
    count_leaves,
    judge_reduction,
    scaled_leaf,
)

#: How a check-skipped names the random streams the loss draws from.
_STREAM_NAMES = {"torch": "torch", "numpy": "NumPy's np.random", "random": "Python's random"}

class _PerSampleJudging:
    """The per-sample comparison and its verdicts, for :class:`PerSampleGradientCheck`."""

    # Set by the check: what the per-sample comparison found last, for the accumulation check,
    # and whether a comparison ran in the current checked step.
    _reduction_now: Reduction | None
    _compared: bool

    def _compare_per_sample(
        self,
        pl_module: pl.LightningModule,
        micro: _MicroBatch,
        params: dict[str, Tensor],
        manual_fn: Any = None,
    ) -> None:
        losses = sample_losses(self.per_sample_loss, pl_module)
        b = batch_size(micro.batch)
        if b is None and losses is not None:
            with (
                micro.isolated(pl_module, self._record),
                torch.no_grad(),
            ):
                b = len(losses(pl_module, micro.batch))
        if b is None:
            self.skip(
                "cannot tell the batch dimension of this batch (no tensors, or tensors whose "
                "leading dimensions disagree); give the module a per_sample_loss(batch) method "
                "or pass per_sample_loss= to the check"
            )
            return
        if b < 2:
            self.skip(f"a batch of {b} sample(s) has no per-sample comparison to make")
            return
        n = min(b, self.max_samples)
        batch = slice_batch(micro.batch, slice(0, n), size=b) if n < b else micro.batch
        carried = carried_state(micro.state, b)
        if isinstance(carried, str):
            self.skip(f"{carried}; give the module a per_sample_loss(batch) method")
            return
        if losses is not None:
            per_sample_fn = lambda m, x: losses(m, x).sum()  # noqa: E731
            batch_fn = (
                training_loss(micro.batch_idx)
                if pl_module.automatic_optimization
                else lambda m, x: losses(m, x).mean()
            )
        elif pl_module.automatic_optimization:
            per_sample_fn = batch_fn = training_loss(micro.batch_idx)
        elif manual_fn is not None:
            per_sample_fn = batch_fn = manual_fn
        else:
            self.skip(
                "manual optimization: training_step steps the optimizers itself and cannot be "
                "recomputed; give the module a per_sample_loss(batch) -> Tensor[B] method"
            )
            return

        packed, per_sample_fn, batch_fn = (
            carried.pack(batch, n), carried.loss(per_sample_fn), carried.loss(batch_fn)
        )
        if losses is None:
            # the step's own random draws (a GAN's latent vectors, a VAE's reparameterisation
            # noise, a diffusion step's timesteps and noise), cut like the batch
            with (
                micro.isolated(pl_module, self._record),
                _stochastic_layers_off(pl_module),
            ):
                draws = RandomDraws.record(batch_fn, pl_module, packed)
            packed, per_sample_fn, batch_fn = (
                draws.pack(packed, n), draws.loss(per_sample_fn), draws.loss(batch_fn)
            )
        comparison = _Comparison(
            pl_module, micro, packed, n, params, per_sample_fn, batch_fn, self.chunk_size,
            self.method, size=b, record=self._record,
        )
        train_bn = any(isinstance(m, _BatchNorm) and m.training for m in pl_module.modules())
        try:
            measured = comparison.fit()
            eval_bn = False
        except _NoLoss as exc:
            self.skip(f"{exc}; return the loss, or define per_sample_loss(batch)")
            return
        except PerSampleGradError as exc:
            if not train_bn:
                raise
            # BatchNorm1d cannot normalise one sample: compare the eval-mode network instead. If
            # something else failed, the eval-mode attempt fails too and the check is skipped.
            measured = comparison.fit(eval_bn=True)
            eval_bn = True
            self.report(
                bn_coupling_finding(
                    step=self.current_step, n=n, residual=float("nan"), reason=str(exc)
                )
            )
        self.last_stats = measured.stats
        self._judge(comparison, measured, train_bn and not eval_bn)

    def _judge(self, comparison: _Comparison, measured: Measured, train_bn: bool) -> None:
        self._compared = True
        step, n, micro = self.current_step, comparison.n, comparison.micro
        stats, fit = measured.stats, measured.fit
        samples = judge_samples(
            stats.sq_norms,
            stats.nonfinite,
            factor=self.outlier_factor,
            share=self.outlier_share,
            run_scale=self._norm_scale.value,
        )
        self._norm_scale.observe(samples.norm_quantiles[0])
        scale, residual, cosine = (float(v) for v in (fit.scale, fit.residual, fit.cosine))
        scalars = {
            "samples": n,
            "norm_median": samples.norm_quantiles[0],
            "norm_p90": samples.norm_quantiles[1],
            "norm_max": samples.norm_quantiles[2],
            "noise_scale": float(gradient_noise_scale(stats)),
        }
        for finding in sample_findings(
            samples,
            step=step,
            n=n,
            size=comparison.size,
            batch_idx=micro.batch_idx,
            outlier_factor=self.outlier_factor,
            outlier_share=self.outlier_share,
        ):
            self.report(finding)
        if samples.nonfinite:
            self.queue_scalars(scalars)
            return  # the batch gradient is non-finite too: nothing more to compare
        scalars.update({"scale": scale, "residual": residual, "cosine": cosine})
        dtype = next(iter(comparison.params.values())).dtype
        tol = coupling_tolerance(dtype)
        reduction = self._reduction(comparison, measured, tol)
        if reduction.weighted:
            scalars["weighted_residual"] = reduction.residual
        self.queue_scalars(scalars)
        streams = comparison.random_streams(tol) if reduction.verdict == "coupled" else []
        if streams:
            names = ", ".join(_STREAM_NAMES[s] for s in streams)
            self.skip(
                f"the training loss draws random numbers outside dropout layers ({names}: noise "
                "augmentation, random masking or flips in training_step), which the batch and "
                "the per-sample passes cannot share, so their comparison says nothing; give the "
                "module a per_sample_loss(batch) that draws none, or guard the noise with "
                "`if self.training:`"
            )
            return
        if reduction.verdict == "coupled" and train_bn:
            in_eval = self._reduction(comparison, comparison.fit(eval_bn=True), tol)
            if in_eval.verdict != "coupled":
                self.report(bn_coupling_finding(step=step, n=n, residual=reduction.residual))
                reduction = in_eval
        if reduction.verdict == "sum" and self._normalized_by_a_count(comparison, measured, tol):
            reduction.verdict = "window-mean"
        if reduction.own_count:
            self._own_count = reduction.follows
        self._reduction_now = reduction
        for finding in reduction_findings(
            reduction,
            step=step,
            n=n,
            size=comparison.size,
            tol=tol,
            alone=_alone(measured),
            coupled_loss=self.coupled_loss,
        ):
            self.report(finding)

    def _check_accumulation(self, batches: list[Any], manual: bool = False) -> None:
        """``accumulation-weighting``: the loss is a mean over its own micro-batch's count
        (seen from the fitted weights, now or at an earlier step when this step's compared
        samples all hold the same count) and the window's micro-batches (``batches``, in order)
        hold different counts. ``manual``: the window is hand-written accumulation."""
        reduction, follows = self._reduction_now, self._own_count
        if reduction is None or follows is None:
            return
        if not (reduction.own_count or reduction.verdict == "mean"):
            return
        counts = []
        for batch in batches:
            size = batch_size(batch)
            basis = follows.basis(batch, size) if size else None
            if basis is None or basis.dim() != 1:
                return
            counts.append(float(basis.sum()))
        if max(counts) > min(counts):
            self.report(
                accumulation_finding(
                    step=self.current_step,
                    follows=follows,
                    counts=counts,
                    accumulate=len(batches),
                    manual=manual,
                )
            )

    @staticmethod
    def _reduction(comparison: _Comparison, measured: Measured, tol: float) -> Reduction:
        weightings = []
        for w in batch_weightings(comparison.batch, comparison.n):
            basis = w.basis(comparison.batch, comparison.n)
            if basis is not None:
                weightings.append((w, basis.to(_device_of(measured))))
        return judge_reduction(measured.fit, measured.gram, weightings, comparison.n, tol)

    @staticmethod
    def _normalized_by_a_count(comparison: _Comparison, measured: Measured, tol: float) -> bool:
        """Whether the summed loss divides by a count the batch carries (the
        ``num_items_in_batch`` recipe): doubling it halves the gradient. The loss is then a mean
        over that count's tokens at the optimizer step, not a sum."""
        for path in count_leaves(comparison.batch, comparison.n):
            doubled = comparison.batch_grad_of(scaled_leaf(comparison.batch, path, 2))
            half = {k: v / 2 for k, v in measured.batch_grad.items()}
            if float(relative_error(doubled, half)) <= tol:
                return True
        return False


def _device_of(measured: Measured) -> torch.device:
    return next(iter(measured.batch_grad.values())).device


def _alone(measured: Measured) -> str | None:
    """``"no"`` or ``"the same"`` when one sample alone gives no gradient, or the same gradient
    for every sample (the loss couples samples by design), else None."""
    gram = measured.gram
    if gram is None:
        return None
    k = torch.stack(list(gram.gram.values())).sum(0)
    batch_sq = float(torch.stack(list(gram.batch_sq.values())).sum())
    diag = k.diagonal()
    if float(diag.sum()) <= 1e-12 * batch_sq * k.shape[0]:
        return "no"
    # sum_i ||g_i - mean||^2 against sum_i ||g_i||^2
    spread = float(diag.sum() - k.sum() / k.shape[0])
    return "the same" if spread <= 1e-6 * float(diag.sum()) else None

"""PerSampleGradientCheck: per-sample gradients against the batch-reduced gradient.

On scheduled steps (every ``every_n_steps`` optimizer steps, the first step included) the check
recomputes, beside the run and without touching it:

* the per-sample gradients of the training loss for up to ``max_samples`` samples of the batch
  (``torch.func`` vmap, or a loop where vmap cannot run the model), and the gradient of the same
  batch-reduced loss; the fit ``batch ~ c * mean(per-sample)`` says whether the loss is a mean
  (c = 1), a sum (c = B, ``reduction-sum``), another scale (``reduction-scale``), or whether the
  samples are coupled (``batch-coupling``; info when train-mode BatchNorm explains it);
* non-finite (``per-sample-nonfinite``) and dominating (``per-sample-outlier``) samples;
* the gradient the optimizer sees (at ``on_before_optimizer_step``, unscaled, before clipping)
  against the gradient of the training loss over the same accumulation window, replayed with
  the same random numbers (``grad-mismatch``), in automatic optimization.

The loss of one sample is ``training_step`` on a slice of the batch, run with ``self.log`` muted,
the random number generators forked and buffers and metric states restored
(:func:`~grad_callbacks.callbacks.recompute.isolated`). Dropout and other stochastic layers are
switched to eval mode for the per-sample comparison, so the batch and per-sample passes see the
same deterministic network; the ``grad-mismatch`` replay keeps them in train mode with the
step's own random numbers. A LightningModule may define ``per_sample_loss(batch) -> Tensor[B]``
(or the callback take ``per_sample_loss=fn(module, batch)``) for losses that slicing cannot
express; manual optimization needs it, since its ``training_step`` steps the optimizers itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.recompute import RngState, capture_rng, isolated
from grad_callbacks.core.batch import batch_size, slice_batch
from grad_callbacks.core.diagnosis import (
    MISMATCH_TOL,
    classify_scale,
    coupling_tolerance,
    judge_samples,
    relative_error,
    worst_params,
)
from grad_callbacks.core.per_sample import (
    PerSampleGradError,
    PerSampleStats,
    ScaleFit,
    batchnorm_eval,
    fit_scale,
    gradient_noise_scale,
    loss_grad,
    per_sample_grad_stats,
)
from grad_callbacks.findings import CODES, make_finding

PerSampleLoss = Callable[[nn.Module, Any], Tensor]


class _NoLoss(RuntimeError):
    """training_step returned no loss."""


@dataclass(frozen=True)
class _MicroBatch:
    batch: Any
    batch_idx: int
    rng: RngState


@dataclass(frozen=True)
class _Comparison:
    """One per-sample comparison: a batch, the parameters, and the two losses to differentiate."""

    pl_module: pl.LightningModule
    micro: _MicroBatch
    batch: Any
    n: int
    params: dict[str, Tensor]
    per_sample_fn: Callable[[nn.Module, Any], Tensor]
    batch_fn: Callable[[nn.Module, Any], Tensor]
    chunk_size: int
    method: str

    def fit(self, eval_bn: bool = False) -> tuple[ScaleFit, PerSampleStats]:
        """Per-sample statistics and the fit of the batch gradient on their mean."""
        with (
            isolated(self.pl_module, rng_state=self.micro.rng),
            _stochastic_layers_off(self.pl_module),
            batchnorm_eval(self.pl_module) if eval_bn else nullcontext(),
        ):
            batch_grad = loss_grad(self.pl_module, self.batch_fn, self.batch, params=self.params)
            stats = per_sample_grad_stats(
                self.pl_module,
                self.per_sample_fn,
                self.batch,
                params=self.params,
                chunk_size=self.chunk_size,
                method=self.method,  # type: ignore[arg-type]
                size=self.n,
            )
        return fit_scale(batch_grad, stats.mean_grad), stats

    def loss_is_random(self, tol: float) -> bool:
        """Whether the batch gradient changes with the random stream, dropout layers off.

        Noise drawn in ``training_step`` itself (``torch.randn_like`` augmentation, random
        masking) cannot be drawn alike in the batch and per-sample passes, so their difference
        says nothing about coupling.
        """
        grads = []
        module = self.pl_module
        for seed in (None, 1234567):
            with isolated(module, rng_state=self.micro.rng), _stochastic_layers_off(module):
                if seed is not None:
                    torch.manual_seed(seed)
                grads.append(loss_grad(module, self.batch_fn, self.batch, params=self.params))
        return float(relative_error(grads[1], grads[0])) > tol


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise _NoLoss(
        "training_step returned "
        + ("None" if output is None else type(output).__name__)
        + " instead of a loss tensor (or a dict with 'loss')"
    )


@contextmanager
def _stochastic_layers_off(module: nn.Module) -> Iterator[None]:
    """Every submodule but normalization layers in eval mode; each flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            if not isinstance(m, _BatchNorm):
                m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _over(values: Mapping[str, Tensor], tol: float) -> tuple[str, ...]:
    """Names whose value exceeds ``tol``, in the mapping's (module) order."""
    flags = torch.stack([v.double() > tol for v in values.values()]).tolist()
    return tuple(name for name, flag in zip(values, flags, strict=True) if flag)


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0] or "(root)"


class PerSampleGradientCheck(AuditCallback):
    """Compares per-sample gradients with the batch-reduced gradient and the optimizer's gradient.

    Findings: ``reduction-sum``, ``reduction-scale``, ``batch-coupling``,
    ``per-sample-nonfinite``, ``per-sample-outlier``, ``grad-mismatch``, ``check-skipped``.

    Args:
        every_n_steps: check every this many optimizer steps (the first step is always checked).
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.
        max_samples: per-sample gradients are computed for the first this many samples.
        chunk_size: per-sample gradients held in memory at once (default: all ``max_samples`` in
            one vmap call, the fastest way on the benchmarks).
        method: ``"auto"`` (vmap, falling back to a loop), ``"vmap"`` or ``"loop"``.
        per_sample_loss: ``fn(module, batch) -> Tensor[B]``, the loss of every sample, for losses
            that slicing ``training_step``'s batch cannot express (default: the module's
            ``per_sample_loss`` method if it has one, else ``training_step``).
        outlier_factor: a sample is an outlier when its gradient norm is at least this many
            times the median and the root-mean-square of the other samples' norms...
        outlier_share: ...and it carries at least this share of the batch's squared norms.
        check_optimizer_grad: compare the optimizer's gradient with the loss's (``grad-mismatch``).

    Example:
        >>> import lightning as L
        >>> check = PerSampleGradientCheck(every_n_steps=50)
        >>> trainer = L.Trainer(callbacks=[check])  # doctest: +SKIP
    """

    check_name = "PerSampleGradientCheck"
    metric_prefix = "per_sample"

    def __init__(
        self,
        *,
        every_n_steps: int = 100,
        on_finding: OnFinding = "warn",
        max_samples: int = 32,
        chunk_size: int = 32,
        method: str = "auto",
        per_sample_loss: PerSampleLoss | None = None,
        outlier_factor: float = 10.0,
        outlier_share: float = 0.5,
        check_optimizer_grad: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2, got {max_samples}")
        self.max_samples = max_samples
        self.chunk_size = chunk_size
        self.method = method
        self.per_sample_loss = per_sample_loss
        self.outlier_factor = outlier_factor
        self.outlier_share = outlier_share
        self.check_optimizer_grad = check_optimizer_grad
        self._window: list[_MicroBatch] = []
        self._window_step: int | None = None
        self._done_steps: set[int] = set()
        self._next_due = 0
        # (step, seconds) of a run made before the budget knew the step time (the first one)
        self._unplanned: tuple[int, float] | None = None
        self.last_stats: PerSampleStats | None = None

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "max_samples": self.max_samples,
            "chunk_size": self.chunk_size,
            "method": self.method,
            "outlier_factor": self.outlier_factor,
            "outlier_share": self.outlier_share,
            "check_optimizer_grad": self.check_optimizer_grad,
        }

    def report_entry(self) -> dict[str, Any]:
        entry = super().report_entry()
        if self.last_stats is not None:
            entry["per_sample_method"] = self.last_stats.method
            entry["vmap_fallback_reason"] = self.last_stats.fallback_reason
        return entry

    # ------------------------------------------------------------------ schedule
    def is_scheduled(self, step: int) -> bool:
        """Whether optimizer step ``step`` is checked: the first step, then every
        ``every_n_steps`` steps, or further apart when an overhead budget asks for it."""
        return step >= self._next_due

    def _plan_next_run(self, trainer: pl.Trainer, step: int, run_seconds: float) -> None:
        interval = self.every_n_steps
        if self.budget is not None:
            if self.budget.step_seconds is None:
                # Planned at the next batch, once a training step has been timed.
                self._unplanned = (step, run_seconds)
                self._next_due = step + interval
                return
            interval = max(interval, self.budget.interval(run_seconds, self.budget_share))
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank runs on the same steps (the grad-mismatch collective needs it), so the
            # ranks agree on the longest of their intervals.
            agreed = torch.tensor([float(interval)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            interval = int(agreed.item())
        self._next_due = step + interval

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._unplanned is not None and self.budget and self.budget.step_seconds is not None:
            ran_at, seconds = self._unplanned
            self._unplanned = None
            self._plan_next_run(trainer, ran_at, seconds)
        step = trainer.global_step
        if not self.is_scheduled(step) or step in self._done_steps:
            return
        if self._window_step != step:
            self._window, self._window_step = [], step
        # The generators' state before training_step: the replay draws the same dropout masks.
        self._window.append(_MicroBatch(batch, batch_idx, capture_rng()))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window, self._window_step = [], None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        if self._window_step != step or not self._window or step in self._done_steps:
            return
        window, self._window, self._window_step = self._window, [], None
        self._done_steps = {step}
        spent_before = self.seconds_spent
        with self.timed():
            self.steps_checked += 1
            raw = getattr(optimizer, "_optimizer", optimizer)
            params = self._params_of(pl_module, raw)
            if params:
                with self.guarded("the per-sample comparison"):
                    self._compare_per_sample(pl_module, window[-1], params)
                if self.check_optimizer_grad:
                    self._check_optimizer_grad(trainer, pl_module, raw, window, params)
        self._plan_next_run(trainer, step, self.seconds_spent - spent_before)

    # ------------------------------------------------------------------ losses
    def _training_loss(self, batch_idx: int) -> Callable[[nn.Module, Any], Tensor]:
        def loss(module: nn.Module, batch: Any) -> Tensor:
            return _loss_of(module.training_step(batch, batch_idx))  # type: ignore[operator]

        return loss

    def _sample_losses(self, pl_module: pl.LightningModule) -> PerSampleLoss | None:
        if self.per_sample_loss is not None:
            return self.per_sample_loss
        method = getattr(pl_module, "per_sample_loss", None)
        if callable(method):
            return lambda module, batch: module.per_sample_loss(batch)  # type: ignore[operator]
        return None

    @staticmethod
    def _params_of(pl_module: pl.LightningModule, optimizer: Any) -> dict[str, Tensor]:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return {
            name: p
            for name, p in pl_module.named_parameters()
            if id(p) in owned and p.requires_grad
        }

    # ------------------------------------------------------------------ per-sample comparison
    def _compare_per_sample(
        self, pl_module: pl.LightningModule, micro: _MicroBatch, params: dict[str, Tensor]
    ) -> None:
        sample_losses = self._sample_losses(pl_module)
        b = batch_size(micro.batch)
        if b is None and sample_losses is not None:
            with isolated(pl_module, rng_state=micro.rng), torch.no_grad():
                b = len(sample_losses(pl_module, micro.batch))
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
        if sample_losses is not None:
            per_sample_fn = lambda m, x: sample_losses(m, x).sum()  # noqa: E731
            batch_fn = (
                self._training_loss(micro.batch_idx)
                if pl_module.automatic_optimization
                else lambda m, x: sample_losses(m, x).mean()
            )
        elif pl_module.automatic_optimization:
            per_sample_fn = batch_fn = self._training_loss(micro.batch_idx)
        else:
            self.skip(
                "manual optimization: training_step steps the optimizers itself and cannot be "
                "recomputed; give the module a per_sample_loss(batch) -> Tensor[B] method"
            )
            return

        comparison = _Comparison(
            pl_module, micro, batch, n, params, per_sample_fn, batch_fn, self.chunk_size,
            self.method,
        )
        train_bn = any(isinstance(m, _BatchNorm) and m.training for m in pl_module.modules())
        try:
            fit, stats = comparison.fit()
            eval_bn = False
        except _NoLoss as exc:
            self.skip(f"{exc}; return the loss, or define per_sample_loss(batch)")
            return
        except PerSampleGradError as exc:
            if not train_bn:
                raise
            # BatchNorm1d cannot normalise one sample: compare the eval-mode network instead. If
            # something else failed, the eval-mode attempt fails too and the check is skipped.
            fit, stats = comparison.fit(eval_bn=True)
            eval_bn = True
            self._report_bn_coupling(fit=None, n=n, reason=str(exc))
        self.last_stats = stats
        self._judge(comparison, fit, stats, train_bn and not eval_bn)

    def _judge(
        self, comparison: _Comparison, fit: ScaleFit, stats: PerSampleStats, train_bn: bool
    ) -> None:
        step, n, micro = self.current_step, comparison.n, comparison.micro
        samples = judge_samples(
            stats.sq_norms, stats.nonfinite, factor=self.outlier_factor, share=self.outlier_share
        )
        scale, residual, cosine = (float(v) for v in (fit.scale, fit.residual, fit.cosine))
        scalars = {
            "samples": n,
            "norm_median": samples.norm_quantiles[0],
            "norm_p90": samples.norm_quantiles[1],
            "norm_max": samples.norm_quantiles[2],
            "noise_scale": float(gradient_noise_scale(stats)),
        }
        if samples.nonfinite:
            idx = list(samples.nonfinite)
            self.report(
                make_finding(
                    "per-sample-nonfinite",
                    check=self.check_name,
                    step=step,
                    message=(
                        f"{len(idx)} of {n} samples have NaN/Inf gradients: batch indices "
                        f"{idx[:20]}{' ...' if len(idx) > 20 else ''} (batch_idx "
                        f"{micro.batch_idx}). Fix: {CODES['per-sample-nonfinite'].fix}."
                    ),
                    data={"indices": idx, "batch_idx": micro.batch_idx, "samples": n},
                )
            )
            self.queue_scalars(scalars)
            return  # the batch gradient is non-finite too: nothing more to compare
        scalars.update({"scale": scale, "residual": residual, "cosine": cosine})
        self.queue_scalars(scalars)
        if samples.outliers:
            idx = list(samples.outliers)
            self.report(
                make_finding(
                    "per-sample-outlier",
                    check=self.check_name,
                    step=step,
                    message=(
                        f"sample(s) {idx} of batch_idx {micro.batch_idx} dominate the batch: "
                        f"gradient norm {samples.outlier_ratio:.1f}x the median of {n} samples "
                        f"(threshold {self.outlier_factor}x and {self.outlier_share:.0%} of the "
                        f"squared norms). Fix: {CODES['per-sample-outlier'].fix}."
                    ),
                    data={"indices": idx, "ratio": samples.outlier_ratio, "samples": n},
                )
            )
        dtype = next(iter(comparison.params.values())).dtype
        tol = coupling_tolerance(dtype)
        verdict = classify_scale(scale, residual, n, coupling_tol=tol)
        if verdict == "coupled" and comparison.loss_is_random(tol):
            self.skip(
                "the training loss draws random numbers outside dropout layers (noise "
                "augmentation, random masking in training_step), which the batch and the "
                "per-sample passes cannot share, so their comparison says nothing; give the "
                "module a per_sample_loss(batch) that draws none, or guard the noise with "
                "`if self.training:`"
            )
            return
        if verdict == "coupled" and train_bn:
            eval_fit, _ = comparison.fit(eval_bn=True)
            eval_scale, eval_residual = float(eval_fit.scale), float(eval_fit.residual)
            eval_verdict = classify_scale(eval_scale, eval_residual, n, coupling_tol=tol)
            if eval_verdict != "coupled":
                self._report_bn_coupling(fit=fit, n=n)
                scale, residual, verdict = eval_scale, eval_residual, eval_verdict
        if verdict == "sum":
            self.report(
                make_finding(
                    "reduction-sum",
                    check=self.check_name,
                    step=step,
                    message=(
                        f"the batch gradient is {scale:.2f}x the mean per-sample gradient over "
                        f"{n} samples: the loss is summed over the batch, so the effective "
                        f"learning rate grows with the batch size. "
                        f"Fix: {CODES['reduction-sum'].fix}."
                    ),
                    data={"scale": scale, "samples": n, "residual": residual},
                )
            )
        elif verdict == "scale":
            self.report(
                make_finding(
                    "reduction-scale",
                    check=self.check_name,
                    step=step,
                    message=(
                        f"the batch gradient is {scale:.4g}x the mean per-sample gradient over "
                        f"{n} samples (neither 1 nor the batch size). "
                        f"Fix: {CODES['reduction-scale'].fix}."
                    ),
                    data={"scale": scale, "samples": n},
                )
            )
        elif verdict == "coupled":
            worst = worst_params(fit.param_residual)
            # Every parameter over the tolerance, in module order: a key stable across steps.
            names = _over(fit.param_residual, tol) or tuple(name for name, _ in worst[:1])
            modules = sorted({_module_of(name) for name in names})
            self.report(
                make_finding(
                    "batch-coupling",
                    check=self.check_name,
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
            )

    def _report_bn_coupling(self, fit: ScaleFit | None, n: int, reason: str = "") -> None:
        residual = float(fit.residual) if fit is not None else float("nan")
        text = (
            f"relative residual {residual:.3g}" if not math.isnan(residual)
            else "train-mode per-sample gradients could not be computed: " + reason
        )
        self.report(
            make_finding(
                "batch-coupling",
                severity="info",
                check=self.check_name,
                step=self.current_step,
                message=(
                    f"train-mode BatchNorm couples the samples of a batch ({text}); with "
                    f"BatchNorm in eval mode the batch gradient is a multiple of the mean "
                    f"per-sample gradient, so BatchNorm explains it. Expected, not a bug."
                ),
                data={"residual": residual, "samples": n, "explained_by": "BatchNorm"},
            )
        )

    # ------------------------------------------------------------------ optimizer gradient
    def _check_optimizer_grad(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        window: list[_MicroBatch],
        params: dict[str, Tensor],
    ) -> None:
        if not pl_module.automatic_optimization:
            return
        live = {k: p.grad for k, p in params.items() if p.grad is not None}
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        recomputed: dict[str, Tensor] | None = None
        with self.guarded("the optimizer-gradient comparison"):
            recomputed = self._replay_window(trainer, pl_module, optimizer, window, live)
        if distributed:
            recomputed = self._average_over_ranks(live, recomputed)
        if recomputed is None or not live:
            return
        with self.guarded("the optimizer-gradient comparison"):
            finite = torch.stack([torch.isfinite(g).all() for g in live.values()]).all()
            if not bool(finite):
                return  # an overflow step that the GradScaler skips: nothing to compare
            error = float(relative_error(live, recomputed))
            precision = str(trainer.precision)
            tol = MISMATCH_TOL[
                "mixed" if "mixed" in precision else "64" if "64" in precision else "32"
            ]
            self.queue_scalars({"optimizer_grad_error": error})
            if error > tol:
                per_param = {
                    k: relative_error({k: live[k]}, {k: recomputed[k]}) for k in recomputed
                }
                worst = worst_params(per_param)
                self.report(
                    make_finding(
                        "grad-mismatch",
                        check=self.check_name,
                        step=self.current_step,
                        params=_over(per_param, tol) or tuple(name for name, _ in worst[:1]),
                        message=(
                            f"the gradient the optimizer is about to apply differs from the "
                            f"gradient of the training loss over the same {len(window)} "
                            f"micro-batch(es) by {error:.3g} (relative; tolerance {tol:g}), "
                            f"after accounting for accumulate_grad_batches, AMP scaling and DDP "
                            f"averaging. Worst: "
                            f"{', '.join(f'{k} ({v:.3g})' for k, v in worst)}. "
                            f"Fix: {CODES['grad-mismatch'].fix}."
                        ),
                        data={
                            "relative_error": error,
                            "tolerance": tol,
                            "microbatches": len(window),
                            "per_param": dict(worst),
                        },
                    )
                )

    def _replay_window(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        window: list[_MicroBatch],
        live: Mapping[str, Tensor],
    ) -> dict[str, Tensor] | None:
        if not live:
            return None
        accumulate = int(trainer.accumulate_grad_batches)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        # Fused optimizers that step with the scaler keep their gradients scaled here.
        still_scaled = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        params = {k: v for k, v in self._params_of(pl_module, optimizer).items() if k in live}
        total: dict[str, Tensor] | None = None
        for micro in window:
            loss_fn = self._training_loss(micro.batch_idx)

            def scaled(m: nn.Module, b: Any, fn: Any = loss_fn) -> Tensor:
                return fn(m, b) * scale / accumulate

            with (
                isolated(pl_module, rng_state=micro.rng),
                trainer.precision_plugin.forward_context(),
            ):
                grads = loss_grad(pl_module, scaled, micro.batch, params=params)
            total = grads if total is None else {k: total[k] + grads[k] for k in total}
        if total is None:
            return None
        if not still_scaled and scale != 1.0:
            total = {k: v * (1.0 / scale) for k, v in total.items()}
        return total

    @staticmethod
    def _average_over_ranks(
        live: Mapping[str, Tensor], recomputed: dict[str, Tensor] | None
    ) -> dict[str, Tensor] | None:
        """All-reduce the recomputed gradients; every rank enters, failed or not."""
        keys = list(live)
        ok = recomputed is not None and all(k in recomputed for k in keys)
        parts = [(recomputed[k] if ok else torch.zeros_like(live[k])).flatten() for k in keys]  # type: ignore[index]
        device = parts[0].device if parts else torch.device("cpu")
        flat = torch.cat([*parts, torch.tensor([1.0 if ok else 0.0], device=device)])
        torch.distributed.all_reduce(flat)
        world = torch.distributed.get_world_size()
        if float(flat[-1]) < world:
            return None
        averaged: dict[str, Tensor] = {}
        offset = 0
        for k in keys:
            size = live[k].numel()
            averaged[k] = (flat[offset : offset + size] / world).view_as(live[k])
            offset += size
        return averaged

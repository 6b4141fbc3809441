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
  the same random numbers (``grad-mismatch``).

The loss of one sample is ``training_step`` on a slice of the batch, run with ``self.log`` muted,
the random number generators forked and buffers and metric states restored
(:func:`~grad_callbacks.callbacks.recompute.isolated`). Dropout and other stochastic layers are
switched to eval mode for the per-sample comparison, so the batch and per-sample passes see the
same deterministic network; the ``grad-mismatch`` replay keeps them in train mode with the
step's own random numbers. A LightningModule may define ``per_sample_loss(batch) -> Tensor[B]``
(or the callback take ``per_sample_loss=fn(module, batch)``) for losses that slicing cannot
express. The module's Python state before the step is captured, so a ``training_step`` that
carries state (an RNN's hidden state) is replayed from where the real step started
(:mod:`~grad_callbacks.callbacks.per_sample.losses`).

In manual optimization the check runs at the end of a checked batch: ``training_step`` is
replayed with the optimizers inert and recording, and the losses handed to ``manual_backward``
before each optimizer step are that step's loss, checked per sample and against the gradient
the optimizer stepped on (:mod:`~grad_callbacks.callbacks.per_sample.manual`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.per_sample.comparison import (
    Measured,
    _Comparison,
    _MicroBatch,
    _stochastic_layers_off,
)
from grad_callbacks.callbacks.per_sample.losses import (
    PerSampleLoss,
    RandomDraws,
    _NoLoss,
    carried_state,
    manual_step_losses,
    manual_steps,
    sample_losses,
    training_loss,
)
from grad_callbacks.callbacks.per_sample.manual import manual_step_grads
from grad_callbacks.callbacks.per_sample.replay import (
    average_over_ranks,
    params_of,
    replay_window,
)
from grad_callbacks.callbacks.per_sample.verdicts import (
    accumulation_finding,
    bn_coupling_finding,
    mismatch_finding,
    reduction_findings,
    sample_findings,
)
from grad_callbacks.callbacks.recompute import (
    ManualSteps,
    Recomputations,
    capture_rng,
    capture_state,
    isolated,
)
from grad_callbacks.core.batch import batch_size, slice_batch
from grad_callbacks.core.diagnosis import (
    MISMATCH_TOL,
    RunNormScale,
    coupling_tolerance,
    judge_samples,
    relative_error,
)
from grad_callbacks.core.per_sample import (
    PerSampleGradError,
    PerSampleStats,
    gradient_noise_scale,
)
from grad_callbacks.core.per_sample.weights import (
    Reduction,
    Weighting,
    batch_weightings,
    count_leaves,
    judge_reduction,
    scaled_leaf,
)


def _optimized_params(trainer: pl.Trainer, clone: bool) -> dict[int, Tensor]:
    """The values of every parameter the trainer's optimizers step, by parameter id."""
    return {
        id(p): (p.detach().clone() if clone else p.detach())
        for opt in trainer.optimizers
        for group in opt.param_groups
        for p in group["params"]
    }


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
        recompute: False forbids running ``training_step`` (or the model) again: the check
            then does nothing and reports ``check-skipped`` once (everything it compares is a
            recomputation).

    Example:
        >>> import lightning as L
        >>> check = PerSampleGradientCheck(every_n_steps=50)
        >>> trainer = L.Trainer(callbacks=[check])  # doctest: +SKIP
    """

    check_name = "PerSampleGradientCheck"
    metric_prefix = "per_sample"
    live_attributes = ("_window", "_manual")

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
        recompute: bool = True,
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
        self.recompute = recompute
        # Counts the recomputations and keeps what they could not put back.
        self._record = Recomputations()
        self._window: list[_MicroBatch] = []
        self._window_step: int | None = None
        self._done_steps: set[int] = set()
        self._next_due = 0
        # (step, seconds) of a run made before the budget knew the step time (the first one)
        self._unplanned: tuple[int, float] | None = None
        # manual optimization: the batch being checked and, per optimizer step of it, the
        # optimizer and the gradients it stepped on
        # and the parameters' values before each of its steps
        # and the gradients held when it began
        self._manual: tuple[Any, ...] | None = None
        self._manual_step: int | None = None  # the checked manual batch's first step
        self.last_stats: PerSampleStats | None = None
        # The count a loss was last seen to be a mean over (its own batch's): for the
        # accumulation-weighting check of windows whose last micro-batch has equal counts.
        self._own_count: Weighting | None = None
        self._reduction_now: Reduction | None = None
        # The run's typical per-sample norm: outliers are judged against it once a converged
        # batch's median has fallen to near zero.
        self._norm_scale = RunNormScale()

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "max_samples": self.max_samples,
            "chunk_size": self.chunk_size,
            "method": self.method,
            "outlier_factor": self.outlier_factor,
            "outlier_share": self.outlier_share,
            "check_optimizer_grad": self.check_optimizer_grad,
            **({"recompute": False} if not self.recompute else {}),
        }

    def extra_state(self) -> dict[str, Any]:
        own = self._own_count
        return {
            "norm_scale": self._norm_scale.value,
            "own_count": None
            if own is None
            else {"path": list(own.path), "rule": own.rule, "shift": own.shift},
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._norm_scale = RunNormScale(float(state.get("norm_scale", 0.0)))
        own = state.get("own_count")
        self._own_count = (
            None if own is None else Weighting(tuple(own["path"]), own["rule"], own["shift"])
        )

    def report_entry(self) -> dict[str, Any]:
        entry = super().report_entry()
        entry["recomputations"] = self.recomputations
        if self.last_stats is not None:
            entry["per_sample_method"] = self.last_stats.method
            entry["vmap_fallback_reason"] = self.last_stats.fallback_reason
        return entry

    @property
    def current_step(self) -> int:
        """The step findings are stamped with: in manual optimization, the global step at the
        start of the checked batch (each optimizer step of it advances the global step)."""
        return self._manual_step if self._manual_step is not None else super().current_step

    @property
    def recomputations(self) -> int:
        """How many times the check ran ``training_step`` (or ``per_sample_loss``) again, each
        in an isolated block (the report's ``recomputations``)."""
        return self._record.count

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
        if not self._may_recompute():
            return
        if self._window_step != step:
            self._window, self._window_step = [], step
        # The generators' and the module's state before training_step: the replay draws the
        # same dropout masks and sees the same carried state.
        micro = _MicroBatch(batch, batch_idx, capture_rng(), capture_state(pl_module))
        if not pl_module.automatic_optimization:
            # checked at the end of the batch, every optimizer step of it
            self._window, self._window_step = [], None
            self._done_steps = {step}
            held = {
                k: p.grad.detach().clone()
                for k, p in pl_module.named_parameters()
                if p.grad is not None
            }
            self._manual = (step, micro, [], [], held)
            return
        self._window.append(micro)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window, self._window_step = [], None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._manual is not None:
            with self.timed():
                raw = getattr(optimizer, "_optimizer", optimizer)
                live = {
                    k: p.grad.detach().clone()
                    for k, p in params_of(pl_module, raw).items()
                    if p.grad is not None
                }
                self._manual[2].append((raw, live))
                self._manual[3].append(_optimized_params(trainer, clone=True))
            return
        step = trainer.global_step
        if self._window_step != step or not self._window or step in self._done_steps:
            return
        window, self._window, self._window_step = self._window, [], None
        self._done_steps = {step}
        spent_before = self.seconds_spent
        with self.timed():
            self.steps_checked += 1
            raw = getattr(optimizer, "_optimizer", optimizer)
            params = params_of(pl_module, raw)
            if params:
                self._reduction_now = None
                with self.guarded("the per-sample comparison"):
                    self._compare_per_sample(pl_module, window[-1], params)
                if len(window) > 1:
                    with self.guarded("the accumulation-weighting check"):
                        self._check_accumulation(trainer, window)
                if self.check_optimizer_grad:
                    self._check_optimizer_grad(trainer, pl_module, raw, window, params)
            self._may_recompute()
        self._plan_next_run(trainer, step, self.seconds_spent - spent_before)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._manual is not None:
            (step, micro, stepped, segments, held), self._manual = self._manual, None
            spent_before = self.seconds_spent
            with self.timed():
                self.steps_checked += 1
                segments.append(_optimized_params(trainer, clone=False))
                self._manual_step = step
                try:
                    with self.guarded("the manual-optimization comparison"):
                        self._check_manual(
                            trainer, pl_module, micro, stepped, segments, held
                        )
                finally:
                    self._manual_step = None
                self._may_recompute()
            self._plan_next_run(trainer, step, self.seconds_spent - spent_before)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _check_manual(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        micro: _MicroBatch,
        stepped: list[tuple[Any, dict[str, Tensor]]],
        segments: list[dict[int, Tensor]],
        held: dict[str, Tensor],
    ) -> None:
        """Each optimizer's loss (what ``training_step`` hands to ``manual_backward`` before
        its step) per sample, and against the gradient the optimizer stepped on."""
        if not stepped:
            return
        with isolated(
            pl_module, rng_state=micro.rng, state=micro.state, record=self._record
        ):
            steps = manual_steps(trainer, pl_module, micro.batch, micro.batch_idx)
        manual = ManualSteps(trainer.optimizers)
        replayed = [i for i, _ in steps]
        real = [manual.index(raw) for raw, _ in stepped]
        if replayed != real:
            self.skip(
                f"training_step run again stepped the optimizers {replayed}, not "
                f"{real} as in the real step (control flow outside the batch), so the "
                "losses cannot be matched with the optimizer steps"
            )
            return
        compared: set[int | None] = set()
        wanted = [
            {n: p for n, p in params_of(pl_module, raw).items() if n in live}
            for raw, live in stepped
        ]
        for k, params in enumerate(wanted):
            if params and real[k] not in compared:
                compared.add(real[k])
                loss_fn = manual_step_losses(trainer, micro.batch_idx, k)
                with self.guarded("the per-sample comparison"):
                    self._compare_per_sample(pl_module, micro, params, manual_fn=loss_fn)
        if not self.check_optimizer_grad:
            return
        with self.guarded("the optimizer-gradient comparison"):
            replayed_grads = manual_step_grads(
                trainer, pl_module, micro, segments, wanted, self._record, held
            )
            if isinstance(replayed_grads, str):
                self.skip(f"{replayed_grads}; the optimizer gradients are not compared")
                return
            for (_, live), recomputed in zip(stepped, replayed_grads, strict=True):
                if not recomputed:
                    continue
                live = {k: live[k] for k in recomputed}
                if bool(torch.stack([torch.isfinite(g).all() for g in live.values()]).all()):
                    self._judge_mismatch(trainer, live, recomputed, microbatches=1)

    def _may_recompute(self) -> bool:
        """False (and ``check-skipped`` said once) when recomputing is off, or when a
        recomputation changed something that could not be undone."""
        if not self.recompute:
            self.skip(
                "recompute=False: every comparison this check makes runs training_step again "
                "beside the real step, so it does not run"
            )
            return False
        if self._record.lost:
            self.skip(
                "running training_step again changed "
                + ", ".join(self._record.lost)
                + ", which could not be put back; the check stops recomputing (keep such "
                "state small, or pass recompute=False)"
            )
            return False
        return True

    # ------------------------------------------------------------------ per-sample comparison
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
                isolated(pl_module, rng_state=micro.rng, state=micro.state,
                         record=self._record),
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
        if manual_fn is not None and losses is None:
            # the step's own random draws (a GAN's latent vectors), cut like the batch
            with (
                isolated(pl_module, rng_state=micro.rng, state=micro.state, record=self._record),
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
        if reduction.verdict == "coupled" and comparison.loss_is_random(tol):
            self.skip(
                "the training loss draws random numbers outside dropout layers (noise "
                "augmentation, random masking in training_step), which the batch and the "
                "per-sample passes cannot share, so their comparison says nothing; give the "
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
        ):
            self.report(finding)

    def _check_accumulation(self, trainer: pl.Trainer, window: list[_MicroBatch]) -> None:
        """``accumulation-weighting``: the loss is a mean over its own micro-batch's count
        (seen from the fitted weights, now or at an earlier step when this step's compared
        samples all hold the same count) and the window's micro-batches hold different counts."""
        reduction, follows = self._reduction_now, self._own_count
        if reduction is None or follows is None:
            return
        if not (reduction.own_count or reduction.verdict == "mean"):
            return
        counts = []
        for micro in window:
            size = batch_size(micro.batch)
            basis = follows.basis(micro.batch, size) if size else None
            if basis is None or basis.dim() != 1:
                return
            counts.append(float(basis.sum()))
        if max(counts) > min(counts):
            self.report(
                accumulation_finding(
                    step=self.current_step,
                    follows=follows,
                    counts=counts,
                    accumulate=len(window),
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
            recomputed = replay_window(
                trainer, pl_module, optimizer, window, live, self._record
            )
        if distributed:
            recomputed = average_over_ranks(live, recomputed)
        if recomputed is None or not live:
            return
        with self.guarded("the optimizer-gradient comparison"):
            finite = torch.stack([torch.isfinite(g).all() for g in live.values()]).all()
            if not bool(finite):
                return  # an overflow step that the GradScaler skips: nothing to compare
            self._judge_mismatch(trainer, live, recomputed, microbatches=len(window))

    def _judge_mismatch(
        self,
        trainer: pl.Trainer,
        live: Mapping[str, Tensor],
        recomputed: Mapping[str, Tensor],
        microbatches: int,
    ) -> None:
        error = float(relative_error(live, recomputed))
        precision = str(trainer.precision)
        tol = MISMATCH_TOL[
            "mixed" if "mixed" in precision else "64" if "64" in precision else "32"
        ]
        self.queue_scalars({"optimizer_grad_error": error})
        if error > tol:
            per_param = {k: relative_error({k: live[k]}, {k: recomputed[k]}) for k in recomputed}
            self.report(
                mismatch_finding(
                    step=self.current_step,
                    error=error,
                    tol=tol,
                    microbatches=microbatches,
                    per_param=per_param,
                )
            )


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

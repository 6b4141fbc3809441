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
the optimizer stepped on (:mod:`~grad_callbacks.callbacks.per_sample.manual_check`). With
accumulation written by hand, the batches that step nothing are kept and the batch that steps is
checked with them as its window.

A step counts as checked (``steps_checked``) when at least one comparison ran in it; a step all
of whose comparisons were skipped does not.

The per-sample comparison and its verdicts are in
:mod:`~grad_callbacks.callbacks.per_sample.judging`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.per_sample.comparison import _MicroBatch
from grad_callbacks.callbacks.per_sample.judging import _PerSampleJudging
from grad_callbacks.callbacks.per_sample.losses import PerSampleLoss
from grad_callbacks.callbacks.per_sample.manual_check import _ManualChecks
from grad_callbacks.callbacks.per_sample.replay import (
    average_over_ranks,
    params_of,
    replay_window,
)
from grad_callbacks.callbacks.per_sample.verdicts import mismatch_finding
from grad_callbacks.callbacks.recompute import Recomputations, capture_rng, capture_state
from grad_callbacks.core.diagnosis import (
    MISMATCH_TOL,
    RunNormScale,
    norm_clip_scale,
    relative_error,
)
from grad_callbacks.core.per_sample import PerSampleStats
from grad_callbacks.core.per_sample.loss import dense
from grad_callbacks.core.per_sample.weights import Reduction, Weighting
from grad_callbacks.core.state import BufferValues


class PerSampleGradientCheck(_ManualChecks, _PerSampleJudging, AuditCallback):
    """Compares per-sample gradients with the batch-reduced gradient and the optimizer's gradient.

    Findings: ``reduction-sum``, ``reduction-scale``, ``reduction-weighted``,
    ``accumulation-weighting``, ``batch-coupling``, ``per-sample-nonfinite``,
    ``per-sample-outlier``, ``grad-mismatch``, ``check-skipped``.

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
        coupled_loss: the loss couples the samples by design (in-batch negatives of a
            contrastive loss, a softmax over the batch axis, a mixture-of-experts
            load-balancing term): ``batch-coupling`` is then reported as info, not as a
            warning (mixing inside the model stays ``BatchMixingCheck``'s to find).

    Example:
        >>> import lightning as L
        >>> check = PerSampleGradientCheck(every_n_steps=50)
        >>> trainer = L.Trainer(callbacks=[check])  # doctest: +SKIP
    """

    reruns_training_step = True
    check_name = "PerSampleGradientCheck"
    metric_prefix = "per_sample"
    live_attributes = ("_window", "_manual", "_kept", "_last_stepped")

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
        coupled_loss: bool = False,
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
        self.coupled_loss = coupled_loss
        # Counts the recomputations and keeps what they could not put back.
        self._record = Recomputations()
        self._window: list[_MicroBatch] = []
        self._window_step: int | None = None
        self._done_steps: set[int] = set()
        self._next_due = 0
        # (step, seconds) of a run made before the budget knew the step time (the first one)
        self._unplanned: tuple[int, float] | None = None
        # manual optimization: the batch being checked, the batches kept for its window
        self._manual_init()
        # whether a comparison ran in the step being checked (else it is not counted)
        self._compared = False
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
            **({"coupled_loss": True} if self.coupled_loss else {}),
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

    def next_busy_step(self, step: int) -> int | None:
        if self._unplanned is not None or self._manual is not None or self._pending_scalars:
            return step
        if (not self.recompute or self._record.lost) and any(
            f.code == "check-skipped" for f in self._log.findings
        ):
            return None  # said once that it cannot run; it stays so until woken
        return max(step, self._next_due)

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
        # The random streams', the module's and its buffers' state before training_step: the
        # replay draws the same dropout masks and sees the same carried state.
        start = capture_state(pl_module)
        micro = _MicroBatch(batch, batch_idx, capture_rng(), start, BufferValues.capture(pl_module))
        if not pl_module.automatic_optimization:
            # checked at the end of the batch, every optimizer step of it
            self._window, self._window_step = [], None
            self._manual_batch_start(trainer, pl_module, step, micro)
            return
        self._window.append(micro)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._manual_init()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window, self._window_step = [], None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not pl_module.automatic_optimization:
            with self.timed():
                self._manual_optimizer_step(trainer, pl_module, optimizer)
            return
        step = trainer.global_step
        if self._window_step != step or not self._window or step in self._done_steps:
            return
        window, self._window, self._window_step = self._window, [], None
        self._done_steps = {step}
        spent_before = self.seconds_spent
        with self.timed():
            self._compared = False
            raw = getattr(optimizer, "_optimizer", optimizer)
            params = params_of(pl_module, raw)
            if params:
                self._reduction_now = None
                with self.guarded("the per-sample comparison"):
                    self._compare_per_sample(pl_module, window[-1], params)
                if len(window) > 1:
                    with self.guarded("the accumulation-weighting check"):
                        self._check_accumulation([micro.batch for micro in window])
                if self.check_optimizer_grad:
                    self._check_optimizer_grad(trainer, pl_module, raw, window, params)
            if self._compared:
                self.steps_checked += 1
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
        if not pl_module.automatic_optimization:
            self._manual_batch_end(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

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
        live = {k: dense(p.grad) for k, p in params.items() if p.grad is not None}
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
        clipped_by_hand: bool = False,
    ) -> None:
        """``clipped_by_hand``: manual optimization, where the step's own gradient clipping
        (``clip_grad_norm_`` before ``opt.step()``) ran before the gradient was read."""
        self._compared = True
        precision = str(trainer.precision)
        tol = MISMATCH_TOL[
            "mixed" if "mixed" in precision else "64" if "64" in precision else "32"
        ]
        scale = norm_clip_scale(live, recomputed, tol) if clipped_by_hand else None
        if scale is not None:
            recomputed = {k: v * scale for k, v in recomputed.items()}
        error = float(relative_error(live, recomputed))
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

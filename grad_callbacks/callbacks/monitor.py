"""GradientMonitor: per-module gradient norms (before clipping), update/weight ratios, histograms.

A thin adapter over :mod:`grad_callbacks.core.monitor`. Every ``every_n_steps`` optimizer steps
it looks at the stepping optimizer's gradients in ``on_before_optimizer_step`` (before clipping,
after AMP unscaling), keeps a copy of its parameters, and at the end of the batch measures how
far the step moved them. The numbers of the step come to the host in one transfer and are logged
as scalars under ``grad_audit/monitor/`` (and histograms in TensorBoard). It reports no findings.

Example:
    >>> import lightning as L
    >>> monitor = GradientMonitor(every_n_steps=100, histograms=False)
    >>> trainer = L.Trainer(callbacks=[monitor])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.core.monitor import MonitorResult, StepObservation, observe

HIST_TAG = "grad_audit/monitor/grad_hist/"


class GradientMonitor(AuditCallback):
    """Logs per-module gradient norms (before clipping), update/weight ratios and histograms.

    Once every ``every_n_steps`` global steps for each optimizer: at the optimizer's first step
    at or after each multiple of ``every_n_steps`` (with one optimizer, the steps that are
    multiples; with several, each optimizer's own steps, so that a GAN's discriminator, which
    steps at odd global steps, is monitored too):

    * ``grad_norm/<module>``: the L2 norm of the gradients of the module's parameters in that
      optimizer, as the optimizer receives them before clipping (unscaled under a GradScaler);
      ``grad_norm/total``: the L2 norm of all of that optimizer's gradients;
    * ``update_ratio/<module>``: ``||p_after - p_before|| / ||p_before||`` over the module's
      parameters, measured at the end of the batch (0 for a step the GradScaler skipped);
    * ``nonfinite/<module>``: how many gradient values were NaN/Inf (logged only when some
      were, and only where histograms are computed);
    * a histogram of each module's gradient values (finite values only) at
      ``grad_audit/monitor/grad_hist/<module>``, in TensorBoard.

    ``<module>`` is the parameter name without its last component (``net.0`` for
    ``net.0.weight``), or the parameter name with ``per_parameter=True``. With more than one
    optimizer every tag gets the suffix ``_opt<i>`` (``grad_norm/total_opt1``).

    Scalars are stamped with the step they describe, and go to every logger of the trainer
    (rank 0 only); histograms need a ``TensorBoardLogger``. On other steps the monitor does
    nothing at all. On a monitored step: one ``torch._foreach_norm`` over the gradients, a copy
    of the optimizer's parameters (freed at the end of the batch), one histogram pass per
    module, and a single host transfer. It never writes to ``.grad`` or to a parameter, and
    reports no findings.

    Inside ``GradientAudit`` with an overhead budget, a round of monitoring costs at most its
    share of the budget: after a round the monitor skips the multiples of ``every_n_steps``
    that come before its cost is paid back (on a millisecond step, a round every few hundred
    steps instead of every 50; never more often than ``every_n_steps``).

    Args:
        every_n_steps: monitor the steps whose ``global_step`` is a multiple of this.
        per_parameter: one norm, ratio and histogram per parameter instead of per module.
        histograms: write gradient histograms (when a TensorBoardLogger is attached).
        histogram_bins: buckets per histogram.
        on_finding: ``"warn"``, ``"raise"`` or ``"log"`` (applies to ``check-skipped``).

    Example:
        >>> GradientMonitor(every_n_steps=10).settings()["histogram_bins"]
        64
    """

    check_name = "GradientMonitor"
    metric_prefix = "monitor"
    live_attributes = ("_optimizers", "_pending")

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        per_parameter: bool = False,
        histograms: bool = True,
        histogram_bins: int = 64,
        on_finding: OnFinding = "warn",
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        if not isinstance(histogram_bins, int) or histogram_bins < 1:
            raise ValueError(f"histogram_bins must be a positive int, got {histogram_bins!r}")
        self.per_parameter = bool(per_parameter)
        self.histograms = bool(histograms)
        self.histogram_bins = histogram_bins
        self._names: dict[int, str] = {}
        self._optimizers: list[Any] = []
        self._pending: list[tuple[int, int, StepObservation]] = []
        #: Per optimizer, the global step of its previous step (the step before fit's first
        #: until it steps): it is monitored when a multiple of every_n_steps lies after it.
        self._previous: list[int] = []
        # Under GradientAudit's overhead budget: the multiple monitored last, and the step below
        # which no later multiple is (the other optimizers still get the last one).
        self._last_multiple: int | None = None
        self._hold_below = 0
        self._round_started = 0.0

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "per_parameter": self.per_parameter,
            "histograms": self.histograms,
            "histogram_bins": self.histogram_bins,
        }

    def scalar_charts(self) -> dict[str, list[str]]:
        return {
            "Gradient norms": ["grad_audit/monitor/grad_norm/.*"],
            "Update / weight": ["grad_audit/monitor/update_ratio/.*"],
        }

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._names = {}
        for name, p in pl_module.named_parameters():
            self._names.setdefault(id(p), name)
        self._optimizers = list(trainer.optimizers)
        self._pending = []
        self._previous = [trainer.global_step - 1] * len(self._optimizers)
        self._last_multiple, self._hold_below = None, 0

    def _next_multiple(self, previous: int) -> int:
        """The multiple of every_n_steps at whose first step an optimizer whose previous step
        was ``previous`` is monitored next (past those the budget holds back)."""
        n = self.every_n_steps
        multiple = (previous // n + 1) * n
        if multiple != self._last_multiple and multiple < self._hold_below:
            multiple = -(-self._hold_below // n) * n
        return multiple

    def next_busy_step(self, step: int) -> int | None:
        if self._pending or self._pending_scalars or not self._previous:
            return step
        if self._trainer is not None and not self._trainer.is_global_zero:
            return None  # it monitors on rank 0 only
        # An optimizer is monitored at its first step at or after a multiple of every_n_steps
        # that lies after its previous step: none before the next multiple after the earliest
        # previous step (the steps in between fall where each optimizer's previous step does).
        return max(step, min(self._next_multiple(p) for p in self._previous))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = self.current_step
        if not trainer.is_global_zero:
            return
        raw = getattr(optimizer, "_optimizer", optimizer)
        index = next((i for i, opt in enumerate(self._optimizers) if opt is raw), None)
        if index is None:
            return
        previous, self._previous[index] = self._previous[index], step
        n = self.every_n_steps
        if step // n == previous // n:
            return  # no multiple of every_n_steps in (previous, step]
        multiple = step // n * n
        if multiple != self._last_multiple and multiple < self._hold_below:
            return  # GradientAudit's budget holds this multiple back
        if not self._pending:
            self._round_started = self.seconds_spent
        self._last_multiple = multiple
        with self.timed(), self.guarded("the gradient monitor"):
            named = [
                (self._names.get(id(p), f"optimizer{index}.param{j}"), p)
                for j, p in enumerate(p for g in raw.param_groups for p in g["params"])
            ]
            bins = None
            if self.histograms and self.tensorboard_writer(trainer) is not None:
                bins = self.histogram_bins
            obs = observe(
                named,
                per_parameter=self.per_parameter,
                histogram_bins=bins,
                norm_fn=self.norm_fn,
            )
            self._pending.append((step, index, obs))
            self.steps_checked += 1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._pending:
            with self.timed(), self.guarded("the gradient monitor"):
                self._read(trainer)
            if self.budget is not None and self._last_multiple is not None:
                # Under GradientAudit's budget, the next multiples wait as long as this round's
                # cost and the monitor's share of the budget ask (never less than every_n_steps).
                cost = self.seconds_spent - self._round_started
                wait = self.budget.interval(cost, self.budget_share)
                self._hold_below = self._last_multiple + wait
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ internals
    def release(self) -> None:
        for _, _, obs in self._pending:
            obs.release()
        self._pending = []

    def _read(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, []
        try:
            parts = [obs.finish() for _, _, obs in pending]
        finally:
            for _, _, obs in pending:
                obs.release()
        device = parts[0].device
        sizes = [t.numel() for t in parts]
        host = torch.cat([t.to(device) for t in parts]).cpu()  # the step's one host transfer
        several = len(self._optimizers) > 1
        writer = self.tensorboard_writer(trainer) if self.histograms else None
        for (step, index, obs), chunk in zip(pending, host.split(sizes), strict=True):
            suffix = f"_opt{index}" if several else ""
            result = obs.decode(chunk)
            self.queue_scalars(_scalars(result, suffix), step=step)
            if writer is not None:
                for label, h in result.histograms.items():
                    writer.add_histogram_raw(
                        tag=f"{HIST_TAG}{label}{suffix}",
                        min=h.min,
                        max=h.max,
                        num=h.num,
                        sum=h.sum,
                        sum_squares=h.sum_squares,
                        bucket_limits=h.bucket_limits,
                        bucket_counts=h.bucket_counts,
                        global_step=step,
                    )


def _scalars(result: MonitorResult, suffix: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for label, norm in result.grad_norms.items():
        metrics[f"grad_norm/{label}{suffix}"] = norm
    if result.grad_norms:
        metrics[f"grad_norm/total{suffix}"] = result.total_norm
    for label, ratio in result.update_ratios.items():
        metrics[f"update_ratio/{label}{suffix}"] = ratio
    for label, count in result.nonfinite.items():
        metrics[f"nonfinite/{label}{suffix}"] = float(count)
    return metrics

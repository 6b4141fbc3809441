"""GradientSanityCheck: trainable parameters that get no gradient, and non-finite gradients.

A thin adapter over :class:`~grad_callbacks.core.grad_stats.GradSanityMonitor`: at every
attempted optimizer step (``on_before_optimizer_step``, automatic and manual optimization,
before clipping, after AMP unscaling) it folds the stepping optimizer's gradients into device
accumulators, and every ``every_n_steps`` steps it brings one small tensor to the host and turns
it into findings.

Example:
    >>> import lightning as L
    >>> check = GradientSanityCheck(patience=3, every_n_steps=10)
    >>> trainer = L.Trainer(callbacks=[check])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.recompute import training_step_compiled
from grad_callbacks.core.grad_stats import GradSanityMonitor, GroupSummary, HostCopy, LocalGradProbe
from grad_callbacks.core.sentinel import NonFinite
from grad_callbacks.findings import CODES, make_finding, name_list

# Steps whose gradient norms may wait on the device for a scheduled read (a row of floats per
# parameter each): beyond this the rows are copied to the host early, without waiting on CUDA.
_MAX_PENDING_STEPS = 64


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class GradientSanityCheck(AuditCallback):
    """Finds trainable parameters that get no gradient and NaN/Inf gradients.

    At each attempted step of an optimizer, only that optimizer's parameters with
    ``requires_grad=True`` at that moment are looked at: a frozen parameter is never missing,
    and neither is one whose ``requires_grad`` ``toggle_optimizer`` switched off for another
    optimizer's step.

    * ``missing-grad`` (warning): a trainable parameter's ``.grad`` was None, or exactly zero
      (what ``zero_grad(set_to_none=False)`` leaves on a parameter the loss does not reach), at
      ``patience`` consecutive steps of its optimizer. A parameter used only every few steps (an
      auxiliary head on some batches) is fine as long as it gets a gradient at least once every
      ``patience`` steps. Under DDP, unused parameters keep a None gradient (or a zero one) on
      every process, so every process reports them.
    * ``nonfinite-grad`` (error): NaN/Inf in a gradient at a step; the parameters and the first
      step are named. With a GradScaler (``16-mixed``), non-finite gradients are the scaler's
      business: it skips those steps and lowers the scale, so they are not reported.
      ``bf16-mixed`` and 32-bit have no scaler, and are checked. Under DDP each process tests
      its *local* gradients (before they are averaged over processes, which would spread one
      process's NaN to all of them), so the finding names the process whose data caused it.

    Cost and schedule: per step, one ``torch._foreach_norm`` (L2) over the stepping optimizer's
    gradients and one ``torch.stack`` of the norms, on the device; nothing is read from the
    device. Every ``every_n_steps`` steps (and at the end of each epoch, and after at most 64
    steps) the rows of norms gathered since the last read are concatenated and brought to the
    host in one transfer (4 bytes per parameter and step), where the streaks and first steps
    are worked out. On CUDA that copy is asynchronous (pinned memory and an event) and its
    findings are reported at the first later hook where it has landed, except under
    ``on_finding="raise"`` (read at once, so training stops before the optimizer applies the
    gradient) and at steps whose scalars are logged. Under DDP a tensor hook per parameter
    records local gradient norms (one small kernel per parameter per backward pass).

    Inside ``GradientAudit`` with an overhead budget, the check may watch windows of consecutive
    batches instead of every batch: the first one, and those the audit's sentinel asks for when
    its look (every few steps, at every gradient) finds a parameter without a gradient or a
    NaN/Inf (see :mod:`grad_callbacks.callbacks.pacing`). Streaks of steps without a gradient
    then count observed steps in a row (they start again after each gap), and a NaN/Inf is
    reported naming the first step where the sentinel saw it.

    Scalars (on the Trainer's ``log_every_n_steps`` cadence, at scheduled steps):
    ``grad_audit/sanity/missing_params`` (trainable parameters without a gradient at the step)
    and ``grad_audit/sanity/nonfinite_params`` (parameters with a NaN/Inf gradient since the
    previous read).

    Args:
        patience: how many consecutive steps of its optimizer a trainable parameter may go
            without a gradient before ``missing-grad`` is reported (default 3).
        every_n_steps: read the device accumulators every this many optimizer steps
            (default 1: one small transfer per step). Nothing is lost between reads: the first
            step of every finding is recorded on the device.
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.

    Example:
        >>> GradientSanityCheck(patience=5).settings()["patience"]
        5
    """

    check_name = "GradientSanityCheck"
    metric_prefix = "sanity"
    live_attributes = ("_probe", "_reads", "_optimizers")
    watches_steps = True

    def __init__(
        self, *, patience: int = 3, every_n_steps: int = 1, on_finding: OnFinding = "warn"
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.patience = patience
        self._monitor: GradSanityMonitor | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._param_counts: list[int] = []
        self._optimizer_names: list[str] = []
        self._probe: LocalGradProbe | None = None
        self._reads: list[tuple[HostCopy, list[Any], GradSanityMonitor, int]] = []
        self._names: dict[int, str] = {}
        self._restored_streaks: list[Any] = []
        self._distributed = False
        self._untraced = False
        self._probe_seconds = 0.0  # of probes released
        self._gaps = 0  # times the check stopped watching (windows under a budget)
        #: Where GradientAudit's sentinel first saw a NaN/Inf (None: it saw none); the check
        #: then reads at every step it watches until it has reported it.
        self.first_nonfinite: NonFinite | None = None
        self._nonfinite_reported = False
        self._batch_at: dict[int, int] = {}  # step -> batch_idx of recently observed steps

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "patience": self.patience}

    def extra_state(self) -> dict[str, Any]:
        # The counts of steps without a gradient go on across a resume; the rows still on the
        # device are read first (one transfer, at checkpoint time only).
        with self.guarded("reading the gradient statistics"):
            self._flush()
        streaks = self._monitor.streaks() if self._monitor is not None else []
        if not self.watching:
            # Saved in a gap between watch windows: the run resumes with a window that does not
            # follow the last one, so the streaks start again (as they would after the gap).
            streaks = []
        return {"streaks": [list(s) for s in streaks]}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._restored_streaks = list(state.get("streaks", []))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._names = {}
        for name, p in pl_module.named_parameters():
            self._names.setdefault(id(p), name)
        self._optimizers = list(trainer.optimizers)
        self._optimizer_names = [
            f"optimizer {i} ({type(opt).__name__})" for i, opt in enumerate(self._optimizers)
        ]
        self._build()
        self._distributed = trainer.world_size > 1
        # manual optimization under a compiled training_step: backward passes run there
        self._untraced = training_step_compiled(pl_module)
        if self.watching:
            self._start_probe()

    def _start_probe(self) -> None:
        if self._distributed and self._probe is None:
            self._probe = LocalGradProbe(
                [p for opt in self._optimizers for p in _optimizer_params(opt)],
                untraced=self._untraced,
            )

    def nonfinite_seen(self, where: NonFinite) -> None:
        """A sentinel saw a NaN/Inf loss or gradient first at ``where``: read what was gathered
        now, and from here on at every watched step, so that the finding (naming that first
        step) comes at once."""
        if self.first_nonfinite is None:
            self.first_nonfinite = where
        with self.timed(), self.guarded("reading the gradient statistics"):
            self._flush()

    def next_busy_step(self, step: int) -> int | None:
        # Outside windows only reads still on their way to the host need its hooks.
        busy = self.watching or self._reads or self._pending_scalars
        return step if busy else None

    def start_watching(self) -> None:
        super().start_watching()
        with self.timed():
            if self._monitor is not None:
                self._monitor.mark_gap()
            self._start_probe()

    def stop_watching(self) -> None:
        super().stop_watching()
        self._gaps += 1
        with self.timed(), self.guarded("reading the gradient statistics"):
            self.release()
            self._submit()
            self._poll()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._monitor is None or not self.watching:
            return
        raw = getattr(optimizer, "_optimizer", optimizer)
        index = next((i for i, opt in enumerate(self._optimizers) if opt is raw), None)
        if index is None:
            return
        with self.timed(), self.guarded("the gradient statistics"):
            self._observe(trainer, index)
            self._poll()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        with self.timed(), self.guarded("reading the gradient statistics"):
            self._poll()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Findings must be in the log before the base class gathers them from every process.
        with self.timed(), self.guarded("reading the gradient statistics"):
            self._flush()
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self.timed(), self.guarded("reading the gradient statistics"):
            self._flush()
        super().on_train_end(trainer, pl_module)  # releases, then gathers

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self._flush()
        except Exception:  # training already failed; what was read is recorded
            pass
        super().on_exception(trainer, pl_module, exception)  # releases, then writes

    # ------------------------------------------------------------------ internals
    def _build(self) -> None:
        groups = []
        for i, opt in enumerate(self._optimizers):
            named = [
                (self._names.get(id(p), f"optimizer{i}.param{j}"), p)
                for j, p in enumerate(_optimizer_params(opt))
            ]
            groups.append(named)
        self._param_counts = [len(g) for g in groups]
        self._monitor = GradSanityMonitor(groups, patience=self.patience)
        if self._restored_streaks:
            self._monitor.restore_streaks(self._restored_streaks)
            self._restored_streaks = []

    def _refresh(self) -> None:
        """Rebuild the accumulators when an optimizer got new parameter groups (unfreezing)."""
        counts = [len(_optimizer_params(opt)) for opt in self._optimizers]
        if counts != self._param_counts:
            self._submit()
            self._build()

    def _observe(self, trainer: pl.Trainer, index: int) -> None:
        self._refresh()
        assert self._monitor is not None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaled = scaler is not None and bool(scaler.is_enabled())
        local = None
        if self._probe is not None:
            group = self._monitor.groups[index]
            self._probe.add(group.params)
            local = self._probe.take(group.params)
            if local is None:  # no backward pass reached this optimizer's parameters here
                local = torch.zeros(len(group.params), device=group.device)
        self._monitor.observe(
            index,
            self.current_step,
            count_nonfinite=not scaled,
            local_norms=local,
            norm_fn=self.norm_fn,
        )
        self.steps_checked += 1
        self._batch_at[self.current_step] = trainer.fit_loop.epoch_loop.batch_idx
        if len(self._batch_at) > 4 * _MAX_PENDING_STEPS:
            del self._batch_at[next(iter(self._batch_at))]
        if self.first_nonfinite is not None and not self._nonfinite_reported:
            self._submit()  # a sentinel saw a NaN/Inf: report it at once
        elif self.current_step % self.every_n_steps == 0:
            self._submit(wait=self.on_finding == "raise")
        elif self._monitor.pending_steps >= _MAX_PENDING_STEPS:
            self._submit()  # bounds device memory; on CUDA the copy does not wait

    def _submit(self, wait: bool = False) -> None:
        """Start bringing the accumulators to the host (one transfer); a new window begins."""
        if self._monitor is None:
            return
        collected = self._monitor.collect()
        if collected is not None:
            tensor, layout = collected
            self._reads.append((HostCopy(tensor), layout, self._monitor, self.current_step))
            if wait:
                self._poll(wait=True)

    def _poll(self, wait: bool = False) -> None:
        """Report what the reads that have landed show (in order; waits if ``wait``).

        Each step a read covers gets its scalars (when :meth:`wants_scalars` of that step),
        stamped with that step: they come with the read, without waiting for it.
        """
        while self._reads and (wait or self._reads[0][0].ready()):
            copy, layout, monitor, _ = self._reads.pop(0)
            summaries = monitor.decode(copy.result(), layout)
            counts: dict[int, list[int]] = {}
            for summary in summaries:
                for step, without_grad, nonfinite in summary.per_step:
                    count = counts.setdefault(step, [0, 0])
                    count[0] += without_grad
                    count[1] += nonfinite
            for step, (without_grad, nonfinite) in sorted(counts.items()):
                if self.wants_scalars(step):
                    self.queue_scalars(
                        {"missing_params": without_grad, "nonfinite_params": nonfinite}, step=step
                    )
            for summary in summaries:
                self._report_summary(summary)

    def _flush(self) -> None:
        self._submit()
        self._poll(wait=True)

    def release(self) -> None:
        if self._probe is not None:
            self._probe_seconds += self._probe.hook_seconds
            self._probe.remove()
            self._probe = None

    @property
    def outside_seconds(self) -> float:
        # Under DDP the probe's tensor hooks run inside backward passes.
        probe = self._probe.hook_seconds if self._probe is not None else 0.0
        return self._probe_seconds + probe

    def _report_summary(self, s: GroupSummary) -> None:
        opt = self._optimizer_names[s.group] if s.group < len(self._optimizer_names) else "?"
        local = self._probe is not None
        sampled = (
            " GradientAudit's overhead budget has this check watch windows of batches, so that "
            "is the first watched step with one (max_overhead=None watches every batch)."
            if self._gaps
            else ""
        )
        if s.nonfinite:
            where = " (this process's local gradients, before DDP averaging)" if local else ""
            step = s.nonfinite_step
            batch_idx = self._batch_at.get(step)
            data: dict[str, Any] = {
                "optimizer": s.group,
                "local": local,
                "sampled": bool(self._gaps),
                "first_batch_idx": batch_idx,
            }
            first = self.first_nonfinite
            if first is not None and first.step <= step:
                # The sentinel saw it before this check watched a step with it.
                sampled = (
                    f" It first showed in the {first.source} at step {first.step} "
                    f"(batch_idx {first.batch_idx}), seen by GradientAudit's always-on check "
                    f"of losses and gradients; these parameters are those of step {step}."
                )
                data.update(first_batch_idx=first.batch_idx, first_seen_in=first.source)
                step, batch_idx = first.step, first.batch_idx
            self._nonfinite_reported = True
            self.report(
                make_finding(
                    "nonfinite-grad",
                    check=self.check_name,
                    step=step,
                    params=s.nonfinite,
                    message=(
                        f"NaN/Inf gradients{where} at a step of {opt}, first at step "
                        f"{step} (batch_idx {batch_idx}), in {len(s.nonfinite)} parameter(s): "
                        f"{name_list(s.nonfinite)}. No GradScaler guards this step, so the "
                        f"optimizer applies them.{sampled} Fix: {CODES['nonfinite-grad'].fix}."
                    ),
                    data=data,
                )
            )
        if s.missing:
            self.report(
                make_finding(
                    "missing-grad",
                    check=self.check_name,
                    step=s.missing_step,
                    params=s.missing,
                    message=(
                        f"{len(s.missing)} trainable parameter(s) of {opt} got no gradient "
                        f"(None or all zeros) at {self.patience} consecutive steps of it, by "
                        f"step {s.missing_step}: {name_list(s.missing)}. The loss does not reach "
                        f"them: an unused layer or head, or a graph cut by detach(), .data, "
                        f"torch.no_grad() or a round trip through .item()/numpy. "
                        f"Fix: {CODES['missing-grad'].fix}."
                    ),
                    data={
                        "optimizer": s.group,
                        "patience": self.patience,
                        "streak": s.streak,
                    },
                )
            )

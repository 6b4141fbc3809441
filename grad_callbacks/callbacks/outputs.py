"""The outputs of a check: its scalars, and what the leader writes for every check of a trainer.

A mixin of :class:`~grad_callbacks.callbacks.base.AuditCallback`. It defines no Lightning hook
(:func:`~grad_callbacks.callbacks.hooks.wrap_hooks` wraps only the hooks a class defines
itself): the base class's hooks call these.

* **scalars**: a check queues them (:meth:`Outputs.queue_scalars`, tags under
  ``grad_audit/<metric_prefix>/``), and they go at the end of the training batch to the loggers
  ``loggers`` selects (:mod:`grad_callbacks.sinks.loggers`);
* the outputs shared by all checks of a trainer, written once by the first audit callback (the
  *leader*): the findings text and custom-scalars layout in TensorBoard, and ``grad_audit.json``
  at the end of fit, also when fit ends by an exception or interrupt, in ``report_dir`` or else
  the run's log directory (none without a logger: see :func:`run_log_dir`), through Lightning's
  filesystem layer (fsspec URLs work).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl

from grad_callbacks.findings import SEVERITY_RANK
from grad_callbacks.sinks import tensorboard as tb
from grad_callbacks.sinks.loggers import LoggerSelection
from grad_callbacks.sinks.report import build_report, write_report

if TYPE_CHECKING:
    from grad_callbacks.callbacks.base import AuditCallback

_logger = logging.getLogger(__name__)

# How many times some check's findings changed (in this process): the leader looks for a new
# findings table only when it moved, not by asking every check at every batch.
_findings_changes = [0]


class Outputs:
    """The scalars, TensorBoard extras and report of
    :class:`~grad_callbacks.callbacks.base.AuditCallback` (see the module docstring).

    The attributes below are AuditCallback's (set in its ``__init__``).
    """

    check_name: ClassVar[str]
    metric_prefix: ClassVar[str]
    every_n_steps: int
    report_dir: str | None
    loggers: LoggerSelection
    report_path: str | None
    steps_checked: int
    _trainer: pl.Trainer | None
    _owner: AuditCallback | None
    _pending_scalars: dict[int, dict[str, float]]
    _text_dirty: bool
    _text_written: frozenset[Any] | None
    _report_written: bool

    # ------------------------------------------------------------------ scalars
    def wants_scalars(self, step: int | None = None) -> bool:
        """Whether the scalars of a checked step (default: the current one) are logged.

        A check that checks every step logs on the Trainer's ``log_every_n_steps`` cadence; one
        that watches windows of batches logs every step it checks (so that its chart is a line
        and not the one point where a window met the cadence; the budget pays for it).
        """
        trainer = self._trainer
        if trainer is None:
            return False
        if self.sampled:
            return True
        stamp = trainer.global_step if step is None else step
        return stamp % max(trainer.log_every_n_steps, 1) == 0

    def queue_scalars(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue scalars (tags under ``grad_audit/<metric_prefix>/``) for the next write.

        They are written at the end of the training batch, stamped with ``step``: by default the
        ``global_step`` of the moment they were queued (what ``self.log`` would have used); a
        check that reads its results later passes the step they describe.
        """
        prefix = f"grad_audit/{self.metric_prefix}/"
        stamp = self.current_step if step is None else step
        pending = self._pending_scalars.setdefault(stamp, {})
        pending.update({prefix + k: float(v) for k, v in metrics.items()})

    @property
    def _outputs(self) -> AuditCallback:
        """The callback whose output settings apply: the bundle's for a check inside one."""
        return self._owner if self._owner is not None else self

    def _flush_scalars(self, trainer: pl.Trainer) -> None:
        selection = self._outputs.loggers
        for step, metrics in sorted(self._pending_scalars.items()):
            tb.log_scalars(trainer, metrics, step=step, selection=selection)
        self._pending_scalars = {}

    @property
    def runs_once(self) -> bool:
        """Whether the check runs once per fit, so that its chart has one point."""
        return False

    def tensorboard_writer(self, trainer: pl.Trainer) -> Any | None:
        """The ``SummaryWriter`` the check writes to (rank 0, a selected TensorBoardLogger)."""
        return tb.tensorboard_writer(trainer, self._outputs.loggers)

    def scalar_charts(self) -> dict[str, list[str]]:
        """Custom-scalars charts of this check: chart title -> tag regexes. The title of a check
        that runs once says so: TensorBoard draws its one point as a lone dot."""
        title = self.check_name + (" (runs once: one point)" if self.runs_once else "")
        return {title: [f"grad_audit/{self.metric_prefix}/.*"]}

    # ------------------------------------------------------------------ findings table, report
    def _mark_text_dirty(self) -> None:
        self._text_dirty = True
        _findings_changes[0] += 1

    def _write_findings_text(self, trainer: pl.Trainer) -> None:
        """Write the findings table when the findings differ from those it last showed (once
        per change: a run whose findings did not change since step 1 shows one table)."""
        from grad_callbacks.callbacks.base import audit_callbacks  # base imports this module

        checks = audit_callbacks(trainer)
        writer = self.tensorboard_writer(trainer)
        if writer is not None:
            findings = sorted(
                (f for c in checks for f in c.findings),
                key=lambda f: (-SEVERITY_RANK[f.severity], f.step, f.code),
            )
            signature = tb.findings_signature(findings)
            if signature != self._text_written:
                self._text_written = signature
                tb.write_findings_text(writer, findings, step=trainer.global_step)
        for c in checks:
            c._text_dirty = False

    def _write_outputs(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        if self._report_written or not trainer.is_global_zero:
            return
        self._report_written = True
        from grad_callbacks.callbacks.base import audit_callbacks  # base imports this module

        checks = audit_callbacks(trainer)
        self._write_findings_text(trainer)
        report = build_report(
            [c.report_entry() for c in checks],
            status=status,
            global_step=trainer.global_step,
            world_size=trainer.world_size,
            error=error,
        )
        report.update(self.report_extras())
        directory = self.report_dir or run_log_dir(trainer)
        if directory is None:
            _logger.debug(
                "grad_callbacks: the trainer has no logger, so no grad_audit.json is written "
                "(pass report_dir=... to write one); the findings are in .findings"
            )
            return
        try:
            self.report_path = write_report(directory, report)
        except Exception as exc:  # a full disk or an unreachable bucket must not fail the fit
            warnings.warn(
                f"grad_callbacks: could not write the report to {directory}: "
                f"{type(exc).__name__}: {exc}",
                stacklevel=2,
            )

    def report_extras(self) -> dict[str, Any]:
        """Top-level fields the leader adds to the report."""
        return {}

    def report_entry(self) -> dict[str, Any]:
        """This check's section of the report (with ``idle_reason`` when it checked no step)."""
        findings = sorted(self.findings, key=lambda f: (-SEVERITY_RANK[f.severity], f.step))
        entry = {
            "name": self.check_name,
            "state_key": self.state_key,
            "settings": self.settings(),
            "steps_checked": self.steps_checked,
            "seconds": round(self.total_seconds, 6),
            "findings": [f.to_dict() for f in findings],
        }
        if self.steps_checked == 0:
            entry["idle_reason"] = self.idle_reason()
        return entry

    def idle_reason(self) -> str:
        """Why the check checked no step of the run: a skip's reason, or what its schedule
        met. Checks that know more (nothing to check in this model) say so."""
        skipped = [f for f in self.findings if f.code == "check-skipped"]
        if skipped:
            return f"skipped: {skipped[0].data.get('reason', skipped[0].message)}"
        steps = self._trainer.global_step if self._trainer is not None else 0
        if steps == 0:
            return "training took no optimizer step"
        return (
            f"no step of the run's {steps} optimizer step(s) was due under its schedule "
            f"(every_n_steps={self.every_n_steps})"
        )


def run_log_dir(trainer: pl.Trainer) -> str | None:
    """Where the report goes by default: the run's log directory as ``trainer.log_dir`` gives
    it (the first logger's ``log_dir`` for TensorBoard and CSV loggers, else its ``save_dir``,
    else ``default_root_dir``), without its collective; None when the trainer has no logger.

    Without a logger Lightning logs nothing, and ``default_root_dir`` holds the checkpoints (or
    is the working directory): the report is not put there unasked. ``fast_dev_run`` swaps the
    loggers for Lightning's ``DummyLogger``, which writes nothing: no logger either.
    ``Trainer.log_dir`` broadcasts from rank 0, so calling it on rank 0 alone would hang DDP.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
    if not loggers:
        return None
    logger = loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return str(logger.log_dir)
    return str(logger.save_dir or trainer.default_root_dir)

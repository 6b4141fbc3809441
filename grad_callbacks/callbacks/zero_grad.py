"""ZeroGradCheck: missing ``zero_grad``, stale and leaking gradients, accumulation windows.

A thin adapter: it builds a :class:`~grad_callbacks.core.ledger.GradientLedger` over the
trainer's optimizers when training starts and turns each step's
:class:`~grad_callbacks.core.ledger.StepAudit` into findings.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(callbacks=[ZeroGradCheck()], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.recompute import training_step_compiled
from grad_callbacks.core.ledger import GradientLedger, StepAudit
from grad_callbacks.findings import CODES, make_finding, name_list


class ZeroGradCheck(AuditCallback):
    """Checks that every optimizer step consumes fresh gradients, and only its own.

    Works every step (the bookkeeping is a few host operations per parameter, with no
    host-device synchronisation), so it is not periodic: ``every_n_steps`` is accepted for a
    uniform interface and has no effect. Its scalars follow the Trainer's ``log_every_n_steps``.
    Automatic and manual optimization (``manual_backward`` or a raw ``loss.backward()``), any
    number of optimizers, gradient accumulation, clipping and mixed precision, and
    ``torch.compile``d models (its hooks are kept out of dynamo's tracing). Steps are audited
    as they are attempted (``on_before_optimizer_step``), so a step that a GradScaler skips on
    overflow is still a step boundary: the gradients it did not apply are cleared by Lightning,
    and not clearing them is still caught.

    Findings: ``missing-zero-grad``, ``gradient-leak``, ``stale-grad``,
    ``short-accumulation-window``.

    Inside ``GradientAudit`` with an overhead budget, the check may watch windows of consecutive
    batches instead of every batch (its hooks are removed in the gaps): the first step of each
    optimizer in a window is not judged, since its previous step was not seen, and a bug is
    caught from the second one.

    Args:
        every_n_steps: accepted for a uniform interface; the check runs every step.
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.
    """

    check_name = "ZeroGradCheck"
    metric_prefix = "zero_grad"
    live_attributes = ("_ledger",)
    watches_steps = True

    def __init__(self, *, every_n_steps: int = 1, on_finding: OnFinding = "warn") -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        self._ledger: GradientLedger | None = None
        self._automatic = True
        self._optimizer_names: list[str] = []
        self._steps_taken: list[int] = []
        self._hook_seconds_before = 0.0  # of ledgers released

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._automatic = bool(pl_module.automatic_optimization)
        optimizers = list(trainer.optimizers)
        self._optimizer_names = [
            f"optimizer {i} ({type(opt).__name__})" for i, opt in enumerate(optimizers)
        ]
        self._ledger = GradientLedger(
            pl_module.named_parameters(),
            optimizers,
            on_step=self._on_step,
            # manual optimization under a compiled training_step: backward and steps run there
            untraced_hooks=training_step_compiled(pl_module),
        )
        if len(self._steps_taken) == len(optimizers):
            self._ledger.steps_taken = list(self._steps_taken)
        if self.watching:
            self._ledger.attach()

    def next_busy_step(self, step: int) -> int | None:
        # Its per-batch hooks work only while it watches (GradientAudit wakes it to watch).
        return step if self.watching or self._pending_scalars else None

    def start_watching(self) -> None:
        super().start_watching()
        if self._ledger is not None:
            with self.timed():
                self._ledger.resume()

    def stop_watching(self) -> None:
        super().stop_watching()
        if self._ledger is not None:
            with self.timed():
                self._ledger.pause()

    @property
    def outside_seconds(self) -> float:
        # The ledger's tensor hooks run inside backward passes, its step hook inside step().
        ledger = self._ledger.hook_seconds if self._ledger is not None else 0.0
        return self._hook_seconds_before + ledger

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._ledger is not None and self.watching:
            self._ledger.refresh()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._ledger is None or not self.watching:
            return
        raw = getattr(optimizer, "_optimizer", optimizer)
        with self.timed():
            for index, opt in enumerate(self._ledger.optimizers):
                if opt is raw:
                    self._ledger.audit_step(index)
                    return

    def release(self) -> None:
        if self._ledger is not None:
            self._steps_taken = list(self._ledger.steps_taken)
            self._hook_seconds_before += self._ledger.hook_seconds
            self._ledger.detach()
            self._ledger = None

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        steps = self._ledger.steps_taken if self._ledger is not None else self._steps_taken
        return {"steps_taken": list(steps)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._steps_taken = [int(s) for s in state.get("steps_taken", [])]

    # ------------------------------------------------------------------ audit -> findings
    def _on_step(self, audit: StepAudit) -> None:
        # Called inside audit_step (timed by the caller) or the ledger's step hook (counted in
        # its hook_seconds).
        self.steps_checked += 1
        step = self.current_step
        opt = self._optimizer_names[audit.optimizer_index]
        suffix = f"_opt{audit.optimizer_index}" if len(self._optimizer_names) > 1 else ""
        if self.wants_scalars():
            self.queue_scalars(
                {
                    f"microbatches{suffix}": audit.microbatches,
                    f"uncleared_params{suffix}": len(audit.uncleared),
                    f"stale_params{suffix}": len(audit.stale),
                    f"leaked_params{suffix}": len(audit.leaked),
                }
            )
        findings = []
        if audit.uncleared:
            findings.append(
                make_finding(
                    "missing-zero-grad",
                    check=self.check_name,
                    step=step,
                    params=audit.uncleared,
                    message=(
                        f"{opt} stepped on gradients that still held contributions from "
                        f"backward passes before its previous step, in "
                        f"{len(audit.uncleared)} parameter(s): {name_list(audit.uncleared)}. "
                        f"Fix: {CODES['missing-zero-grad'].fix}."
                    ),
                    data={
                        "optimizer": audit.optimizer_index,
                        "microbatches": audit.microbatches,
                        "params_with_grad": audit.params_with_grad,
                    },
                )
            )
        if audit.leaked:
            others = ", ".join(self._optimizer_names[j] for j in audit.leaked_from)
            findings.append(
                make_finding(
                    "gradient-leak",
                    check=self.check_name,
                    step=step,
                    params=audit.leaked,
                    message=(
                        f"{opt} stepped on gradients from a backward pass that {others} had "
                        f"already stepped on, with another backward pass in between, in "
                        f"{len(audit.leaked)} parameter(s): {name_list(audit.leaked)}. "
                        f"Fix: {CODES['gradient-leak'].fix}."
                    ),
                    data={
                        "optimizer": audit.optimizer_index,
                        "leaked_from": list(audit.leaked_from),
                    },
                )
            )
        if audit.stale:
            findings.append(
                make_finding(
                    "stale-grad",
                    check=self.check_name,
                    step=step,
                    params=audit.stale,
                    message=(
                        f"{opt} applied an old gradient again: {len(audit.stale)} "
                        f"parameter(s) got no contribution since its previous step but kept "
                        f"their gradient: {name_list(audit.stale)}. "
                        f"Fix: {CODES['stale-grad'].fix}."
                    ),
                    data={"optimizer": audit.optimizer_index},
                )
            )
        # read at each step: a GradientAccumulationScheduler changes it between epochs
        n = int(self._trainer.accumulate_grad_batches) if self._trainer is not None else 1
        k = audit.microbatches
        if self._automatic and n > 1 and 0 < k < n and audit.clean:
            findings.append(
                make_finding(
                    "short-accumulation-window",
                    check=self.check_name,
                    step=step,
                    message=(
                        f"{opt} stepped after {k} of accumulate_grad_batches={n} "
                        f"micro-batches, so this update weighs {k}/{n} = {k / n:.2f} of a "
                        f"full one. Lightning steps on the last batch of an epoch whose "
                        f"length is not a multiple of {n}, and on resuming mid-window, "
                        f"keeping the 1/{n} loss scale. "
                        f"Fix: {CODES['short-accumulation-window'].fix}."
                    ),
                    data={"microbatches": k, "accumulate_grad_batches": n, "weight": k / n},
                )
            )
        for finding in findings:
            self.report(finding)

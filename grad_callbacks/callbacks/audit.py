"""GradientAudit: every check in one callback, with shared settings.

Example:
    >>> audit = GradientAudit(on_finding="log")
    >>> for check in audit.checks:
    ...     print(check.check_name)
    ZeroGradCheck
    PerSampleGradientCheck
    BatchMixingCheck
    GradientSanityCheck
    AutogradCheck
    GradientMonitor
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.base import CALLBACK_HOOKS, AuditCallback, OnFinding, audit_hook
from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.callbacks.monitor import GradientMonitor
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.core.budget import OverheadBudget
from grad_callbacks.core.norms import NormCache
from grad_callbacks.findings import Finding

#: The checks ``GradientAudit()`` runs by default, in order.
DEFAULT_CHECKS: tuple[type[AuditCallback], ...] = (
    ZeroGradCheck,
    PerSampleGradientCheck,
    BatchMixingCheck,
    GradientSanityCheck,
    AutogradCheck,
    GradientMonitor,
)

# Hooks the base class implements itself: it runs them after the checks have run theirs.
_BASE_HOOKS = {
    "setup",
    "on_train_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
    "on_fit_end",
    "on_exception",
}
# Hooks GradientAudit defines itself (they time the batch around the checks' own hooks).
_TIMING_HOOKS = {"on_train_batch_start", "on_train_batch_end"}
_HOOKS = [
    name
    for name in CALLBACK_HOOKS
    if name not in _TIMING_HOOKS and name != "on_before_optimizer_step"
]

#: Share of the overhead budget given to each expensive periodic check.
BUDGET_SHARES: dict[str, float] = {"PerSampleGradientCheck": 0.7}

#: Settings GradientAudit gives a check it builds when the user passes no every_n_steps.
#: GradientSanityCheck reads its device accumulators every 50 steps instead of every step (the
#: steps in its findings stay exact); not under on_finding="raise", which must stop training
#: at the bad step.
AUDIT_DEFAULTS: dict[str, dict[str, Any]] = {"GradientSanityCheck": {"every_n_steps": 50}}


class GradientAudit(AuditCallback):
    """Runs several checks as one callback and writes one report for all of them.

    Args:
        checks: check instances, or check classes to build with the common settings;
            default: every check of :data:`DEFAULT_CHECKS`.
        every_n_steps: passed to the checks built here; None keeps each check's own schedule.
        on_finding: passed to the checks built here.
        max_overhead: the share of training wall time the checks may take (default 3%). The
            expensive periodic checks run at the first step and then as often as their share
            of it allows, never more often than their ``every_n_steps``; None turns the budget
            off (plain ``every_n_steps`` schedules). The report states the measured overhead.
    """

    check_name = "GradientAudit"
    metric_prefix = "audit"
    needs_whole_gradients = False  # its checks decide for themselves

    def __init__(
        self,
        checks: Sequence[AuditCallback | type[AuditCallback]] | None = None,
        *,
        every_n_steps: int | None = None,
        on_finding: OnFinding = "warn",
        max_overhead: float | None = 0.03,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps or 1, on_finding=on_finding)
        self.max_overhead = max_overhead
        self.budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        self._batch_started: tuple[float, float] | None = None
        self._every_n_steps_given = every_n_steps
        # One pass of gradient norms per optimizer step for the checks that read them.
        self._norm_cache = NormCache()
        common: dict[str, Any] = {"on_finding": on_finding}
        if every_n_steps is not None:
            common["every_n_steps"] = every_n_steps
        built: list[AuditCallback] = []
        for check in checks if checks is not None else DEFAULT_CHECKS:
            if isinstance(check, type) and issubclass(check, AuditCallback):
                own = AUDIT_DEFAULTS.get(check.check_name, {})
                if every_n_steps is not None or on_finding == "raise":
                    own = {}
                check = check(**{**own, **common})
            if not isinstance(check, AuditCallback):
                raise TypeError(f"GradientAudit takes audit checks, got {check!r}")
            check._owner = self
            check.norm_fn = self._norm_cache.norms
            if self.budget is not None and check.check_name in BUDGET_SHARES:
                check.budget, check.budget_share = self.budget, BUDGET_SHARES[check.check_name]
            built.append(check)
        self.checks: list[AuditCallback] = built

    @property
    def findings(self) -> list[Finding]:
        return [f for check in self.checks for f in check.findings]

    def _compute_state_key(self) -> str:
        return self._generate_state_key(checks=[c.state_key for c in self.checks])

    def _agreeing_checks(self) -> list[AuditCallback]:
        return self.checks

    def state_dict(self) -> dict[str, Any]:
        return {check.state_key: check.state_dict() for check in self.checks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for check in self.checks:
            if check.state_key in state_dict:
                check.load_state_dict(state_dict[check.state_key])

    def settings(self) -> dict[str, Any]:
        return {
            "every_n_steps": self._every_n_steps_given,
            "on_finding": self.on_finding,
            "max_overhead": self.max_overhead,
            "checks": [c.check_name for c in self.checks],
        }

    def _checks_seconds(self) -> float:
        return sum(check.seconds_spent for check in self.checks)

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._batch_started = (time.perf_counter(), self._checks_seconds())
        for check in self.checks:
            check.on_train_batch_start(*args, **kwargs)

    def on_before_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The gradient norms are shared only within this hook call: the gradients do not change
        # between the checks' hooks, and no reference to them outlives it.
        self._norm_cache.clear()
        try:
            for check in self.checks:
                check.on_before_optimizer_step(*args, **kwargs)
        finally:
            self._norm_cache.clear()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        for check in self.checks:
            check.on_train_batch_end(*args, **kwargs)
        AuditCallback.on_train_batch_end(self, *args, **kwargs)
        if self.budget is not None and self._batch_started is not None:
            started, checks_before = self._batch_started
            checks = self._checks_seconds() - checks_before
            self.budget.record_step(time.perf_counter() - started - checks, checks)
            self._batch_started = None
            if self.wants_scalars():
                self.queue_scalars({"overhead": self.budget.overhead})

    def scalar_charts(self) -> dict[str, list[str]]:
        """The measured overhead, when there is a budget (the checks bring their own charts)."""
        return {"Audit overhead": ["grad_audit/audit/overhead"]} if self.budget else {}

    def report_extras(self) -> dict[str, Any]:
        if self.budget is None:
            return {}
        return {
            "overhead": {
                "max_overhead": self.max_overhead,
                "measured": round(self.budget.overhead, 6),
                "check_seconds": round(self.budget.check_seconds, 6),
                "train_seconds": round(self.budget.train_seconds, 6),
                "steps": self.budget.steps,
            }
        }

    def _gather(self, trainer: pl.Trainer) -> None:
        """The checks gather their own findings; the bundle has none of its own."""


def _forward(name: str) -> Callable[..., None]:
    def hook(self: GradientAudit, *args: Any, **kwargs: Any) -> None:
        for check in self.checks:
            getattr(check, name)(*args, **kwargs)
        if name in _BASE_HOOKS:
            getattr(AuditCallback, name)(self, *args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"Runs ``{name}`` of every check."
    return hook


for _name in _HOOKS:
    setattr(GradientAudit, _name, audit_hook(_name, _forward(_name)))

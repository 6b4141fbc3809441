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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.findings import Finding

#: The checks ``GradientAudit()`` runs by default, in order.
DEFAULT_CHECKS: tuple[type[AuditCallback], ...] = (
    ZeroGradCheck,
    PerSampleGradientCheck,
    BatchMixingCheck,
    GradientSanityCheck,
    AutogradCheck,
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
_HOOKS = sorted(
    name
    for name in vars(pl.Callback)
    if (name.startswith("on_") or name in ("setup", "teardown"))
    and name not in ("on_save_checkpoint", "on_load_checkpoint")
    and callable(getattr(pl.Callback, name))
)


class GradientAudit(AuditCallback):
    """Runs several checks as one callback and writes one report for all of them.

    Args:
        checks: check instances, or check classes to build with the common settings;
            default: every check of :data:`DEFAULT_CHECKS`.
        every_n_steps: passed to the checks built here; None keeps each check's own schedule.
        on_finding: passed to the checks built here.
    """

    check_name = "GradientAudit"
    metric_prefix = "audit"

    def __init__(
        self,
        checks: Sequence[AuditCallback | type[AuditCallback]] | None = None,
        *,
        every_n_steps: int | None = None,
        on_finding: OnFinding = "warn",
    ) -> None:
        super().__init__(every_n_steps=every_n_steps or 1, on_finding=on_finding)
        self._every_n_steps_given = every_n_steps
        common: dict[str, Any] = {"on_finding": on_finding}
        if every_n_steps is not None:
            common["every_n_steps"] = every_n_steps
        built: list[AuditCallback] = []
        for check in checks if checks is not None else DEFAULT_CHECKS:
            if isinstance(check, type) and issubclass(check, AuditCallback):
                check = check(**common)
            if not isinstance(check, AuditCallback):
                raise TypeError(f"GradientAudit takes audit checks, got {check!r}")
            check._owner = self
            built.append(check)
        self.checks: list[AuditCallback] = built

    @property
    def findings(self) -> list[Finding]:
        return [f for check in self.checks for f in check.findings]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(checks=[c.state_key for c in self.checks])

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
            "checks": [c.check_name for c in self.checks],
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
    setattr(GradientAudit, _name, _forward(_name))

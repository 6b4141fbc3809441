"""Framework-free core in plain torch: gradient ledger, per-sample engine, statistics."""

from grad_callbacks.core.ledger import GradientLedger, StepAudit

__all__ = ["GradientLedger", "StepAudit"]

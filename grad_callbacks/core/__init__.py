"""Framework-free core in plain torch: gradient ledger, per-sample engine, statistics.

Nothing here imports Lightning; the callbacks in :mod:`grad_callbacks.callbacks` adapt it.
"""

from grad_callbacks.core.batch import batch_size, slice_batch
from grad_callbacks.core.budget import OverheadBudget
from grad_callbacks.core.fingerprint import fingerprints
from grad_callbacks.core.ledger import GradientLedger, StepAudit
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
from grad_callbacks.core.state import restored_state

__all__ = [
    "GradientLedger",
    "OverheadBudget",
    "PerSampleGradError",
    "PerSampleStats",
    "ScaleFit",
    "StepAudit",
    "batch_size",
    "batchnorm_eval",
    "fingerprints",
    "fit_scale",
    "gradient_noise_scale",
    "loss_grad",
    "per_sample_grad_stats",
    "restored_state",
    "slice_batch",
]

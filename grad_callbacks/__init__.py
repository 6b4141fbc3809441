"""grad_callbacks: PyTorch Lightning callbacks that audit the gradients of a training run.

Example:
    >>> import lightning as L
    >>> from grad_callbacks import GradientAudit
    >>> trainer = L.Trainer(callbacks=[GradientAudit()])  # doctest: +SKIP
"""

__version__ = "0.1.0"

from grad_callbacks.callbacks import (
    AuditCallback,
    AutogradCheck,
    BatchMixingCheck,
    GradientAudit,
    GradientMonitor,
    GradientSanityCheck,
    PerSampleGradientCheck,
    RankSyncCheck,
    ZeroGradCheck,
)
from grad_callbacks.findings import (
    CODES,
    CodeInfo,
    Finding,
    GradientAuditError,
    Severity,
)
from grad_callbacks.sinks.warnings import GradientAuditWarning

__all__ = [
    "CODES",
    "AuditCallback",
    "AutogradCheck",
    "BatchMixingCheck",
    "CodeInfo",
    "Finding",
    "GradientAudit",
    "GradientAuditError",
    "GradientAuditWarning",
    "GradientMonitor",
    "GradientSanityCheck",
    "PerSampleGradientCheck",
    "RankSyncCheck",
    "Severity",
    "ZeroGradCheck",
    "__version__",
]

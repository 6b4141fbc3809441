"""Thin Lightning adapters: one callback per check, and the GradientAudit bundle."""

from grad_callbacks.callbacks.audit import GradientAudit
from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.base import AuditCallback
from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.callbacks.monitor import GradientMonitor
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.rank_sync import RankSyncCheck
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck

__all__ = [
    "AuditCallback",
    "AutogradCheck",
    "BatchMixingCheck",
    "GradientAudit",
    "GradientMonitor",
    "GradientSanityCheck",
    "PerSampleGradientCheck",
    "RankSyncCheck",
    "ZeroGradCheck",
]

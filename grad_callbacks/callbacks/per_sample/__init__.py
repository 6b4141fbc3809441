"""PerSampleGradientCheck: per-sample gradients against the batch-reduced gradient and the
optimizer's gradient.

``check`` is the callback (settings, schedule, hooks); ``losses`` says how a loss is obtained,
``comparison`` runs one per-sample comparison aside, ``verdicts`` turns numbers into findings and
``replay`` recomputes the optimizer's gradient over the accumulation window.
"""

from grad_callbacks.callbacks.per_sample.check import PerSampleGradientCheck
from grad_callbacks.callbacks.per_sample.losses import PerSampleLoss

__all__ = ["PerSampleGradientCheck", "PerSampleLoss"]

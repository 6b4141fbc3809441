"""The warning sink: one Python warning per distinct finding."""

from __future__ import annotations

import warnings

from grad_callbacks.findings import Finding


class GradientAuditWarning(UserWarning):
    """The category of the warnings the suite emits (filter it with ``warnings.filterwarnings``)."""


def format_finding(finding: Finding) -> str:
    """A one-paragraph text for a finding: code, step, message.

    Example:
        >>> from grad_callbacks.findings import make_finding
        >>> format_finding(make_finding("stale-grad", check="ZeroGradCheck", step=4, message="m"))
        '[grad_audit stale-grad @ step 4] m'
    """
    return f"[grad_audit {finding.code} @ step {finding.step}] {finding.message}"


def warn_finding(finding: Finding) -> None:
    """Emit one :class:`GradientAuditWarning` for ``finding``."""
    warnings.warn(format_finding(finding), GradientAuditWarning, stacklevel=2)

"""Findings: what a check reports, the registry of stable codes, and the de-duplicating log.

Pure Python: no torch or Lightning import, so every layer can use it.

Example:
    >>> log = FindingLog()
    >>> f = make_finding("missing-zero-grad", check="ZeroGradCheck", step=3,
    ...                  message="...", params=("layer.weight",))
    >>> log.add(f)
    True
    >>> log.add(f)   # same (code, params): counted, not repeated
    False
    >>> log.findings[0].count
    2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class CodeInfo:
    """The registry entry of a stable finding code."""

    code: str
    severity: Severity
    summary: str
    fix: str


def _code(code: str, severity: Severity, summary: str, fix: str) -> tuple[str, CodeInfo]:
    return code, CodeInfo(code, severity, summary, fix)


#: Every stable finding code with its default severity, a one-line meaning and the usual fix.
CODES: dict[str, CodeInfo] = dict(
    [
        _code(
            "missing-zero-grad",
            "error",
            "an optimizer step used gradient contributions from a backward pass that ran before "
            "that optimizer's previous step: the gradients were never cleared",
            "call optimizer.zero_grad() once per optimizer step (manual optimization: after "
            "opt.step(); automatic: do not override optimizer_zero_grad with a no-op)",
        ),
        _code(
            "gradient-leak",
            "error",
            "an optimizer step used gradients from a backward pass that another optimizer had "
            "already stepped on, with another backward pass in between",
            "clear this optimizer's gradients before its own backward pass (opt.zero_grad()), "
            "or use toggle_optimizer / detach() so the other loss does not reach its parameters",
        ),
        _code(
            "stale-grad",
            "warning",
            "a parameter's gradient at a step got no contribution since that optimizer's previous "
            "step: an old gradient is applied again",
            "clear gradients every step (zero_grad(set_to_none=True) makes unused parameters "
            "skip the update instead of re-applying an old gradient)",
        ),
        _code(
            "short-accumulation-window",
            "info",
            "a step used fewer micro-batches than accumulate_grad_batches (e.g. at epoch end); "
            "its weight k/N is reported",
            "usually harmless; make the number of batches per epoch a multiple of "
            "accumulate_grad_batches (limit_train_batches, drop_last) if every step must weigh "
            "the same",
        ),
        _code(
            "reduction-sum",
            "warning",
            "the batch gradient is about B x the mean per-sample gradient: the loss is summed "
            "over the batch, so the effective learning rate grows with batch size",
            "use reduction='mean' (or divide the summed loss by the batch size)",
        ),
        _code(
            "reduction-scale",
            "info",
            "the batch gradient is c x the mean per-sample gradient for a constant c other than "
            "1 or B",
            "check that the scale is intended (loss weights, token-count normalisation)",
        ),
        _code(
            "reduction-weighted",
            "info",
            "the batch gradient is a weighted sum of per-sample gradients with unequal weights "
            "that the per-sample losses explain (e.g. a mean over tokens with padding or "
            "ignore_index); the weights and what they follow are reported",
            "nothing to fix when intended: a mean over tokens weights each sample by its token "
            "count; for equal sample weights, average each sample's own token mean instead",
        ),
        _code(
            "accumulation-weighting",
            "warning",
            "within one optimizer step, the accumulated gradient differs from the gradient of "
            "the whole window as one batch because each micro-batch's loss is normalized by its "
            "own count (tokens or samples): samples in short micro-batches weigh more",
            "sum the loss over tokens and divide by the total count of the whole accumulation "
            "window (counted before the window, as transformers' num_items_in_batch does), not "
            "by each micro-batch's own count",
        ),
        _code(
            "batch-coupling",
            "warning",
            "the batch gradient is not a scalar multiple of the mean per-sample gradient; the "
            "parameters and modules responsible are named",
            "look for operations that mix samples (reshape/permute across the batch axis, "
            "statistics over the batch); train-mode BatchNorm couples samples by design",
        ),
        _code(
            "per-sample-nonfinite",
            "error",
            "some samples' gradients are NaN/Inf; their indices in the batch are named",
            "inspect those samples (bad labels, log(0), division by zero) and guard the loss",
        ),
        _code(
            "per-sample-outlier",
            "warning",
            "a sample's gradient norm is far above the batch median",
            "inspect the sample (mislabelled, extreme values); consider clipping or a robust loss",
        ),
        _code(
            "grad-mismatch",
            "error",
            "the gradient the optimizer sees differs from the gradient of the training loss on "
            "the same batch, after accounting for accumulation, AMP loss scaling and DDP averaging",
            "look for gradient hooks that rescale, a second backward pass, or gradients not "
            "cleared between accumulation windows",
        ),
        _code(
            "batch-mixing",
            "error",
            "a sample's output depends on another sample's input",
            "look for view/reshape/permute across the batch dimension or a reduction over dim 0",
        ),
        _code(
            "missing-grad",
            "warning",
            "a trainable parameter got no gradient in a step (unused or detached)",
            "freeze parameters you do not train (requires_grad_(False)) or find the detach()",
        ),
        _code(
            "nonfinite-grad",
            "error",
            "NaN/Inf in gradients; parameters named",
            "lower the learning rate, clip gradients, guard log/div in the loss, or use a "
            "GradScaler with 16-bit precision",
        ),
        _code(
            "autograd-mismatch",
            "error",
            "finite differences disagree with autograd for a module or custom Function",
            "fix the backward() of the custom autograd.Function named",
        ),
        _code(
            "rank-desync",
            "error",
            "with more than one data-parallel rank, a gradient the optimizer steps on (after the "
            "reduction) or a parameter after the step differs between ranks: the replicas train "
            "different models; parameters, ranks and likely cause named",
            "see the likely cause in the message: parameters unfrozen or created after DDP "
            "wrapped the model (freeze with a zero learning rate instead, create parameters "
            "before fit), no_sync() left on for the micro-batch that steps, per-rank gradient "
            "edits after the reduction, or a faulty interconnect",
        ),
        _code(
            "check-skipped",
            "info",
            "a check could not run on this model or batch; the reason is in the message; "
            "training goes on",
            "see the message: usually a configuration argument of the check tells it how to run",
        ),
    ]
)


@dataclass(frozen=True)
class Finding:
    """One thing a check found, de-duplicated by ``(code, params)``.

    Attributes:
        code: a stable code from :data:`CODES`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        check: the name of the check that reported it.
        step: the first trainer ``global_step`` at which it was seen.
        count: how many times it was seen.
        message: what happened, where, and the usual fix.
        params: names of the parameters or modules involved.
        data: numbers behind it (JSON-serialisable).
    """

    code: str
    severity: Severity
    check: str
    step: int
    message: str
    params: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    count: int = 1

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """The de-duplication key ``(code, params)``."""
        return (self.code, self.params)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the report's representation)."""
        out = dataclasses.asdict(self)
        out["params"] = list(self.params)
        out["data"] = dict(self.data)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Finding:
        """The inverse of :meth:`to_dict`."""
        return cls(
            code=str(raw["code"]),
            severity=raw["severity"],
            check=str(raw["check"]),
            step=int(raw["step"]),
            message=str(raw["message"]),
            params=tuple(raw.get("params", ())),
            data=dict(raw.get("data", {})),
            count=int(raw.get("count", 1)),
        )


def make_finding(
    code: str,
    *,
    check: str,
    step: int,
    message: str,
    params: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
    severity: Severity | None = None,
) -> Finding:
    """Build a :class:`Finding` with the code's default severity unless one is given.

    Raises:
        KeyError: for a code that is not in :data:`CODES`.
    """
    info = CODES[code]
    return Finding(
        code=code,
        severity=severity or info.severity,
        check=check,
        step=int(step),
        message=message,
        params=tuple(params),
        data=dict(data or {}),
    )


def name_list(names: Sequence[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, and how many more (for finding messages).

    Example:
        >>> name_list(["a", "b", "c"], limit=2)
        'a, b and 1 more'
    """
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class GradientAuditError(RuntimeError):
    """Raised under ``on_finding="raise"`` for an error-severity finding.

    Under DDP every rank raises it together; on the ranks that did not find the error,
    ``rank`` names the one that did.

    Attributes:
        finding: the finding that caused it.
        rank: the DDP rank where it was found, when that is another process; else None.
    """

    def __init__(self, finding: Finding, rank: int | None = None) -> None:
        where = f" (found on rank {rank})" if rank is not None else ""
        super().__init__(f"[{finding.code}]{where} {finding.message}")
        self.finding = finding
        self.rank = rank


class FindingLog:
    """Findings de-duplicated by ``(code, params)``, in order of first appearance."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, tuple[str, ...]], Finding] = {}

    def add(self, finding: Finding) -> bool:
        """Record a finding; returns True when its ``(code, params)`` is new."""
        old = self._by_key.get(finding.key)
        if old is None:
            self._by_key[finding.key] = finding
            return True
        self._by_key[finding.key] = dataclasses.replace(
            old, count=old.count + finding.count, step=min(old.step, finding.step)
        )
        return False

    def merge(self, finding: Finding, rank: int) -> bool:
        """Record a finding reported by another process, keeping which ranks saw it."""
        ranks = sorted({*finding.data.get("ranks", ()), rank})
        tagged = dataclasses.replace(finding, data={**finding.data, "ranks": ranks})
        old = self._by_key.get(finding.key)
        if old is None:
            self._by_key[finding.key] = tagged
            return True
        merged_ranks = sorted({*old.data.get("ranks", ()), *ranks})
        # The earliest sighting speaks for all: its step, message and numbers belong together.
        first = tagged if finding.step < old.step else old
        self._by_key[finding.key] = dataclasses.replace(
            first,
            count=old.count + finding.count,
            data={**first.data, "ranks": merged_ranks},
        )
        return False

    @property
    def findings(self) -> list[Finding]:
        """The findings so far, in order of first appearance."""
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def state_dict(self) -> list[dict[str, Any]]:
        """The findings as plain dicts (for checkpoints)."""
        return [f.to_dict() for f in self._by_key.values()]

    def load_state_dict(self, state: Iterable[Mapping[str, Any]]) -> None:
        """Replace the findings with those of :meth:`state_dict`."""
        self._by_key = {}
        for raw in state:
            f = Finding.from_dict(raw)
            self._by_key[f.key] = f


def at_least(findings: Iterable[Finding], severity: str) -> list[Finding]:
    """The findings whose severity is ``severity`` or worse."""
    floor = SEVERITY_RANK[severity]
    return [f for f in findings if SEVERITY_RANK[f.severity] >= floor]

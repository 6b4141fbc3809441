"""What becomes of a check's findings: the ``on_finding`` policy, and findings of other processes.

A mixin of :class:`~grad_callbacks.callbacks.base.AuditCallback`. It defines no Lightning hook
(:func:`~grad_callbacks.callbacks.hooks.wrap_hooks` wraps only the hooks a class defines
itself): the base class's hooks and the hook wrapper call these.

* the ``on_finding`` policy (``"warn"``: one warning per distinct warning- or error-severity
  finding, info findings are only recorded; ``"raise"``:
  :class:`~grad_callbacks.findings.GradientAuditError` on error findings; ``"log"``: record
  only), and a check body's unexpected error turned into a ``check-skipped`` finding
  (:meth:`FindingPolicy.guarded`);
* gathering findings from every DDP rank at epoch and fit end, in hooks every rank runs;
* under DDP with ``on_finding="raise"``, an error found on one rank stops every rank together:
  the finding is held until the end of the hook, where every rank learns whether any rank holds
  one (a one-sided exception would leave the other ranks waiting in the next collective);
* findings made in processes ``strategy="ddp_spawn"`` started, read back in the launching
  process (:mod:`grad_callbacks.callbacks.spawned`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch

from grad_callbacks.callbacks import spawned
from grad_callbacks.callbacks.distributed import any_rank, gather_objects, is_distributed
from grad_callbacks.findings import Finding, FindingLog, GradientAuditError, make_finding
from grad_callbacks.sinks.warnings import warn_finding

if TYPE_CHECKING:
    from grad_callbacks.callbacks.base import AuditCallback, OnFinding


class FindingPolicy:
    """The findings of :class:`~grad_callbacks.callbacks.base.AuditCallback`: recording, the
    ``on_finding`` policy, gathering across processes (see the module docstring).

    The attributes below are AuditCallback's (set in its ``__init__``).
    """

    check_name: ClassVar[str]
    on_finding: OnFinding
    _log: FindingLog
    _remote: dict[int, list[Finding]]
    _announced: set[tuple[str, tuple[str, ...]]]
    _trainer: pl.Trainer | None
    _owner: AuditCallback | None
    _held: Finding | Exception | None
    _distributed_fit: bool
    _return_to: str | None
    _spawn_return: str | None

    # ------------------------------------------------------------------ findings
    @property
    def findings(self) -> list[Finding]:
        """Findings of this check, from every rank once gathered, de-duplicated (under
        ``ddp_spawn``, in the launching process too once fit has returned)."""
        self._take_back()
        if not self._remote:
            return self._log.findings
        merged = FindingLog()
        rank = self._trainer.global_rank if self._trainer is not None else 0
        for r in sorted({rank, *self._remote}):
            for f in self._log.findings if r == rank else self._remote[r]:
                merged.merge(f, r)
        return merged.findings

    def _take_back(self) -> None:
        """Load what a spawned copy of this callback (or of its bundle) wrote back, if any."""
        top = self._owner if self._owner is not None else self
        if top._spawn_return is not None:
            spawned.take_back(top)

    def _send_back(self, trainer: pl.Trainer) -> None:
        """In a spawned copy on global rank 0: write back what the launching process reads."""
        if self._return_to is not None and trainer.is_global_zero:
            spawned.send_back(self, self._return_to)

    def report(self, finding: Finding) -> None:
        """Record a finding and apply the ``on_finding`` policy to it."""
        new = self._log.add(finding)
        if not new:
            return
        self._mark_text_dirty()
        if self.on_finding == "raise" and finding.severity == "error":
            if not is_distributed(self._trainer):
                raise GradientAuditError(finding)
            self._held = self._held or finding  # raised on every rank at the end of the hook
            return
        if self._may_announce(finding):
            self._announced.add(finding.key)
            warn_finding(finding)

    def _may_announce(self, finding: Finding) -> bool:
        # Info findings go to the report and TensorBoard only: a clean run raises no warning.
        if self.on_finding == "log" or finding.severity == "info" or finding.key in self._announced:
            return False
        # Other ranks' findings are announced by rank 0 once gathered.
        return self._trainer is None or self._trainer.is_global_zero

    def skip(self, reason: str, params: tuple[str, ...] = (), step: int | None = None) -> None:
        """Report that the check could not run (``check-skipped``); training goes on.

        Args:
            reason: why, and how to configure the check so that it runs.
            params: names of the parameters or modules concerned.
            step: the step the skipped work was about (default: the current step).
        """
        self.report(
            make_finding(
                "check-skipped",
                check=self.check_name,
                step=self.current_step if step is None else step,
                message=f"{self.check_name} skipped: {reason}. Training goes on.",
                params=params,
                data={"reason": reason},
            )
        )

    def guarded(self, what: str) -> _Guard:
        """Run a check's body so that an unexpected error never breaks training.

        The error becomes a ``check-skipped`` finding, unless ``on_finding="raise"``, where it
        propagates. A :class:`GradientAuditError` always propagates.

        Example:
            >>> from grad_callbacks.callbacks.base import AuditCallback
            >>> check = AuditCallback(on_finding="log")
            >>> with check.guarded("the comparison"):
            ...     raise ValueError("odd batch")
            >>> check.findings[0].message
            'AuditCallback skipped: the comparison failed: ValueError: odd batch. Training goes on.'
        """
        return _Guard(self, what)

    # ------------------------------------------------------------------ every rank
    def _agreeing_checks(self) -> list[AuditCallback]:
        """The checks whose held errors this callback raises (a bundle's: its checks')."""
        return [self]

    def _agree_to_raise(self) -> None:
        """Under DDP and ``on_finding="raise"``: raise on every rank if any rank holds an error.

        Every rank runs it at the same hooks (``hooks._AGREE_HOOKS``), so the all-reduce is
        entered by all of them. When one holds an error, every audit callback gathers its
        findings first, so rank 0's report names the finding and its rank.
        """
        trainer = self._trainer
        if self._owner is not None or not self._distributed_fit:
            return
        checks = self._agreeing_checks()
        if not any(c.on_finding == "raise" for c in checks) or not is_distributed(trainer):
            return
        assert trainer is not None
        held = next((c._held for c in checks if c._held is not None), None)
        if not any_rank(held is not None, trainer):
            return
        from grad_callbacks.callbacks.base import audit_callbacks  # base imports this module

        for callback in audit_callbacks(trainer):
            callback._gather(trainer)
        mine: dict[str, Any] | None = None
        if isinstance(held, Finding):
            mine = {"finding": held.to_dict()}
        elif held is not None:
            mine = {"error": f"{type(held).__name__}: {held}"}
        described = gather_objects(mine, trainer)
        if isinstance(held, Exception):
            raise held
        if held is not None:
            raise GradientAuditError(held)
        rank, what = next((r, d) for r, d in enumerate(described) if d is not None)
        if "finding" in what:
            raise GradientAuditError(Finding.from_dict(what["finding"]), rank=rank)
        raise RuntimeError(f"grad_callbacks: rank {rank} stopped training: {what['error']}")

    def _gather(self, trainer: pl.Trainer) -> None:
        """Collect every rank's findings; every rank calls this at the same hooks."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, self._log.state_dict())
        self._remote = {
            r: [Finding.from_dict(f) for f in fs]
            for r, fs in enumerate(gathered)
            if r != trainer.global_rank
        }
        if trainer.is_global_zero:
            for f in self.findings:
                if self._may_announce(f):
                    self._announced.add(f.key)
                    self._mark_text_dirty()
                    warn_finding(f)


# A class, not a generator-based @contextmanager, which costs several times more per use: hooks
# enter it tens of times per training step.
class _Guard:
    __slots__ = ("_check", "_what")

    def __init__(self, check: AuditCallback, what: str) -> None:
        self._check = check
        self._what = what

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if kind is None or not isinstance(exc, Exception) or isinstance(exc, GradientAuditError):
            return False
        check = self._check
        if check.on_finding == "raise":
            if not is_distributed(check._trainer):
                return False
            check._held = check._held or exc  # raised on every rank at the end of the hook
            return True
        check.skip(f"{self._what} failed: {type(exc).__name__}: {exc}")
        return True

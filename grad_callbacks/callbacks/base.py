"""The base of every check's Lightning callback: settings, state, pickling, the hooks all share.

A check subclasses :class:`AuditCallback`, maps Lightning hooks to calls into the core, and
reports :class:`~grad_callbacks.findings.Finding` objects with :meth:`AuditCallback.report`.
The base class does the rest, with two mixins that define no Lightning hook of their own
(:func:`~grad_callbacks.callbacks.hooks.wrap_hooks` wraps only the hooks a class defines
itself, so every hook stays here):

* what becomes of a finding (:mod:`grad_callbacks.callbacks.policy`): the ``on_finding``
  policy, gathering findings from every DDP rank at epoch and fit end, and the findings of
  processes ``strategy="ddp_spawn"`` started;
* the outputs (:mod:`grad_callbacks.callbacks.outputs`): the checks' scalars, to the loggers
  ``loggers`` selects, and what the first audit callback of a trainer (the *leader*) writes
  once for all of them: the findings text and custom-scalars layout in TensorBoard, and
  ``grad_audit.json`` at the end of fit, also when fit ends by an exception or interrupt;
* ``state_dict`` / ``load_state_dict`` with a ``state_key`` derived from the settings, so
  several instances of a check can coexist in one checkpoint (computed once per fit: Lightning
  reads it at every hook call, to name the hook in its profiler);
* under a strategy that shards gradients (FSDP, DeepSpeed), a check with
  ``needs_whole_gradients`` reports ``check-skipped`` once and its hooks do no work;
* under DDP with ``on_finding="raise"``, an error found on one rank stops every rank together:
  the finding is held until the end of the hook, where every rank learns whether any rank holds
  one (a one-sided exception would leave the other ranks waiting in the next collective);
* pickling and ``copy.deepcopy`` before, during and after fit (``strategy="ddp_spawn"`` pickles
  the callbacks, ``pickle.dumps(trainer)`` too): what a check holds of a running fit (the
  trainer, hooks on tensors and optimizers, device read-backs), named in
  :attr:`AuditCallback.live_attributes`, stays behind; the copy keeps its settings and findings
  and sets up afresh when a fit starts.

The last two are done by a wrapper around every Lightning hook a check defines
(:func:`~grad_callbacks.callbacks.hooks.audit_hook`), so a check's own hook methods stay
plain.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl

from grad_callbacks.callbacks import spawned
from grad_callbacks.callbacks.distributed import is_distributed, sharded_strategy
from grad_callbacks.callbacks.hooks import (
    BASE_HOOK_BODIES,
    CALLBACK_HOOKS,
    wrap_hooks,
)
from grad_callbacks.callbacks.outputs import Outputs, _findings_changes, run_log_dir
from grad_callbacks.callbacks.policy import FindingPolicy
from grad_callbacks.core.budget import OverheadBudget
from grad_callbacks.core.clock import GC_SECONDS as _GC
from grad_callbacks.core.norms import NormFn, grad_norms
from grad_callbacks.findings import Finding, FindingLog
from grad_callbacks.sinks import tensorboard as tb
from grad_callbacks.sinks.loggers import LoggerSelection, check_selection

__all__ = ["AuditCallback", "OnFinding", "audit_callbacks", "run_log_dir"]

OnFinding = Literal["warn", "raise", "log"]
_POLICIES = ("warn", "raise", "log")


class _StateKey:
    """``AuditCallback.state_key``: computed from the settings, unless frozen for a fit (then
    the instance's own attribute of that name answers, without calling anything)."""

    def __get__(self, obj: AuditCallback | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if obj._state_key is not None:
            return obj._state_key
        return obj._compute_state_key()


class AuditCallback(FindingPolicy, Outputs, pl.Callback):
    """Base class of the checks.

    Args:
        every_n_steps: run the periodic part of the check every this many optimizer steps.
        on_finding: ``"warn"`` (default), ``"raise"`` or ``"log"``.
        report_dir: where to write ``grad_audit.json`` (a path or an fsspec URL); None: the
            run's log directory, and no report when the trainer has no logger.
        loggers: which of the trainer's loggers get the scalars and TensorBoard extras:
            ``"all"``, ``"tensorboard"``, None, or logger classes or class names
            (:mod:`grad_callbacks.sinks.loggers`). Both are also attributes, to set on a check
            whose constructor does not take them; a check inside ``GradientAudit`` follows
            the audit's.
    """

    #: Name used in findings, reports and TensorBoard tags.
    check_name: ClassVar[str] = "AuditCallback"
    #: Attributes that hold objects of the running fit (the trainer, hooks on tensors and
    #: optimizers, pending device read-backs): left out when the check is pickled or copied
    #: (an empty list, dict or set, else None, in the copy) and set up again when a fit starts.
    #: A subclass lists its own; those of its base classes are added.
    live_attributes: ClassVar[tuple[str, ...]] = ("_trainer", "_held")
    #: Short tag prefix under ``grad_audit/`` for this check's scalars.
    metric_prefix: ClassVar[str] = "check"
    # Findings made in spawned processes (grad_callbacks.callbacks.spawned): the file a spawned
    # copy writes back to, and, in the launching process, the file it reads from.
    _return_to: str | None = None
    _spawn_return: str | None = None

    def __init__(
        self,
        *,
        every_n_steps: int = 1,
        on_finding: OnFinding = "warn",
        report_dir: str | None = None,
        loggers: LoggerSelection = "all",
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if on_finding not in _POLICIES:
            raise ValueError(f"on_finding must be one of {_POLICIES}, got {on_finding!r}")
        self.every_n_steps = every_n_steps
        self.on_finding: OnFinding = on_finding
        self.report_dir = None if report_dir is None else str(report_dir)
        self.loggers: LoggerSelection = check_selection(loggers)
        #: Where the report was last written (None before, or when none was written).
        self.report_path: str | None = None
        self._log = FindingLog()
        self._remote: dict[int, list[Finding]] = {}
        self._announced: set[tuple[str, tuple[str, ...]]] = set()
        self.seconds_spent = 0.0
        self.steps_checked = 0
        self._pending_scalars: dict[int, dict[str, float]] = {}
        self._text_dirty = False
        self._text_changes_seen = -1  # _findings_changes when the leader last looked
        self._text_written: frozenset[Any] | None = None  # the findings the table last showed
        self._report_written = False
        self._trainer: pl.Trainer | None = None
        self._is_leader = False
        self._owner: AuditCallback | None = None
        #: Set by GradientAudit: the shared overhead budget, and this check's share of it.
        self.budget: OverheadBudget | None = None
        self.budget_share = 0.0
        self._state_key: str | None = None  # frozen from setup to teardown
        self._inactive = False  # set at setup under a strategy this check cannot audit
        self._held: Finding | Exception | None = None  # an error waiting for the other ranks
        self._distributed_fit = False  # set at setup: several processes
        self._in_hook = False
        #: Per-tensor gradient L2 norms; GradientAudit shares one pass among its checks.
        self.norm_fn: NormFn = grad_norms
        #: Whether the check is watching the current batch (see :attr:`watches_steps`).
        self.watching = True

    # ------------------------------------------------------------------ identity and state
    def settings(self) -> dict[str, Any]:
        """The constructor settings that identify this instance (used in reports, state_key)."""
        return {"every_n_steps": self.every_n_steps, "on_finding": self.on_finding}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wrap_hooks(cls)

    def __getstate__(self) -> dict[str, Any]:
        """The check without what it holds of a running fit (see :attr:`live_attributes`).

        Example:
            >>> import pickle
            >>> check = AuditCallback(on_finding="log")
            >>> check._trainer = object()  # what setup() sets: not carried over
            >>> pickle.loads(pickle.dumps(check))._trainer is None
            True
        """
        self._take_back()  # a process started again starts from what the last ones found
        state = self.__dict__.copy()
        state["_spawn_return"] = None
        state["_return_to"] = (
            spawned.return_file(self)
            if self._owner is None and spawned.pickled_to_spawn()
            else None
        )
        for name in _live_attributes(type(self)):
            if name in state:
                value = state[name]
                state[name] = type(value)() if isinstance(value, (list, dict, set)) else None
        state["_in_hook"] = False  # a copy made inside a hook is not inside it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    #: Whether the check reads whole gradients (or runs the model outside the training step),
    #: so that it cannot run under a strategy that shards them (FSDP, DeepSpeed).
    needs_whole_gradients: ClassVar[bool] = True

    #: Whether the check runs ``training_step`` again with the step's batch (it cannot when
    #: ``training_step`` takes Lightning's ``dataloader_iter`` and draws the batch itself).
    reruns_training_step: ClassVar[bool] = False

    #: Whether the check works at every step and can watch some batches only: GradientAudit's
    #: overhead budget then has it watch windows of consecutive batches
    #: (:class:`~grad_callbacks.core.budget.WatchWindows`), calling :meth:`stop_watching` and
    #: :meth:`start_watching` between them and none of its per-batch hooks in the gaps.
    watches_steps: ClassVar[bool] = False

    def next_busy_step(self, step: int) -> int | None:
        """The first optimizer step, from ``step`` (the current ``global_step``) on, at which any
        of the check's per-batch hooks (``hooks.BATCH_HOOKS``) may do something; None: none until
        the check calls :meth:`wake`.

        ``GradientAudit`` does not call a check's per-batch hooks before that step (it asks
        again after each batch in which it called them): a check whose next work is 50 steps
        away costs nothing per batch until then. The answer must hold for the check's own state
        as it is now, which only its hooks (and the audit's calls into it) change. Default:
        ``step`` (busy at every batch), right for any check.
        """
        return step

    def wake(self) -> None:
        """Have ``GradientAudit`` call this check's per-batch hooks again from the next one on
        (its state changed outside its hooks: see :meth:`next_busy_step`)."""
        owner = self._owner
        if owner is not None:
            owner._wake(self)  # type: ignore[attr-defined]

    def start_watching(self) -> None:
        """Watch again after a gap, knowing nothing of the batches in it."""
        self.watching = True

    def stop_watching(self) -> None:
        """Stop watching: drop per-batch hooks, read what was gathered."""
        self.watching = False

    # Lightning reads state_key at every hook call of every callback: from setup to teardown
    # it is a plain instance attribute (no call at all), else computed (see _StateKey).
    state_key = _StateKey()  # type: ignore[assignment]

    def _compute_state_key(self) -> str:
        settings = {k: v for k, v in self.settings().items() if k != "on_finding"}
        return self._generate_state_key(**settings)

    def extra_state(self) -> dict[str, Any]:
        """Check-specific state to checkpoint (override with :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "findings": self._log.state_dict(),
            "remote": {r: [f.to_dict() for f in fs] for r, fs in self._remote.items()},
            "seconds_spent": self.total_seconds,
            "steps_checked": self.steps_checked,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._log.load_state_dict(state_dict.get("findings", []))
        self._remote = {
            int(r): [Finding.from_dict(f) for f in fs]
            for r, fs in state_dict.get("remote", {}).items()
        }
        self.seconds_spent = float(state_dict.get("seconds_spent", 0.0))
        self.steps_checked = int(state_dict.get("steps_checked", 0))
        self._announced = {f.key for f in self.findings}
        self.load_extra_state(state_dict.get("extra", {}))

    # ------------------------------------------------------------------ steps and time
    @property
    def current_step(self) -> int:
        """The trainer's global step (what ``self.log`` would stamp), 0 before fit."""
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def outside_seconds(self) -> float:
        """Time spent so far in hooks the check put on tensors or optimizers, which autograd
        and the optimizers call outside the check's Lightning hooks (not in :meth:`timed`)."""
        return 0.0

    @property
    def total_seconds(self) -> float:
        """All the time the check has taken: its Lightning hooks' and :attr:`outside_seconds`."""
        return self.seconds_spent + self.outside_seconds

    def timed(self) -> _Timer:
        """Count the time spent inside the block (a ``with`` statement) as this check's time."""
        return _Timer(self)

    @property
    def sampled(self) -> bool:
        """Whether the check watches some batches only (windows under GradientAudit's budget)."""
        return self.watches_steps and getattr(self._owner, "watch_windows", None) is not None

    # ------------------------------------------------------------------ lifecycle used by all
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._state_key = self._compute_state_key()
        self.__dict__["state_key"] = self._state_key
        if stage == "fit":
            self._report_written = False
            self._text_written = None
            self._text_changes_seen = -1
            self._held = None
            self._distributed_fit = is_distributed(trainer)
            self._is_leader = self._owner is None and _first_audit_callback(trainer) is self
            sharded = sharded_strategy(trainer)
            self._inactive = sharded is not None and self.needs_whole_gradients
            if self._inactive:
                self.skip(
                    f"the {sharded} strategy shards parameters and gradients across processes, "
                    f"and {self.check_name} needs whole gradients on every process; it runs "
                    f"on a single device and under DDP"
                )
            elif self.reruns_training_step and _draws_its_own_batch(pl_module):
                self._inactive = True
                self.skip(
                    f"training_step(dataloader_iter) draws its batch from the iterator itself, "
                    f"and {self.check_name} runs training_step again on the step's batch; it "
                    f"does not run"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_leader:
            writer = self.tensorboard_writer(trainer)
            if writer is not None:
                charts: dict[str, list[str]] = {}
                for check in [*audit_callbacks(trainer), self]:
                    charts.update(check.scalar_charts())
                tb.write_layout(writer, charts)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._pending_scalars:
            self._flush_scalars(trainer)
        if self._is_leader and self._text_changes_seen != _findings_changes[0]:
            self._text_changes_seen = _findings_changes[0]
            if any(c._text_dirty for c in audit_callbacks(trainer)):
                self._write_findings_text(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gather(trainer)

    def release(self) -> None:
        """Drop the hooks and device buffers the check holds while training runs.

        Called at the end of training, when fit ends by an exception, and at teardown.
        """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.release()
        self._gather(trainer)
        self._flush_scalars(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()
        self._state_key = None
        self.__dict__.pop("state_key", None)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_leader:
            self._write_outputs(trainer, status="finished")
        self._send_back(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.release()
        if self._is_leader:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            self._write_outputs(trainer, status=status, error=repr(exception))
        self._send_back(trainer)


# A class, not a generator-based @contextmanager, which costs several times more per use: hooks
# enter it tens of times per training step (as they do policy._Guard).
class _Timer:
    """Adds the time spent in the block to ``owner.<attribute>``, without the garbage
    collector's pauses while GradientAudit runs (:mod:`grad_callbacks.core.clock`)."""

    __slots__ = ("_attribute", "_owner", "_start")

    def __init__(self, owner: object, attribute: str = "seconds_spent") -> None:
        self._owner = owner
        self._attribute = attribute
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = perf_counter() - _GC[0]

    def __exit__(self, *exc: object) -> None:
        spent = perf_counter() - _GC[0] - self._start
        setattr(self._owner, self._attribute, getattr(self._owner, self._attribute) + spent)


def _draws_its_own_batch(pl_module: pl.LightningModule) -> bool:
    """Whether ``training_step`` takes ``dataloader_iter`` (Lightning then hands it the iterator,
    not a batch)."""
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    step = getattr(pl_module, "training_step", None)
    return callable(step) and is_param_in_hook_signature(step, "dataloader_iter", explicit=True)


def audit_callbacks(trainer: pl.Trainer) -> list[AuditCallback]:
    """Every audit check attached to ``trainer``, those inside a ``GradientAudit`` included."""
    found: list[AuditCallback] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        children = getattr(cb, "checks", None)
        if isinstance(cb, AuditCallback) and children is not None:
            found.extend(children)
        elif isinstance(cb, AuditCallback):
            found.append(cb)
    return found


@functools.cache
def _live_attributes(cls: type[AuditCallback]) -> frozenset[str]:
    return frozenset(
        name for klass in cls.__mro__ for name in vars(klass).get("live_attributes", ())
    )


def _first_audit_callback(trainer: pl.Trainer) -> pl.Callback | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, AuditCallback):
            return cb
    return None


BASE_HOOK_BODIES.update(
    {name: body for name, body in vars(AuditCallback).items() if name in CALLBACK_HOOKS}
)
wrap_hooks(AuditCallback)

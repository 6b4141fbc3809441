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
    GradientMonitor
    RankSyncCheck
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.callbacks.hooks import (
    BASE_HOOK_BODIES,
    BATCH_HOOKS,
    CALLBACK_HOOKS,
    audit_hook,
)
from grad_callbacks.callbacks.monitor import GradientMonitor
from grad_callbacks.callbacks.pacing import LATENCY_BOUNDS, Pacing
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.rank_sync import RankSyncCheck
from grad_callbacks.callbacks.routing import Router
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.core import clock
from grad_callbacks.core.budget import OverheadBudget
from grad_callbacks.core.norms import NormCache
from grad_callbacks.findings import Finding
from grad_callbacks.sinks.loggers import LoggerSelection
from grad_callbacks.sinks.loggers import describe as describe_loggers

# Seconds of garbage collection so far (see grad_callbacks.core.clock): the audit's own timers
# leave the collector's pauses out; the training time keeps them.
_GC = clock.GC_SECONDS

#: The checks ``GradientAudit()`` runs by default, in order.
DEFAULT_CHECKS: tuple[type[AuditCallback], ...] = (
    ZeroGradCheck,
    PerSampleGradientCheck,
    BatchMixingCheck,
    GradientSanityCheck,
    AutogradCheck,
    GradientMonitor,
    RankSyncCheck,  # only with several data-parallel ranks
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
# Hooks GradientAudit defines itself (the batch hooks time the batch around the checks' own
# hooks); every other hook is forwarded to the checks (_forward).
_OWN_HOOKS = {
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
}
_HOOKS = [name for name in CALLBACK_HOOKS if name not in _OWN_HOOKS]
_FORWARDED_BATCH_HOOKS = sorted(BATCH_HOOKS - _OWN_HOOKS)

#: Share of the overhead budget given to each periodic check the budget spaces (never more often
#: than its every_n_steps).
BUDGET_SHARES: dict[str, float] = {"PerSampleGradientCheck": 0.5, "GradientMonitor": 0.1}
#: Settings GradientAudit gives a check it builds when the user passes no every_n_steps.
#: GradientSanityCheck reads its device accumulators every 20 steps instead of every step (the
#: steps in its findings stay exact; a NaN/Inf makes GradientAudit's sentinel read them at
#: once); not under on_finding="raise", which must stop training at the bad step.
AUDIT_DEFAULTS: dict[str, dict[str, Any]] = {"GradientSanityCheck": {"every_n_steps": 20}}


class GradientAudit(Pacing, AuditCallback):
    """Runs several checks as one callback and writes one report for all of them.

    Args:
        checks: check instances, or check classes to build with the common settings;
            default: every check of :data:`DEFAULT_CHECKS`.
        every_n_steps: passed to the checks built here; None keeps each check's own schedule.
        on_finding: passed to the checks built here.
        max_overhead: the share of training wall time the checks may take (default 3%). The
            expensive periodic checks run at the first step and then as often as their share
            of it allows, never more often than their ``every_n_steps``; the checks that work
            at every step (``ZeroGradCheck``, ``GradientSanityCheck``) watch every batch when
            their share allows it, else windows of consecutive batches (the first from the
            first batch), spaced to stay within their share. None turns the budget off (plain
            ``every_n_steps`` schedules, every batch watched); so does
            ``on_finding="raise"`` for the watching (training must stop at the bad step).
            The report states the measured overhead and the share of batches watched.
        recompute: False forbids every check to run ``training_step`` (or the model) again
            beside the real step: passed to the checks that take it (``PerSampleGradientCheck``,
            ``AutogradCheck`` and ``BatchMixingCheck`` then report ``check-skipped`` and do
            nothing). Use it
            when ``training_step`` has effects outside the module that a recomputation would
            repeat (a file it writes, a counter kept elsewhere). The report's
            ``recomputations`` says how many ran, per check.
        report_dir: where to write ``grad_audit.json``: a path or an fsspec URL. None (the
            default): the run's log directory (the first logger's, as ``trainer.log_dir``),
            and no report when the trainer has no logger (``logger=False``), so that it never
            lands among the checkpoints or in the working directory unasked.
        loggers: which of the trainer's loggers get the audit's scalars (``grad_audit/...``)
            and, for a TensorBoardLogger, its findings text, layout and histograms: ``"all"``
            (default), ``"tensorboard"``, None (none), or a sequence of logger classes or
            class names (see :mod:`grad_callbacks.sinks.loggers`).
    """

    check_name = "GradientAudit"
    metric_prefix = "audit"
    needs_whole_gradients = False  # its checks decide for themselves
    live_attributes = (
        "_router",
        "_gc_clock",
        "_batch_started",
        "finite_sentinel",
        "clear_sentinel",
        "_optimizers",
        "_step_total",
    )

    def __init__(
        self,
        checks: Sequence[AuditCallback | type[AuditCallback]] | None = None,
        *,
        every_n_steps: int | None = None,
        on_finding: OnFinding = "warn",
        max_overhead: float | None = 0.03,
        recompute: bool = True,
        report_dir: str | None = None,
        loggers: LoggerSelection = "all",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps or 1,
            on_finding=on_finding,
            report_dir=report_dir,
            loggers=loggers,
        )
        self.max_overhead = max_overhead
        self.recompute = recompute
        self.budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        self._batch_started: float | None = None
        # Whether the watching checks, and the sanity check, watch the current batch (None: not
        # known yet).
        self._watching: tuple[bool, bool] | None = None
        self._own_seconds = 0.0  # in this callback's hooks, its checks' included
        self._every_n_steps_given = every_n_steps
        # One pass of gradient norms per optimizer step for the checks that read them.
        self._norm_cache = NormCache()
        common: dict[str, Any] = {"on_finding": on_finding}
        if every_n_steps is not None:
            common["every_n_steps"] = every_n_steps
        built: list[AuditCallback] = []
        for check in checks if checks is not None else DEFAULT_CHECKS:
            if isinstance(check, type) and issubclass(check, AuditCallback):
                own = AUDIT_DEFAULTS.get(check.check_name, {})
                if every_n_steps is not None or on_finding == "raise":
                    own = {}
                kwargs = {**own, **common}
                if not recompute and "recompute" in inspect.signature(check).parameters:
                    kwargs["recompute"] = False
                check = check(**kwargs)
            if not isinstance(check, AuditCallback):
                raise TypeError(f"GradientAudit takes audit checks, got {check!r}")
            if not recompute and hasattr(check, "recompute"):
                check.recompute = False
            check._owner = self
            check.norm_fn = self._norm_cache.norms
            if self.budget is not None and check.check_name in BUDGET_SHARES:
                check.budget, check.budget_share = self.budget, BUDGET_SHARES[check.check_name]
            built.append(check)
        self.checks: list[AuditCallback] = built
        self._watchers = [c for c in built if c.watches_steps]
        # Checks whose work the budget schedules (the rest of the audit's time is fixed cost).
        self._scheduled = [c for c in built if c.watches_steps or c.budget is not None]
        # Checks with hooks on tensors or optimizers, timed apart (outside_seconds).
        self._hooking = [
            c for c in built if type(c).outside_seconds is not AuditCallback.outside_seconds
        ]
        self._init_pacing(on_finding)
        self._one_time = False
        self._optimizers: list[Any] = []
        self._optimizer_index: dict[int, int] = {}
        self._gc_clock = False  # whether this callback installed the clock's GC callback
        # Per batch, for the budget: this callback's time at the start of the batch, and each
        # check's (total, outside) seconds when the batch first reached it (an awake check at
        # the start, one woken or started watching later on). A check that sleeps through the
        # batch spends nothing in it.
        self._own_before = 0.0
        self._before: dict[int, tuple[float, float]] = {}
        index = {id(c): i for i, c in enumerate(built)}
        self._watcher_ids = frozenset(index[id(c)] for c in self._watchers)
        self._scheduled_ids = frozenset(index[id(c)] for c in self._scheduled)
        self._hooking_ids = frozenset(index[id(c)] for c in self._hooking)
        self._accounted_ids = self._watcher_ids | self._scheduled_ids | self._hooking_ids
        self._route()

    def _route(self) -> None:
        """Find, per hook, the checks that do something in it (the others are not called), and
        which checks sleep (see :mod:`~grad_callbacks.callbacks.routing`). The routes hold
        hook bodies, which pickle cannot carry, so a copy routes again (:meth:`__setstate__`)."""
        self._router = Router(self.checks)
        self._router.listener = self._follow_routes
        self._follow_routes()

    def _follow_routes(self) -> None:
        """Lightning calls every hook of every callback at every batch: a per-batch hook with
        nothing to do in it now (no awake check's, and under automatic optimization no loss to
        take in ``on_before_backward``) is Lightning's no-op here, not a wrapper that finds
        nothing to do."""
        batch, own = self._router.batch, self.__dict__
        self._idle_batches, self._idle_now = 0, False  # something changed: no idle batches
        for name in _FORWARDED_BATCH_HOOKS:
            if batch[name]:
                own.pop(name, None)
            else:
                own[name] = _noop
        if self._automatic and not batch["on_before_backward"]:
            own["on_before_backward"] = _noop
        else:
            own.pop("on_before_backward", None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._route()

    @property
    def findings(self) -> list[Finding]:
        self._take_back()
        return [f for check in self.checks for f in check.findings]

    def _compute_state_key(self) -> str:
        return self._generate_state_key(checks=[c.state_key for c in self.checks])

    def _agreeing_checks(self) -> list[AuditCallback]:
        return self.checks

    def state_dict(self) -> dict[str, Any]:
        return {check.state_key: check.state_dict() for check in self.checks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for check in self.checks:
            if check.state_key in state_dict:
                check.load_state_dict(state_dict[check.state_key])
        self._router.wake_all()

    def settings(self) -> dict[str, Any]:
        return {
            "every_n_steps": self._every_n_steps_given,
            "on_finding": self.on_finding,
            "max_overhead": self.max_overhead,
            "checks": [c.check_name for c in self.checks],
            # only when off: the default keeps the checkpoint state keys of earlier versions
            **({"recompute": False} if not self.recompute else {}),
            "report_dir": self.report_dir,
            "loggers": describe_loggers(self.loggers),
        }

    @property
    def audit_seconds(self) -> float:
        """All the time the audit has taken so far: in its hooks (its checks' work and calling
        them) and in the hooks its checks put on tensors and optimizers."""
        return self._own_seconds + sum(check.outside_seconds for check in self._hooking)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Call hook ``name`` of every check that does something in it (for a per-batch hook:
        every awake check, and for a watched hook, every watching one).

        A check's hook wrapper (:func:`~grad_callbacks.callbacks.hooks.audit_hook`) is skipped
        unless the check is inactive: for a check inside this callback it would only repeat
        what this callback's wrapper did (leave dynamo, agree with the other ranks).
        """
        router = self._router
        route = router.batch.get(name)
        for check, body in router.targets[name] if route is None else route:
            if check._inactive:
                getattr(check, name)(*args, **kwargs)
            else:
                body(check, *args, **kwargs)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = perf_counter() - _GC[0]
        try:
            self._router.wake_all()
            if self.budget is not None and not self._gc_clock:
                clock.install()  # the collector's pauses are left out of the audit's time
                self._gc_clock = True
            if self.watch_windows is not None:
                self.watch_windows.accumulate = 0  # the lengths are set at the first batch
            self._watching = None
            self._automatic = bool(pl_module.automatic_optimization)
            self._follow_routes()
            self._call("on_train_start", trainer, pl_module)
            AuditCallback.on_train_start(self, trainer, pl_module)
            self._start_sentinels(trainer)
            self._set_window_steps()
            self._follow_global_step(trainer)
        finally:
            self._own_seconds += perf_counter() - _GC[0] - start

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = started = perf_counter()
        start = started - _GC[0]
        self._own_before = self._own_seconds
        if self._idle_batches:
            step = self._step_total.completed
            windows = self.watch_windows
            # (A GradientAccumulationScheduler changes accumulate between epochs.)
            if step < self._idle_until_step and (
                trainer.accumulate_grad_batches == windows.accumulate  # type: ignore[union-attr]
            ):
                # A batch in a gap with every check asleep (see _plan_idle): count it, no more.
                self._idle_batches -= 1
                self._idle_now = True
                self._step, self._batch_idx, self._one_time = step, batch_idx, False
                windows.batches += 1  # type: ignore[union-attr]
                self._own_seconds += perf_counter() - _GC[0] - start
                return
        self._idle_batches, self._idle_now = 0, False
        self._before = {}
        router = self._router
        for i in router.awake_indices:
            self._touch(i)
        try:
            step = self._step = self._global_step(trainer)
            # The batches before the first optimizer step carry the one-time audit.
            self._one_time = step == 0
            self._batch_idx = batch_idx
            if router.next_wake is not None and step >= router.next_wake:
                self._wake_due(step)
            finite = self.finite_sentinel
            if finite is not None and finite._reads:
                self._poll_finite()
            windows = self.watch_windows
            if windows is not None:
                # Most batches change nothing: the window (or gap) goes on.
                if (
                    trainer.accumulate_grad_batches != windows.accumulate
                    or windows.tick() is None
                ):
                    self._choose_watching(trainer, batch_idx)
            if router.batch["on_train_batch_start"]:
                self._call("on_train_batch_start", trainer, pl_module, batch, batch_idx)
        finally:
            self._own_seconds += perf_counter() - _GC[0] - start

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        start = perf_counter() - _GC[0]
        try:
            finite = self.finite_sentinel
            if finite is not None and not self._automatic:
                # In manual optimization the step moves within the batch. (Under automatic
                # optimization the loss comes at the batch's end, already detached.)
                finite.add_loss(loss, self._global_step(trainer), self._batch_idx)
            if self._router.batch["on_before_backward"]:
                self._call("on_before_backward", trainer, pl_module, loss)
        finally:
            self._own_seconds += perf_counter() - _GC[0] - start

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # The gradient norms are shared only within this hook call: the gradients do not change
        # between the checks' hooks, and no reference to them outlives it.
        start = perf_counter() - _GC[0]
        try:
            if not self._automatic:
                self._wake_due(self._global_step(trainer))  # several steps in one batch
            if self._router.batch["on_before_optimizer_step"]:
                self._norm_cache.clear()
                self._call("on_before_optimizer_step", trainer, pl_module, optimizer)
            if self.finite_sentinel is not None or self.clear_sentinel is not None:
                self._sentinels_at_step(trainer, optimizer)
        finally:
            if self._norm_cache._key is not None:  # it holds norms of this step
                self._norm_cache.clear()
            self._own_seconds += perf_counter() - _GC[0] - start

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        start = perf_counter() - _GC[0]
        finite = self.finite_sentinel
        if finite is not None and self._automatic and type(outputs) is dict:
            # Lightning's own detached copy of the loss (divided by accumulate_grad_batches)
            loss = outputs.get("loss")
            if loss is not None:
                finite.add_detached_loss(loss, self._step, batch_idx)
        if self._idle_now:
            # Nothing happened in this batch (an event would have ended the idle run).
            self._idle_now = False
            now = perf_counter()
            pending = self._idle_pending
            pending[0] += 1
            pending[1] += now - self._batch_started  # type: ignore[operator]
            pending[2] += self._own_seconds - self._own_before + now - _GC[0] - start
            self._own_seconds += now - _GC[0] - start
            return
        try:
            if self._router.batch["on_train_batch_end"]:
                self._call("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
            # What the base class's hook does for a check inside a bundle, for the checks that
            # have no hook of their own (only a check that ran in this batch queued scalars).
            if self._before or self._router.awake_indices:
                for check in self._router.flushed_only:
                    if check._pending_scalars:
                        check._flush_scalars(trainer)
            BASE_HOOK_BODIES["on_train_batch_end"](
                self, trainer, pl_module, outputs, batch, batch_idx
            )
            if self._router.awake_indices:
                # The checks with nothing to do before a later step sleep until then. The step
                # at the start of this batch will do: a check busy at it but not at the next
                # one sleeps after the next batch.
                self._router.settle(self._step)
            self._plan_idle(trainer)
        finally:
            self._own_seconds += perf_counter() - _GC[0] - start
        if self.budget is not None and self._batch_started is not None:
            self._record_batch()

    def release(self) -> None:
        if self._gc_clock:
            clock.uninstall()
            self._gc_clock = False

    def scalar_charts(self) -> dict[str, list[str]]:
        """The measured overhead, when there is a budget (the checks bring their own charts)."""
        if not self.budget:
            return {}
        return {
            "Audit overhead": [
                "grad_audit/audit/overhead",
                "grad_audit/audit/steady_overhead",
                "grad_audit/audit/watched_share",
            ]
        }

    def report_extras(self) -> dict[str, Any]:
        if self.budget is None:
            return {}
        self._record_idle()
        budget, windows = self.budget, self.watch_windows
        steady = budget.steady_overhead
        return {
            "overhead": {
                "max_overhead": self.max_overhead,
                "measured": round(budget.overhead, 6),
                "check_seconds": round(budget.check_seconds, 6),
                "train_seconds": round(budget.train_seconds, 6),
                "steps": budget.steps,
                "one_time": {
                    "seconds": round(budget.one_time_seconds, 6),
                    "training_steps": round(budget.one_time_steps, 2),
                    "what": (
                        "the first optimizer step's batches: every check's first run "
                        "(per-sample comparison, batch mixing, autograd check)"
                    ),
                },
                "steady_state": {
                    "from_step": budget.steady_from,
                    "measured": round(steady, 6) if steady is not None else None,
                    "check_seconds": round(budget.steady_check_seconds, 6),
                    "train_seconds": round(budget.steady_train_seconds, 6),
                    "steps": max(0, budget.steps - budget.steady_from),
                },
                "watched_share": round(windows.watched_share, 6) if windows else 1.0,
                "watch_window_batches": windows.length if windows else None,
                "max_window_gap_batches": windows.max_gap if windows else None,
                "windows_requested": windows.requested if windows else 0,
                "missing_hints": self.missing_hints,
                "idle_share": round(self.idle_batch_count / max(budget.steps, 1), 6),
                "latency_bounds_steps": dict(LATENCY_BOUNDS),
            }
        }

    def _gather(self, trainer: pl.Trainer) -> None:
        """The checks gather their own findings; the bundle has none of its own."""


def _noop(*args: Any, **kwargs: Any) -> None:
    """A hook that does nothing (see ``GradientAudit._route``)."""


def _forward(name: str) -> Callable[..., None]:
    def hook(self: GradientAudit, *args: Any, **kwargs: Any) -> None:
        router = self._router
        route = router.batch.get(name)
        if not (router.targets[name] if route is None else route) and name not in _BASE_HOOKS:
            return
        start = perf_counter() - _GC[0]
        try:
            self._call(name, *args, **kwargs)
            if name in _BASE_HOOKS:
                getattr(AuditCallback, name)(self, *args, **kwargs)
        finally:
            self._own_seconds += perf_counter() - _GC[0] - start

    hook.__name__ = name
    hook.__doc__ = f"Runs ``{name}`` of every check."
    return hook


for _name in _HOOKS:
    setattr(GradientAudit, _name, audit_hook(_name, _forward(_name)))

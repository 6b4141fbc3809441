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
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.rank_sync import RankSyncCheck
from grad_callbacks.callbacks.routing import Router
from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.core import clock
from grad_callbacks.core.budget import OverheadBudget, WatchWindows
from grad_callbacks.core.norms import NormCache
from grad_callbacks.core.sentinel import ClearSentinel, FiniteSentinel
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
#: Share of the overhead budget given to the checks that work at every step (those with
#: ``watches_steps``: ZeroGradCheck, GradientSanityCheck). The fixed cost (calling the checks'
#: hooks, the sentinels, the cheap checks) is taken out of the budget before any share.
WATCH_SHARE = 0.4
#: Optimizer steps per spaced watch window: the zero-grad check judges each step of a window but
#: the first (whose previous step it did not see). Under manual optimization, where optimizers
#: may step at different rates, windows last that many batches once every optimizer has
#: stepped at every batch so far, else SANITY_WINDOW_STEPS.
WATCH_WINDOW_STEPS = 2
#: Optimizer steps per window the sanity check watches (at least its patience + 1): the first
#: window, and those the sentinels ask for. Its NaN/Inf and missing gradients are found by the
#: always-on look of FINITE_EVERY_STEPS, so it watches no spaced window where ZeroGradCheck
#: watches them.
SANITY_WINDOW_STEPS = 4
#: After a window opened for parameters without a gradient (seen at a sentinel's look) closes,
#: such hints wait this many optimizer steps, doubling from the first value up to the second
#: at each hint (a parameter that gets a gradient at some steps only keeps hinting). The wait
#: plus a look and a window stays within the 50-step bound of ``missing-grad``.
MISSING_HINT_WAIT_STEPS = (5, 30)
#: Optimizer steps in the first window, from the first batch (a bug present from the start is
#: seen over more steps at once).
FIRST_WINDOW_STEPS = 8
#: The most optimizer steps from one watch window's opening to the next, whatever the budget:
#: a missing zero_grad, a leak, a stale gradient or a parameter without gradient that starts
#: between windows is found within this many steps plus a window's patience.
MAX_WINDOW_GAP_STEPS = 40
#: The always-on sentinel of non-finite losses and gradients looks every this many optimizer
#: steps (one device reduction and a small transfer that does not wait on CUDA): on an
#: accelerator the values land a step or more after the look, on the CPU at once (so it looks
#: less often there, for the same bound).
FINITE_EVERY_STEPS = 5
FINITE_EVERY_STEPS_CPU = 8
# The most batches planned idle at once (see GradientAudit._plan_idle).
_MAX_IDLE_BATCHES = 64
#: The bounds GradientAudit() keeps, in optimizer steps from a bug's first step to its finding
#: (the report states them; tests/callbacks/test_latency.py pins them).
LATENCY_BOUNDS: dict[str, int] = {
    "nonfinite-grad": 10,
    "missing-zero-grad": 50,
    "gradient-leak": 50,
    "stale-grad": 50,
    "missing-grad": 50,
}
#: Settings GradientAudit gives a check it builds when the user passes no every_n_steps.
#: GradientSanityCheck reads its device accumulators every 20 steps instead of every step (the
#: steps in its findings stay exact; a NaN/Inf makes GradientAudit's sentinel read them at
#: once); not under on_finding="raise", which must stop training at the bad step.
AUDIT_DEFAULTS: dict[str, dict[str, Any]] = {"GradientSanityCheck": {"every_n_steps": 20}}


class GradientAudit(AuditCallback):
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
        #: Which batches the watching checks watch (None: all of them).
        self.watch_windows: WatchWindows | None = None
        # No windows where a watching check must stop training at the bad step.
        raising = on_finding == "raise" or any(c.on_finding == "raise" for c in self._watchers)
        if self.budget is not None and not raising and self._watchers:
            self.watch_windows = WatchWindows(
                self.budget, WATCH_SHARE, WATCH_WINDOW_STEPS, max_gap=MAX_WINDOW_GAP_STEPS
            )
        self._window_steps = WATCH_WINDOW_STEPS
        self._sanity_window_steps = SANITY_WINDOW_STEPS
        # Whether the sanity check watches only the first window and those the sentinels ask
        # for (set at train start: where a sentinel looks and the zero-grad check keeps the
        # spaced windows).
        self._sanity_on_hints = False
        self._sanity_hints_allowed = True  # False: it watches every window (tests of windows)
        # Windows opened for parameters a sentinel's look found without a gradient.
        self.missing_hints = 0
        self._hint_window = False  # whether the window open now was opened for one
        self._hint_seen: Any = None  # the sentinel's latest WithoutGrad already acted on
        self._hint_quiet_until = 0  # no hint before this optimizer step
        self._hint_wait = MISSING_HINT_WAIT_STEPS[0]
        self._missing_known: tuple[int, frozenset[int]] = (0, frozenset())
        # Per optimizer: its parameters, and their count when listed (for the sentinel's look).
        self._look_params: list[tuple[int, list[Any]]] = []
        # Always-on sentinels (set up at train start): a NaN/Inf loss or gradient makes the
        # sanity check read at once; an optimizer stepping on the gradient tensor it stepped on
        # before opens a window for the zero-grad check.
        self._sanity = next((c for c in built if isinstance(c, GradientSanityCheck)), None)
        self._zero_grad = next((c for c in built if isinstance(c, ZeroGradCheck)), None)
        self.finite_sentinel: FiniteSentinel | None = None
        self.clear_sentinel: ClearSentinel | None = None
        self._clear_window: int | None = None  # zero-grad findings when a sentinel asked
        self._batch_idx = 0
        self._step = 0  # global_step at the start of the batch
        self._automatic = True
        self._step_total: Any = None  # Lightning's counter behind trainer.global_step
        # Batches ahead known to have nothing for the audit to do but count, time and keep the
        # loss (see _plan_idle), whether the current batch is one, and what such batches took.
        self._idle_batches = 0
        self._idle_now = False
        self._idle_pending = [0, 0.0, 0.0]  # batches, wall seconds, audit seconds (unrecorded)
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

    # ------------------------------------------------------------------ sleep and wake
    def _touch(self, i: int) -> None:
        """Note check ``i``'s seconds before the batch reaches it (see ``_before``)."""
        if i in self._accounted_ids and i not in self._before:
            check = self.checks[i]
            outside = check.outside_seconds
            self._before[i] = (check.seconds_spent + outside, outside)

    def _wake(self, check: AuditCallback) -> None:
        """Call ``check``'s per-batch hooks again from now on (:meth:`AuditCallback.wake`)."""
        self._touch(self._router.index(check))
        self._router.wake(check)

    def _wake_due(self, step: int) -> None:
        router = self._router
        if router.next_wake is not None and step >= router.next_wake:
            for i in router.wake_due(step):
                self._touch(i)

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

    def _start_sentinels(self, trainer: pl.Trainer) -> None:
        self._optimizers = list(trainer.optimizers)
        self._optimizer_index = {id(opt): i for i, opt in enumerate(self._optimizers)}
        self._look_params = [(-1, []) for _ in self._optimizers]
        self._optimizer_steps = [0] * len(self._optimizers)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # With a GradScaler, NaN/Inf gradients are the scaler's business (it skips the step):
        # the looks then only find parameters without a gradient.
        scaled = scaler is not None and bool(scaler.is_enabled())
        usable = self._sanity is not None and not self._sanity._inactive
        module = trainer.lightning_module
        first = next(iter(module.parameters()), None) if module is not None else None
        on_cpu = first is not None and first.device.type == "cpu"
        every = FINITE_EVERY_STEPS_CPU if on_cpu else FINITE_EVERY_STEPS
        self.finite_sentinel = (
            FiniteSentinel(every, count_nonfinite=not scaled) if usable else None
        )
        self.clear_sentinel = None
        if self.watch_windows is not None and self._zero_grad is not None:
            if not self._zero_grad._inactive:
                self.clear_sentinel = ClearSentinel(self._optimizers)

    def _follow_global_step(self, trainer: pl.Trainer) -> None:
        """Find the progress counter behind ``trainer.global_step`` (read at every batch: the
        property goes through several others to reach it); None where it is not found."""
        self._step_total = None
        try:
            loop = trainer.fit_loop.epoch_loop
            if self._automatic:
                total = loop.automatic_optimization.optim_progress.optimizer.step.total
            else:
                total = loop.manual_optimization.optim_step_progress.total
            if total.completed == trainer.global_step:
                self._step_total = total
        except AttributeError:  # another Lightning's loops: ask the trainer
            pass

    def _global_step(self, trainer: pl.Trainer) -> int:
        total = self._step_total
        return trainer.global_step if total is None else int(total.completed)

    def _set_window_steps(self) -> None:
        """The windows' lengths in optimizer steps, once the sentinels are known."""
        patience = max((getattr(c, "patience", 1) for c in self._watchers), default=1)
        self._sanity_window_steps = max(SANITY_WINDOW_STEPS, patience + 1)
        zero_grad = self._zero_grad
        self._sanity_on_hints = (
            self._sanity_hints_allowed
            and self.watch_windows is not None
            and self.finite_sentinel is not None
            and self._sanity in self._watchers
            and zero_grad is not None
            and zero_grad in self._watchers
            and not zero_grad._inactive
        )
        short = self._sanity_on_hints and self._automatic
        self._window_steps = WATCH_WINDOW_STEPS if short else self._sanity_window_steps
        self._hint_window, self._hint_seen = False, None

    def _manual_window_steps(self, windows: WatchWindows) -> None:
        """Under manual optimization, short windows once every optimizer has stepped at every
        batch so far (each then gets a judged step in a window of two batches)."""
        steps = self._optimizer_steps
        every_batch = bool(steps) and min(steps) >= windows.batches - 1
        self._window_steps = WATCH_WINDOW_STEPS if every_batch else self._sanity_window_steps
        windows.length = self._window_steps * windows.accumulate

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = started = perf_counter()
        start = started - _GC[0]
        self._own_before = self._own_seconds
        if self._idle_batches:
            # A batch in a gap with every check asleep (see _plan_idle): count it, and no more.
            self._idle_batches -= 1
            self._idle_now = True
            step = self._step = self._step_total.completed
            self._one_time = step == 0
            self._batch_idx = batch_idx
            if self._before:
                self._before = {}
            self.watch_windows.batches += 1  # type: ignore[union-attr]
            self._own_seconds += perf_counter() - _GC[0] - start
            return
        self._idle_now = False
        self._before = {}
        router = self._router
        for i in router.awake_indices:
            self._touch(i)
        try:
            total = self._step_total
            step = self._step = trainer.global_step if total is None else total.completed
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

    def _choose_watching(self, trainer: pl.Trainer, batch_idx: int) -> None:
        windows = self.watch_windows
        assert windows is not None
        # Read at every batch: a GradientAccumulationScheduler changes it between epochs.
        accumulate = trainer.accumulate_grad_batches
        if accumulate != windows.accumulate:
            accumulate = max(1, int(accumulate))
            windows.accumulate = accumulate
            windows.length = self._window_steps * accumulate
            windows.first_length = FIRST_WINDOW_STEPS * accumulate
            windows.max_gap = MAX_WINDOW_GAP_STEPS * accumulate
        # The watching checks' time so far, where the windows read it (opening or closing).
        spent = sum(c.total_seconds for c in self._watchers) if windows.needs_spent() else 0.0
        # A window opens where an accumulation window does, so that its first step's count of
        # micro-batches is exact.
        watch = windows.watch(spent, may_open=batch_idx % windows.accumulate == 0)
        # The sanity check watches the first window and those asked for, unless it watches all.
        sanity = watch and (
            not self._sanity_on_hints or windows.on_request or windows.in_first_window
        )
        state = (watch, sanity)
        if state == self._watching:
            return
        was_watching = self._watching is not None and self._watching[0]
        self._watching = state
        for check in self._watchers:
            wanted = sanity if check is self._sanity else watch
            if check.watching != wanted:
                self._touch(self._router.index(check))
                check.start_watching() if wanted else check.stop_watching()
                if wanted:
                    self._router.wake(check)
        self._router.rebuild()
        if not watch and was_watching and not self._automatic and self._sanity_on_hints:
            self._manual_window_steps(windows)
        if not sanity and self._hint_window:
            # The window opened for parameters without a gradient is over: hints wait longer
            # each time (a parameter that gets a gradient at some steps only keeps hinting).
            self._hint_window = False
            self._hint_quiet_until = self._step + self._hint_wait
            self._hint_wait = min(2 * self._hint_wait, MISSING_HINT_WAIT_STEPS[1])
        if not watch and self._clear_window is not None and self._zero_grad is not None:
            # The window the clear sentinel asked for is over: when the exact check found
            # nothing, the sentinel is wrong for this run (gradients cleared in place).
            if len(self._zero_grad.findings) == self._clear_window:
                self.clear_sentinel = None
            self._clear_window = None
        if watch and not was_watching and self.clear_sentinel is not None:
            self.clear_sentinel.reset()

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

    def _poll_finite(self) -> None:
        sentinel = self.finite_sentinel
        assert sentinel is not None and self._sanity is not None
        found = sentinel.poll()
        if found is not None or sentinel.without_grad is not None:
            self._idle_batches, self._idle_now = 0, False  # something to act on
        if found is not None:
            self._touch(self._router.index(self._sanity))
            self._sanity.nonfinite_seen(found)
            self._wake(self._sanity)
            self.finite_sentinel = None  # its work is done: the sanity check reports it
            windows = self.watch_windows
            if windows is not None and not self._sanity.watching:
                windows.request(self._sanity_window_steps * windows.accumulate)
            return
        without = sentinel.without_grad
        if without is not self._hint_seen:
            self._hint_seen = without
            if without is not None and without.params and self._sanity_on_hints:
                self._hint_missing(without.params)

    def _hint_missing(self, params: frozenset[int]) -> None:
        """A look found ``params`` (ids) without a gradient: the sanity check watches a window
        to tell a missing gradient (``patience`` steps in a row) from an occasional one."""
        sanity, windows = self._sanity, self.watch_windows
        assert sanity is not None and windows is not None
        if sanity.watching or self._hint_window or self._step < self._hint_quiet_until:
            return
        if params <= self._missing_reported(sanity):
            return  # already reported as missing
        windows.request(self._sanity_window_steps * windows.accumulate)
        self._hint_window = True
        self.missing_hints += 1

    def _missing_reported(self, sanity: GradientSanityCheck) -> frozenset[int]:
        """The ids of the parameters the sanity check has reported as missing a gradient."""
        findings = sanity.findings
        if self._missing_known[0] != len(findings):
            by_name = {name: i for i, name in sanity._names.items()}
            ids = {
                by_name[name]
                for f in findings
                if f.code == "missing-grad"
                for name in f.params
                if name in by_name
            }
            self._missing_known = (len(findings), frozenset(ids))
        return self._missing_known[1]

    def _sentinels_at_step(self, trainer: pl.Trainer, optimizer: Any) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        index = self._optimizer_index.get(id(raw))
        if index is None:
            return
        self._optimizer_steps[index] += 1
        finite = self.finite_sentinel
        look = finite is not None and finite.due(index)
        clear = self.clear_sentinel
        # At the finite sentinel's looks (at every step without one): the same gradient tensor
        # as at the optimizer's previous look means no zero_grad(set_to_none=True) in between.
        if clear is not None and (look or finite is None) and clear.step(index):
            if self._zero_grad is not None and not self._zero_grad.watching:
                if self._clear_window is None:
                    assert self.watch_windows is not None
                    self._idle_batches, self._idle_now = 0, False
                    self.watch_windows.request()
                    self._clear_window = len(self._zero_grad.findings)
        if look:
            assert finite is not None
            groups = raw.param_groups
            count = sum(len(group["params"]) for group in groups)
            listed, params = self._look_params[index]
            if listed != count:  # new parameter groups (unfreezing)
                params = [p for group in groups for p in group["params"]]
                self._look_params[index] = (count, params)
            cache = self._norm_cache
            # The norms a check computed in this hook are reused (same tensors, unchanged).
            norm_fn = cache.norms if cache._key is not None else None
            step = self._step if self._automatic else self._global_step(trainer)
            finite.check(params, step, self._batch_idx, norm_fn=norm_fn)
            self._poll_finite()

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

    def _plan_idle(self, trainer: pl.Trainer) -> None:
        """How many of the next batches are sure to have nothing for the audit to do but
        count, time, and keep the loss for the sentinel: in a gap between windows, with every
        check asleep, no read on its way, before the next wake-up, the next window and the next
        step whose overhead scalars are logged. Anything that happens meanwhile (a sentinel's
        finding, a check woken, a window asked for) rebuilds the routes, which ends the run."""
        self._idle_batches = 0
        windows, total, router = self.watch_windows, self._step_total, self._router
        if (
            windows is None
            or total is None
            or not self._automatic
            or self._distributed_fit
            or router.awake_indices
            or windows._opened_at is not None
            or windows._wanted
            or trainer.accumulate_grad_batches != windows.accumulate
        ):
            return
        finite = self.finite_sentinel
        if finite is not None and finite._reads:
            return
        step = int(total.completed)  # the next batch's step; each batch adds at most one
        ahead = windows._next_open - windows.batches
        if router.next_wake is not None:
            ahead = min(ahead, router.next_wake - step)
        ahead = min(ahead, -step % max(trainer.log_every_n_steps, 1), _MAX_IDLE_BATCHES)
        self._idle_batches = max(ahead, 0)

    def _record_idle(self) -> None:
        """Tell the budget what the idle batches since the last call took."""
        batches, wall, spent = self._idle_pending
        if batches and self.budget is not None:
            self.budget.record_steps(wall - spent, spent, batches)
        self._idle_pending = [0, 0.0, 0.0]

    def _record_batch(self) -> None:
        """Tell the budget what this batch cost: the audit's time in it, and how much of that
        the budget schedules."""
        assert self.budget is not None and self._batch_started is not None
        if self._idle_pending[0]:
            self._record_idle()
        outside = scheduled = watching = 0.0
        # (No check ran in most batches: then the loop has nothing to add.)
        for i, (total_before, outside_before) in self._before.items():
            check = self.checks[i]
            out = check.outside_seconds
            spent_here = check.seconds_spent + out - total_before
            if i in self._hooking_ids:
                outside += out - outside_before
            if i in self._scheduled_ids:
                scheduled += spent_here
            if i in self._watcher_ids:
                watching += spent_here
        spent = self._own_seconds - self._own_before + outside
        if self.watch_windows is not None and self.watch_windows.capped:
            # Windows kept closer than their share allows (the latency bound) are a fixed
            # cost: the budget takes it out first, so the periodic checks space out more.
            scheduled -= watching
        self.budget.record_step(
            perf_counter() - self._batch_started - spent,
            spent,
            scheduled,
            one_time=self._one_time,
        )
        self._batch_started = None
        trainer = self._trainer
        # On the logging cadence, by the step the batch started at (no property chain).
        if trainer is not None and self._step % max(trainer.log_every_n_steps, 1) == 0:
            scalars = {"overhead": self.budget.overhead}
            steady = self.budget.steady_overhead
            if steady is not None:
                scalars["steady_overhead"] = steady
            if self.watch_windows is not None:
                scalars["watched_share"] = self.watch_windows.watched_share
            self.queue_scalars(scalars)

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

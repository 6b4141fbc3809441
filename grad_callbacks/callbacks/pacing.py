"""When GradientAudit's per-step checks watch, its always-on sentinels, and what a batch costs.

A mixin of :class:`~grad_callbacks.callbacks.audit.GradientAudit` (it defines no Lightning
hook; the audit's hooks call these):

* **watch windows**: which batches ``ZeroGradCheck`` watches (spaced windows, at most
  :data:`MAX_WINDOW_GAP_STEPS` apart) and which ``GradientSanityCheck`` watches (the first
  window and those the sentinels ask for);
* **sentinels**: every few optimizer steps one look at the losses and the stepping optimizer's
  gradients (NaN/Inf, and parameters without a gradient, which open a window for the sanity
  check), and a look at whether an optimizer steps on the gradient tensor it stepped on before
  (a window for the zero-grad check);
* **idle batches**: batches known ahead to have nothing for the audit to do but count, time,
  and keep the loss;
* the **budget's bookkeeping** per batch: the audit's time in it, what of that the budget
  schedules, and the idle batches in bulk.

The latency bounds these keep (:data:`LATENCY_BOUNDS`) are pinned by
tests/callbacks/test_latency.py and tests/callbacks/test_sanity_hints.py.
"""

from __future__ import annotations

from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.sanity import GradientSanityCheck
from grad_callbacks.callbacks.zero_grad import ZeroGradCheck
from grad_callbacks.core import clock
from grad_callbacks.core.budget import WatchWindows
from grad_callbacks.core.sentinel import ClearSentinel, FiniteSentinel

if TYPE_CHECKING:
    from grad_callbacks.callbacks.base import AuditCallback
    from grad_callbacks.callbacks.routing import Router

# Seconds of garbage collection so far (see grad_callbacks.core.clock).
_GC = clock.GC_SECONDS

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
# The most batches planned idle at once (see Pacing._plan_idle).
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


class Pacing:
    """The watch windows, sentinels, idle batches and per-batch bookkeeping of
    :class:`~grad_callbacks.callbacks.audit.GradientAudit` (see the module docstring).

    The attributes below are GradientAudit's (set in its ``__init__``).
    """

    checks: list[AuditCallback]
    budget: Any
    watch_windows: WatchWindows | None
    finite_sentinel: FiniteSentinel | None
    clear_sentinel: ClearSentinel | None
    missing_hints: int
    _router: Router

    def _init_pacing(self, on_finding: str) -> None:
        """The state of the windows, sentinels and idle batches (from GradientAudit's
        ``__init__``, once its checks, watchers and budget exist)."""
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
        self._sanity = next((c for c in self.checks if isinstance(c, GradientSanityCheck)), None)
        self._zero_grad = next((c for c in self.checks if isinstance(c, ZeroGradCheck)), None)
        self.finite_sentinel: FiniteSentinel | None = None
        self.clear_sentinel: ClearSentinel | None = None
        self._clear_window: int | None = None  # zero-grad findings when a sentinel asked
        self._batch_idx = 0
        self._step = 0  # global_step at the start of the batch
        self._automatic = True
        self._step_total: Any = None  # Lightning's counter behind trainer.global_step
        #: Batches that were idle so far (see _plan_idle), counted when given to the budget.
        self.idle_batch_count = 0
        # Batches ahead known to have nothing for the audit to do but count, time and keep the
        # loss (see _plan_idle), whether the current batch is one, and what such batches took.
        self._idle_batches = 0
        self._idle_until_step = 0
        self._idle_now = False
        self._idle_pending = [0, 0.0, 0.0]  # batches, wall seconds, audit seconds (unrecorded)

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
        # A fit starts afresh: its steps count from its own start (a second fit with the same
        # audit, or a resume), with a first window and no hint or request carried over.
        self._hint_window, self._hint_seen = False, None
        self._hint_quiet_until, self._hint_wait = 0, MISSING_HINT_WAIT_STEPS[0]
        self._clear_window = None
        self._missing_known = (0, frozenset())
        self._record_idle()
        self._idle_batches, self._idle_now = 0, False
        if self.watch_windows is not None:
            self.watch_windows.restart()

    def _manual_window_steps(self, windows: WatchWindows) -> None:
        """Under manual optimization, windows and gaps from the optimizer steps seen per batch.

        A window holds two steps of every optimizer that has stepped (the zero-grad check judges
        an optimizer's second step in it): two batches where every optimizer steps at every
        batch, twice the batches between two steps of the slowest otherwise (a generator
        stepping every 5th batch: 10), and at least the sanity check's window where it watches
        the spaced windows. Gaps are at most MAX_WINDOW_GAP_STEPS optimizer steps (a GAN's two
        optimizers take two per batch: 20 batches)."""
        steps = [n for n in self._optimizer_steps if n]
        batches = max(windows.batches, 1)
        if steps:
            slowest = 2 * max(1, round(batches / min(steps)))  # two steps of the slowest
            length = max(WATCH_WINDOW_STEPS, min(slowest, MAX_WINDOW_GAP_STEPS // 2))
        else:
            length = self._sanity_window_steps
        if not self._sanity_on_hints:
            length = max(length, self._sanity_window_steps)
        self._window_steps = length
        windows.length = length * windows.accumulate
        per_batch = sum(steps) / batches
        gap = MAX_WINDOW_GAP_STEPS * windows.accumulate
        if per_batch > 1:
            gap = int(gap / per_batch)
        windows.max_gap = max(gap, windows.length)

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
            windows.bound_gap()  # a gap chosen under a larger accumulate is too long now
        # The watching checks' time so far, where the windows read it (opening or closing).
        needs_spent = windows.needs_spent()
        spent = sum(c.total_seconds for c in self._watchers) if needs_spent else 0.0
        if needs_spent and not self._automatic and windows.batches:
            self._manual_window_steps(windows)  # before a gap is chosen
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
            if self._sanity_on_hints and windows is not None:
                # No more looks, so no more hints: the sanity check watches every window again.
                self._sanity_on_hints = False
                self._window_steps = self._sanity_window_steps
                windows.length = self._window_steps * windows.accumulate
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
            if finite._reads:
                # Its values are on their way (CUDA): the next batches poll for them, so none
                # of them is idle.
                self._idle_batches = 0

    def _plan_idle(self, trainer: pl.Trainer) -> None:
        """How many of the next batches may be idle: batches with nothing for the audit to do
        but count, time, and keep the loss for the sentinel. They are in a gap between windows,
        with every check asleep and no read on its way, and start before the step at which a
        check wakes or the audit's overhead scalars are logged (:attr:`_idle_until_step`: a
        batch starting at it or later is not idle; under manual optimization a batch may take
        several steps). Anything that happens meanwhile (a sentinel's finding, a check woken, a
        window asked for) rebuilds the routes, which ends the run."""
        self._idle_batches = 0
        windows, total, router = self.watch_windows, self._step_total, self._router
        if (
            windows is None
            or total is None
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
        step = int(total.completed)  # the next batch's step
        every = max(trainer.log_every_n_steps, 1)
        until = step + (-step % every)  # the next step whose scalars are logged
        if router.next_wake is not None:
            until = min(until, router.next_wake)
        self._idle_until_step = until
        ahead = min(windows._next_open - windows.batches, _MAX_IDLE_BATCHES)
        self._idle_batches = max(ahead, 0) if until > step else 0

    def _record_idle(self) -> None:
        """Tell the budget what the idle batches since the last call took."""
        batches, wall, spent = self._idle_pending
        self.idle_batch_count += batches
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
        if self._before:
            self._before = {}  # (an idle batch's start does not clear it)
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

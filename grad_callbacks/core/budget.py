"""An overhead budget: how far apart to space the checks so that they stay cheap.

Pure Python. The owner records the wall time of each training step with the checks' own time
taken out, and which part of the checks' time was fixed (spent at every step whatever the
schedules: calling the checks' hooks, cheap checks). What the fixed part leaves of the budget is
shared among the scheduled work: a check that just ran asks how many steps to wait before its
next run so that its cost stays within its share (:meth:`OverheadBudget.interval`), and the
checks that work at every step watch the batches :class:`WatchWindows` chooses.

Example:
    >>> budget = OverheadBudget(max_overhead=0.03)
    >>> for _ in range(10):
    ...     budget.record_step(train_seconds=0.010, check_seconds=0.0001)
    >>> # 3% of 10 ms is 0.3 ms per step; the fixed 0.1 ms leaves 0.2 ms, half of it 0.1 ms
    >>> budget.interval(run_seconds=0.060, share=0.5)  # 60 ms / 0.1 ms
    600
    >>> round(budget.overhead, 3)
    0.01
"""

from __future__ import annotations

import math


class OverheadBudget:
    """Spaces expensive checks so their time stays within ``max_overhead`` of training time.

    Args:
        max_overhead: the share of training wall time the checks may take (0.03 = 3%).
        smoothing: weight of the newest step in the running step-time estimates.
        max_interval: the longest wait between two runs of a check, in steps.
        min_spare: the least share of the budget left to scheduled work when the fixed cost
            takes all of it (so that their intervals stay finite; the overhead then exceeds
            ``max_overhead``, and :attr:`overhead` says so).
        steady_from: the first step of the steady state (:attr:`steady_overhead`); the checks'
            time in the first step is the one-time audit (:attr:`one_time_seconds`).
    """

    def __init__(
        self,
        max_overhead: float = 0.03,
        smoothing: float = 0.1,
        max_interval: int = 100_000,
        min_spare: float = 0.1,
        steady_from: int = 100,
    ) -> None:
        if not 0 < max_overhead < 1:
            raise ValueError(f"max_overhead must be in (0, 1), got {max_overhead!r}")
        self.max_overhead = max_overhead
        self.smoothing = smoothing
        self.max_interval = max_interval
        self.min_spare = min_spare
        self.step_seconds: float | None = None
        #: Running estimate of the fixed part of the checks' time per step.
        self.fixed_seconds = 0.0
        self.train_seconds = 0.0
        self.check_seconds = 0.0
        self.steps = 0
        self.steady_from = steady_from
        #: The checks' time in the first step (and the batches marked ``one_time``): the
        #: one-time audit of the first batch.
        self.one_time_seconds = 0.0
        #: The checks' and the training time from step ``steady_from`` on.
        self.steady_check_seconds = 0.0
        self.steady_train_seconds = 0.0

    def record_step(
        self,
        train_seconds: float,
        check_seconds: float,
        scheduled_seconds: float = 0.0,
        one_time: bool = False,
    ) -> None:
        """One training batch: its wall time without the checks, the checks' time in it, and
        the part of that spent on scheduled work (the rest is the fixed cost). ``one_time``
        marks a batch of the one-time audit (the first is one in any case)."""
        train_seconds = max(train_seconds, 0.0)
        check_seconds = max(check_seconds, 0.0)
        fixed = max(check_seconds - max(scheduled_seconds, 0.0), 0.0)
        self.train_seconds += train_seconds
        self.check_seconds += check_seconds
        if one_time or self.steps == 0:
            self.one_time_seconds += check_seconds
        if self.steps >= self.steady_from:
            self.steady_train_seconds += train_seconds
            self.steady_check_seconds += check_seconds
        self.steps += 1
        if self.step_seconds is None:
            self.step_seconds, self.fixed_seconds = train_seconds, fixed
        else:
            self.step_seconds += self.smoothing * (train_seconds - self.step_seconds)
            self.fixed_seconds += self.smoothing * (fixed - self.fixed_seconds)

    def record_steps(self, train_seconds: float, check_seconds: float, batches: int) -> None:
        """:meth:`record_step` for ``batches`` batches at once whose checks' time is all fixed
        (batches where every check slept): their total wall time without the checks, and the
        checks' total time in them."""
        if batches < 1:
            return
        if batches == 1 or self.step_seconds is None:
            for _ in range(batches):
                self.record_step(train_seconds / batches, check_seconds / batches)
            return
        train_seconds = max(train_seconds, 0.0)
        check_seconds = max(check_seconds, 0.0)
        self.train_seconds += train_seconds
        self.check_seconds += check_seconds
        steady = min(batches, self.steps + batches - self.steady_from)
        if steady > 0:  # the batches from steady_from on (alike, as far as is known)
            self.steady_train_seconds += train_seconds * steady / batches
            self.steady_check_seconds += check_seconds * steady / batches
        self.steps += batches
        weight = 1.0 - (1.0 - self.smoothing) ** batches  # that of as many single steps
        self.step_seconds += weight * (train_seconds / batches - self.step_seconds)
        self.fixed_seconds += weight * (check_seconds / batches - self.fixed_seconds)

    @property
    def overhead(self) -> float:
        """The checks' time so far as a share of the training time (0 before any step)."""
        return self.check_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def steady_overhead(self) -> float | None:
        """The checks' time from step ``steady_from`` on as a share of the training time then
        (None before that step)."""
        if self.steady_train_seconds <= 0:
            return None
        return self.steady_check_seconds / self.steady_train_seconds

    @property
    def one_time_steps(self) -> float:
        """The one-time audit's cost in training steps (of the running step-time estimate)."""
        return self.one_time_seconds / self.step_seconds if self.step_seconds else 0.0

    def interval(self, run_seconds: float, share: float) -> int:
        """Steps to wait after a run that took ``run_seconds``, for a check given ``share`` of
        what the fixed cost leaves of the budget.

        1 when no step time is known yet.
        """
        if not self.step_seconds or run_seconds <= 0:
            return 1
        budget = self.max_overhead * self.step_seconds
        spare = max(budget - self.fixed_seconds, self.min_spare * budget)
        allowed = share * spare
        return min(self.max_interval, max(1, math.ceil(run_seconds / allowed)))


class WatchWindows:
    """Which training batches the per-step checks watch: windows of consecutive batches.

    The first window opens at the first batch. When a window closes, the next one opens once
    :meth:`OverheadBudget.interval` batches (for the window's measured cost and the checks'
    share of the budget) have passed since the previous one opened, but never more than
    ``max_gap`` (which bounds how long a bug that starts in a gap goes unseen), at the first
    batch where a window may open (an accumulation boundary). When that interval is no longer
    than a window, windows follow each other and every batch is watched. :meth:`request` opens
    a window at the next batch where one may open (a sentinel saw something).

    Args:
        budget: the overhead budget; None watches every batch.
        share: the share of the budget given to the watching checks.
        length: batches per window.
        max_gap: the most batches from one window's opening to the next's (None: no bound).
        first_length: batches in the first window, when longer than ``length`` (a bug present
            from the start is seen over more steps at once).

    Example:
        >>> budget = OverheadBudget(max_overhead=0.03)
        >>> budget.record_step(train_seconds=0.010, check_seconds=0.0)
        >>> windows = WatchWindows(budget, share=0.5, length=2)
        >>> spent = 0.0
        >>> watched = []
        >>> for _ in range(12):
        ...     watched.append(windows.watch(spent))
        ...     spent += 0.0003 if watched[-1] else 0.0  # 0.3 ms per watched batch
        >>> [b for b, w in enumerate(watched) if w]  # 0.6 ms per window / 0.15 ms per batch
        [0, 1, 4, 5, 8, 9]
    """

    def __init__(
        self,
        budget: OverheadBudget | None,
        share: float,
        length: int,
        max_gap: int | None = None,
        first_length: int = 0,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.budget = budget
        self.share = share
        self.length = length
        self.max_gap = max_gap
        self.first_length = first_length
        #: Windows asked for by :meth:`request`.
        self.requested = 0
        #: Whether the window open now (or the last one) opened on a :meth:`request`.
        self.on_request = False
        self._wanted_length = 0
        self._open_length = 0  # batches in the window open now
        #: Whether the last gap was cut to ``max_gap`` (the budget alone would have waited
        #: longer): the windows then cost more than their share, and their cost is fixed.
        self.capped = False
        self._wanted = False
        self._opened_at: int | None = None
        self._spent_at_open = 0.0
        self._next_open = 0
        #: Batches seen (the next batch's number, from 0 over the whole run) and watched so far.
        self.batches = 0
        self.watched = 0
        #: The owner's gradient accumulation when it last set the lengths (0: not yet).
        self.accumulate = 0

    def needs_spent(self) -> bool:
        """Whether the next :meth:`watch` reads its ``spent`` (a window opens or closes there);
        elsewhere any value does, and the owner need not add up its checks' time."""
        batch = self.batches
        if self._opened_at is not None:
            return batch >= self._opened_at + self._open_length
        return self._wanted or batch >= self._next_open

    def tick(self) -> bool | None:
        """Count the next batch when nothing changes at it (the open window, or the gap, goes
        on, and no window is wanted): whether it is watched. None, counting nothing, where
        :meth:`watch` must decide (a window opens or closes, or one was requested)."""
        batch = self.batches
        if self._wanted:
            return None
        if self._opened_at is not None:
            if batch >= self._opened_at + self._open_length:
                return None
            self.batches = batch + 1
            self.watched += 1
            return True
        if batch >= self._next_open:
            return None
        self.batches = batch + 1
        return False

    def watch(self, spent: float, may_open: bool = True) -> bool:
        """Whether to watch the next batch; call once per batch, in order.

        Args:
            spent: the watching checks' time so far, in seconds (it only grows).
            may_open: whether a window may open at this batch.
        """
        batch = self.batches
        self.batches += 1
        if self._opened_at is not None:
            length = self._open_length
            if batch < self._opened_at + length:
                self.watched += 1
                return True
            gap = max(self.gap(spent - self._spent_at_open), length)
            self.capped = self.max_gap is not None and gap > max(self.max_gap, length)
            if self.max_gap is not None:
                gap = min(gap, max(self.max_gap, length))
            self._next_open = batch if self._wanted else self._opened_at + gap
            self._opened_at = None
        if (batch >= self._next_open or self._wanted) and may_open:
            self._opened_at, self._spent_at_open = batch, spent
            self.on_request = self._wanted
            length = self.length
            if batch == 0:
                length = max(length, self.first_length)
            if self._wanted:
                length = max(length, self._wanted_length)
            self._open_length = length
            self._wanted, self._wanted_length = False, 0
            self.watched += 1
            return True
        return False

    def request(self, length: int = 0) -> None:
        """Open a window at the next batch where one may open (or, if one is open, another
        right after it), of at least ``length`` batches."""
        self._wanted_length = max(self._wanted_length, length)
        if not self._wanted:
            self._wanted = True
            self.requested += 1

    def gap(self, window_seconds: float) -> int:
        """Batches from the opening of a window that cost ``window_seconds`` to the next."""
        if self.budget is None:
            return 1
        return self.budget.interval(window_seconds, self.share)

    def restart(self) -> None:
        """A new fit: the windows start again from its first batch (a first window, no gap or
        request carried over; the counts are the fit's)."""
        self.batches = self.watched = 0
        self._opened_at, self._next_open = None, 0
        self._wanted, self._wanted_length = False, 0
        self.capped = self.on_request = False

    def bound_gap(self) -> None:
        """In a gap, open the next window at most ``max_gap`` batches from now (after
        ``max_gap`` was lowered: fewer batches per optimizer step)."""
        if self._opened_at is None and self.max_gap is not None:
            self._next_open = min(self._next_open, self.batches + self.max_gap)

    @property
    def in_first_window(self) -> bool:
        """Whether the window open now is the first one (from the first batch)."""
        return self._opened_at == 0

    @property
    def watched_share(self) -> float:
        """The share of batches watched so far (1 before any)."""
        return self.watched / self.batches if self.batches else 1.0

"""An overhead budget: how far apart to space an expensive check so that it stays cheap.

Pure Python. The owner records the wall time of each training step with the checks' own time
taken out; a check that just ran asks how many steps to wait before its next run so that its
cost stays within its share of the budget.

Example:
    >>> budget = OverheadBudget(max_overhead=0.03)
    >>> for _ in range(10):
    ...     budget.record_step(train_seconds=0.010, check_seconds=0.0001)
    >>> budget.interval(run_seconds=0.060, share=0.5)  # 60 ms / (1.5% of 10 ms)
    400
    >>> round(budget.overhead, 3)
    0.01
"""

from __future__ import annotations

import math


class OverheadBudget:
    """Spaces expensive checks so their time stays within ``max_overhead`` of training time.

    Args:
        max_overhead: the share of training wall time the checks may take (0.03 = 3%).
        smoothing: weight of the newest step in the running step-time estimate.
        max_interval: the longest wait between two runs of a check, in steps.
    """

    def __init__(
        self, max_overhead: float = 0.03, smoothing: float = 0.1, max_interval: int = 100_000
    ) -> None:
        if not 0 < max_overhead < 1:
            raise ValueError(f"max_overhead must be in (0, 1), got {max_overhead!r}")
        self.max_overhead = max_overhead
        self.smoothing = smoothing
        self.max_interval = max_interval
        self.step_seconds: float | None = None
        self.train_seconds = 0.0
        self.check_seconds = 0.0
        self.steps = 0

    def record_step(self, train_seconds: float, check_seconds: float) -> None:
        """One training batch: its wall time without the checks, and the checks' time in it."""
        train_seconds = max(train_seconds, 0.0)
        self.train_seconds += train_seconds
        self.check_seconds += max(check_seconds, 0.0)
        self.steps += 1
        if self.step_seconds is None:
            self.step_seconds = train_seconds
        else:
            self.step_seconds += self.smoothing * (train_seconds - self.step_seconds)

    @property
    def overhead(self) -> float:
        """The checks' time so far as a share of the training time (0 before any step)."""
        return self.check_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    def interval(self, run_seconds: float, share: float) -> int:
        """Steps to wait after a run that took ``run_seconds``, for a check given ``share``.

        1 when no step time is known yet.
        """
        if not self.step_seconds or run_seconds <= 0:
            return 1
        allowed = share * self.max_overhead * self.step_seconds
        return min(self.max_interval, max(1, math.ceil(run_seconds / allowed)))

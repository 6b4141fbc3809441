"""What ``GradientAudit()`` does at a batch where nothing is scheduled: next to nothing; and
what its measure of its own time leaves out (the garbage collector's pauses).

At most batches of a long run no check has work: the per-step checks are between two watch
windows, the periodic checks are not due, the sentinel does not look. Counted here, not timed
(machine speed does not matter): the Python calls into this package's code at such a batch
(Lightning's own dispatch of a callback's hooks is not counted: any callback costs that), and
that none of them reads a tensor on the host (``.item()``, ``.tolist()``, ``.cpu()``, ...), which
on CUDA would wait for the device.
"""

from __future__ import annotations

import collections
import gc
import statistics
import sys
import time
from types import FrameType
from typing import Any

import lightning as L

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.base import AuditCallback
from grad_callbacks.callbacks.monitor import GradientMonitor
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.core import clock
from tests import zoo
from tests.callbacks.test_latency import BATCHES, slow_machine_audit

#: Python calls into grad_callbacks at a batch where nothing is scheduled (12 when written:
#: the audit's three working hooks with their wrappers, the sentinel's loss and step counter,
#: and three no-op hooks). It was 22 before idle batches skipped the budget's bookkeeping and
#: the windows' counting, and about 250 when every check's hooks were called at every batch.
IDLE_CALLS = 16
#: Host reads of a tensor: on CUDA each waits for the device.
HOST_READS = {"item", "tolist", "cpu", "numpy", "synchronize", "__float__", "__int__"}


class Counter(L.Callback):
    """Per batch: the Python calls into grad_callbacks, the host reads they make, and whether
    any of the audit's scheduled work ran in it."""

    def __init__(self, audit: GradientAudit) -> None:
        self.audit = audit
        self.calls: collections.Counter[int] = collections.Counter()
        self.reads: dict[int, list[str]] = collections.defaultdict(list)
        self.busy: set[int] = set()
        self._batch: int | None = None
        self._before: tuple[Any, ...] = ()

    def _work(self) -> tuple[Any, ...]:
        audit = self.audit
        sentinel = audit.finite_sentinel
        return (
            sentinel.looks if sentinel is not None else None,
            audit.finite_sentinel is None,
            [c.steps_checked for c in audit.checks if isinstance(c, GradientMonitor)],
            [c.steps_checked for c in audit.checks if isinstance(c, PerSampleGradientCheck)],
            audit.watch_windows.watched if audit.watch_windows is not None else None,
        )

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        batch = self._batch
        if batch is None or "grad_callbacks" not in frame.f_code.co_filename:
            return
        if event == "call":
            self.calls[batch] += 1
        elif event == "c_call" and getattr(arg, "__name__", "") in HOST_READS:
            self.reads[batch].append(f"{arg.__qualname__} in {frame.f_code.co_name}")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is not None and self._work() != self._before:
            self.busy.add(self._batch)
        self._batch, self._before = batch_idx, self._work()
        if batch_idx == 0:
            sys.setprofile(self._profile)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sys.setprofile(None)
        if self._batch is not None and self._work() != self._before:
            self.busy.add(self._batch)
        self._batch = None


def test_a_batch_where_nothing_is_scheduled_costs_a_few_calls_and_no_host_read() -> None:
    # Windows as far apart as the audit allows (as on a machine where the checks are slow).
    audit = slow_machine_audit()
    counter = Counter(audit)
    # The counter's hooks run first: a batch's work is what happened between two of them.
    zoo.fit(
        zoo.MLP(),
        [counter, audit],
        data=zoo.regression_data(n=4 * BATCHES),
        limit_train_batches=BATCHES,
        log_every_n_steps=10_000,
    )
    # The batch after a sentinel's look or a window reads what they left (or closes it).
    # (The last batch's count has the end of training in it.)
    idle = [
        b for b in range(10, BATCHES - 1) if b not in counter.busy and b - 1 not in counter.busy
    ]
    assert len(idle) > BATCHES // 3, sorted(counter.busy)
    calls = [counter.calls[b] for b in idle]
    assert statistics.median(calls) <= IDLE_CALLS, calls
    assert max(calls) <= 2 * IDLE_CALLS, calls
    assert {b: counter.reads[b] for b in idle if counter.reads[b]} == {}
    # Every batch is in the budget (idle ones in bulk), and most of them were idle.
    assert audit.budget is not None and audit.budget.steps == BATCHES
    assert audit.budget.train_seconds > 0
    overhead = audit.report_extras()["overhead"]
    assert overhead["idle_share"] == audit.idle_batch_count / BATCHES > 0.5
    # The audit still looks: windows, sentinel looks and the monitor ran in the other batches.
    assert audit.watch_windows is not None and audit.watch_windows.watched > 0
    assert audit.finite_sentinel is not None and audit.finite_sentinel.looks > 0


class _Collecting(AuditCallback):
    """A check whose hook, at one batch, runs a full garbage collection of a large heap."""

    check_name = "Collecting"

    def __init__(self) -> None:
        super().__init__(on_finding="log")
        self.gc_seconds = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step == 3:
            heap = [[i] for i in range(300_000)]  # tracked objects the collector walks
            with self.timed():
                start = time.perf_counter()
                gc.collect()
                self.gc_seconds = time.perf_counter() - start
            del heap
        super().on_train_batch_end(trainer, pl_module, *args)


def test_a_garbage_collection_inside_a_hook_is_not_the_audits_time() -> None:
    # A collection stops the process for as long as the heap takes to walk, wherever an
    # allocation triggers it: hundreds of milliseconds beside a transformers model, which the
    # budget would otherwise charge to whichever check it landed in.
    check = _Collecting()
    audit = GradientAudit(checks=[check], on_finding="log")
    zoo.fit(zoo.MLP(), [audit], limit_train_batches=6)
    assert check.gc_seconds > 0.005  # a real collection ran in the check's timed block
    assert check.seconds_spent < check.gc_seconds / 2, (check.seconds_spent, check.gc_seconds)
    assert audit.budget is not None and audit.budget.check_seconds < check.gc_seconds / 2
    assert clock._on_gc not in gc.callbacks  # removed at the end of training

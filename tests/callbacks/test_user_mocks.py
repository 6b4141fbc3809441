"""What a test of the user's own can count stays the same with the audit attached.

Lightning's own tests mock ``time.perf_counter`` with a finite ``side_effect`` list to time a
callback (``ThroughputMonitor``): every call the audit made of it used up one of the values, and
the run ended in ``StopIteration``. The oracle is the same fit without the audit.
"""

from __future__ import annotations

import gc
import time
from typing import Any
from unittest import mock

import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from grad_callbacks import GradientAudit
from tests import zoo


class _Collecting(zoo.MLP):
    """Runs the garbage collector once during training, as allocations would."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            gc.collect()
        return super().training_step(batch, batch_idx)


def _clock_calls(with_audit: bool, max_overhead: float | None = None) -> int:
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log", max_overhead=max_overhead)
    callbacks = [audit] if with_audit else []
    with mock.patch("time.perf_counter", side_effect=time.perf_counter) as clock:
        zoo.fit(_Collecting(), callbacks)
    return clock.call_count


def test_a_mocked_perf_counter_sees_no_call_of_the_audit() -> None:
    assert _clock_calls(with_audit=True) == _clock_calls(with_audit=False)


def test_nor_of_the_budgets_garbage_collector_clock() -> None:
    """With the budget on, a gc.callbacks entry times the collector's pauses (they are left
    out of the audit's time): it too uses the perf_counter bound at import."""
    assert _clock_calls(True, max_overhead=0.03) == _clock_calls(with_audit=False)


class _Printing(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.print("training_step", batch_idx, end="")
        return super().training_step(batch, batch_idx)


def _writes(with_audit: bool) -> tuple[list[Any], int]:
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log", max_overhead=None)
    with mock.patch("tqdm.tqdm.write") as write:
        zoo.fit(
            _Printing(), [TQDMProgressBar(), *([audit] if with_audit else [])],
            enable_progress_bar=True, limit_train_batches=3,
        )
    recomputed = sum(getattr(c, "recomputations", 0) for c in audit.checks)
    return write.call_args_list, recomputed


def test_self_print_in_a_recomputed_training_step_reaches_no_progress_bar() -> None:
    """``LightningModule.print`` goes to the progress bar's ``tqdm.write`` (Lightning's
    ``test_tqdm_progress_bar_print`` mocks it): a recomputation called it again."""
    audited, recomputed = _writes(with_audit=True)
    plain, _ = _writes(with_audit=False)
    assert recomputed > 0
    assert audited == plain == [mock.call(f"training_step {i}", end="") for i in range(3)]

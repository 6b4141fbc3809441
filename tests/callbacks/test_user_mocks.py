"""What a test of the user's own can count stays the same with the audit attached.

Lightning's own tests mock ``time.perf_counter`` with a finite ``side_effect`` list to time a
callback (``ThroughputMonitor``): every call the audit made of it used up one of the values, and
the run ended in ``StopIteration``. The oracle is the same fit without the audit.
"""

from __future__ import annotations

import time
from unittest import mock

import torch

from grad_callbacks import GradientAudit
from tests import zoo


def _clock_calls(with_audit: bool) -> int:
    torch.manual_seed(0)
    callbacks = [GradientAudit(on_finding="log", max_overhead=None)] if with_audit else []
    with mock.patch("time.perf_counter", side_effect=time.perf_counter) as clock:
        zoo.fit(zoo.MLP(), callbacks)
    return clock.call_count


def test_a_mocked_perf_counter_sees_no_call_of_the_audit() -> None:
    assert _clock_calls(with_audit=True) == _clock_calls(with_audit=False)

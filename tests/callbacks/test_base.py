"""The base class's own duties: the state key, and the hook wrapper every check goes through."""

from __future__ import annotations

import pytest

from grad_callbacks import GradientAudit, ZeroGradCheck
from grad_callbacks.callbacks.base import AuditCallback
from tests import zoo


def test_state_key_is_computed_once_per_fit_not_at_every_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lightning reads ``state_key`` at every hook call (to name it in its profiler); deriving
    # it from the settings each time cost a GradientAudit about 0.1 ms per hook on CPU.
    calls: list[str] = []
    original = AuditCallback._compute_state_key

    def counting(self: AuditCallback) -> str:
        calls.append(self.check_name)
        return original(self)

    monkeypatch.setattr(AuditCallback, "_compute_state_key", counting)
    counts = []
    for batches in (2, 12):
        audit = GradientAudit(on_finding="log")
        calls.clear()
        zoo.fit(zoo.MLP(), [audit], limit_train_batches=batches)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts  # not one more per step


def test_state_key_follows_settings_changed_between_fits() -> None:
    check = ZeroGradCheck()
    zoo.fit(zoo.MLP(), [check])
    check.every_n_steps = 7
    assert check.state_key == ZeroGradCheck(every_n_steps=7).state_key


def test_every_hook_a_check_defines_goes_through_the_wrapper() -> None:
    for cls in (ZeroGradCheck, GradientAudit):
        for name in ("on_before_optimizer_step", "on_train_batch_end", "setup"):
            assert getattr(getattr(cls, name), "__audit_hook__", False), (cls, name)

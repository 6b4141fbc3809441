"""RankSyncCheck on a single process: part of GradientAudit(), silent and free (no hooks on the
optimizers). The comparison across ranks runs in tests/distributed/test_ddp_rank_sync.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from grad_callbacks import GradientAudit, RankSyncCheck
from tests import zoo


class HookCounter(L.Callback):
    """Counts RankSyncCheck's step hooks on the optimizers at every batch end."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        hooks = [
            h
            for opt in trainer.optimizers
            for h in (
                *opt._optimizer_step_post_hooks.values(),
                *opt._optimizer_step_pre_hooks.values(),
            )
        ]
        self.counts.append(sum("RankSyncCheck" in h.__qualname__ for h in hooks))


def test_in_gradient_audit_and_dormant_on_a_single_process(tmp_path: Path) -> None:
    audit = GradientAudit(on_finding="log", report_dir=str(tmp_path))
    (check,) = [c for c in audit.checks if isinstance(c, RankSyncCheck)]
    counter = HookCounter()
    zoo.fit(zoo.MLP(), [audit, counter])
    assert counter.counts and set(counter.counts) == {0}
    assert check.findings == [] and check.steps_checked == 0
    (report,) = tmp_path.rglob("grad_audit.json")
    (entry,) = [c for c in json.loads(report.read_text())["checks"] if c["name"] == "RankSyncCheck"]
    assert entry["checked_steps"] == [] and entry["schedule"]["active"] is False


def test_standalone_on_a_single_process_changes_nothing() -> None:
    model, reference = zoo.MLP(), zoo.MLP()
    reference.load_state_dict(model.state_dict())
    check = RankSyncCheck(every_n_steps=1, first_steps=0)
    zoo.fit(model, [check])
    zoo.fit(reference, [])
    assert check.findings == [] and check.steps_checked == 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.equal(q), name


def test_settings() -> None:
    assert RankSyncCheck().settings() == {
        "every_n_steps": 16,
        "on_finding": "warn",
        "first_steps": 2,
    }
    with pytest.raises(ValueError, match="first_steps"):
        RankSyncCheck(first_steps=-1)
    with pytest.raises(ValueError, match="every_n_steps"):
        RankSyncCheck(every_n_steps=0)

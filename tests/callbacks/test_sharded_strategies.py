"""Strategies that shard gradients (FSDP, DeepSpeed): checks that need whole gradients report
``check-skipped`` once, with the reason, and do no work; training goes on untouched.

FSDP needs a GPU in Lightning and DeepSpeed is not installed here, so the end-to-end runs use a
single-device strategy registered as sharded (``SHARDED_STRATEGIES`` is the extension point the
detection reads); the detection itself is tested on the real strategy classes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
)

from grad_callbacks import GradientAudit, ZeroGradCheck
from grad_callbacks.callbacks import distributed
from grad_callbacks.callbacks.distributed import sharded_strategy
from tests import zoo


class ShardedForTest(SingleDeviceStrategy):
    """A single-device strategy that the audit is told shards gradients."""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(distributed.SHARDED_STRATEGIES, ShardedForTest, "FSDP")


class _Holder:
    def __init__(self, strategy: object) -> None:
        self.strategy = strategy


def test_real_sharding_strategies_are_recognised() -> None:
    assert sharded_strategy(_Holder(FSDPStrategy())) == "FSDP"  # type: ignore[arg-type]
    # DeepSpeedStrategy() needs deepspeed installed; the detection only looks at the class.
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert sharded_strategy(_Holder(deepspeed)) == "DeepSpeed"  # type: ignore[arg-type]
    assert sharded_strategy(_Holder(DDPStrategy())) is None  # type: ignore[arg-type]
    assert sharded_strategy(_Holder(ShardedForTest())) is None  # type: ignore[arg-type]


def test_audit_under_a_sharded_strategy_skips_with_the_reason_and_leaves_training_alone(
    registered: None, tmp_path: Path
) -> None:
    # A run with a bug the checks would catch (no zero_grad), so silence means they did not run.
    model = zoo.NoZeroGradAutomatic()
    reference = copy.deepcopy(model)
    audit = GradientAudit(every_n_steps=1, report_dir=str(tmp_path))
    trainer = zoo.fit(model, [audit], strategy=ShardedForTest(device=torch.device("cpu")))
    zoo.fit(reference, [], strategy=ShardedForTest(device=torch.device("cpu")))
    assert trainer.global_step > 0
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(reference.named_parameters())[name]), name

    by_check = {f.check: f for f in audit.findings}
    assert {f.code for f in audit.findings} == {"check-skipped"}
    skipped = {c.check_name for c in audit.checks if c.needs_whole_gradients}
    assert set(by_check) == skipped
    assert {"ZeroGradCheck", "PerSampleGradientCheck", "GradientSanityCheck"} <= skipped
    for f in by_check.values():
        assert "FSDP strategy shards" in f.message and f.step == 0
    assert all(c.steps_checked == 0 for c in audit.checks if c.needs_whole_gradients)

    (report,) = tmp_path.rglob("grad_audit.json")
    data = json.loads(report.read_text())
    assert data["status"] == "finished"
    assert {f["code"] for f in data["findings"]} == {"check-skipped"}


def test_standalone_check_under_a_sharded_strategy_installs_nothing(registered: None) -> None:
    model = zoo.NoZeroGradAutomatic()
    check = ZeroGradCheck()
    zoo.fit(model, [check], strategy=ShardedForTest(device=torch.device("cpu")))
    (finding,) = check.findings
    assert finding.code == "check-skipped"
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_the_same_run_without_sharding_still_fires(tmp_path: Path) -> None:
    # The oracle for the two tests above: the bug is there and the audit sees it.
    audit = GradientAudit(every_n_steps=1, on_finding="log")
    zoo.fit(zoo.NoZeroGradAutomatic(), [audit], strategy=SingleDeviceStrategy(device="cpu"))
    assert "missing-zero-grad" in {f.code for f in audit.findings}

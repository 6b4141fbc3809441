"""RankSyncCheck under real 2-process DDP on CPU (gloo): planted desyncs found on rank 0 with
the parameters named, each confirmed by an independent oracle (an all_gather of the final
parameters, oracle.json); clean twins quiet. See ddp_rank_sync_run.py for the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_rank_sync_run.py")
EDIT_FROM = 4  # as in the script
UNFREEZE_STEP = 8  # BackboneFinetuning unfreezes at epoch 1: 8 steps per epoch


def _run(tmp_path: Path, mode: str) -> tuple[dict[str, Any], list[dict], dict[str, float]]:
    report = run_ddp_script(SCRIPT, tmp_path, mode)
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    desyncs = [f for f in report["findings"] if f["code"] == "rank-desync"]
    return report, desyncs, oracle


def _entry(report: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [c for c in report["checks"] if c["name"] == "RankSyncCheck"]
    return entry


@pytest.mark.slow
def test_planted_desyncs_found_under_the_default_audit(tmp_path: Path) -> None:
    report, desyncs, oracle = _run(tmp_path, "broken")
    assert report["world_size"] == 2 and report["status"] == "finished"
    by_cause = {f["data"]["cause"]: f for f in desyncs}
    assert set(by_cause) == {
        "created-after-wrapping",
        "unfrozen-after-wrapping",
        "edited-after-reduction",
    }
    late = by_cause["created-after-wrapping"]
    assert late["params"] == ["late"] and late["step"] == 0
    backbone = by_cause["unfrozen-after-wrapping"]
    assert backbone["params"] == ["backbone.0.weight", "backbone.0.bias"]
    assert "BackboneFinetuning" in backbone["message"] and "lr=0" in backbone["message"]
    edited = by_cause["edited-after-reduction"]
    assert edited["params"] == ["edited.weight"]
    # Found within 50 optimizer steps of the onset, under GradientAudit()'s defaults.
    assert UNFREEZE_STEP <= backbone["step"] <= UNFREEZE_STEP + 50
    assert EDIT_FROM <= edited["step"] <= EDIT_FROM + 50
    for f in desyncs:
        assert f["severity"] == "error"
        assert f["data"]["desynced_ranks"] == [1]
        assert f["data"]["grad_params"] == f["params"]  # the gradients differ, not only params
        assert "rank(s) 1" in f["message"]
    # The oracle: exactly the parameters named drifted apart; the rest are bitwise equal.
    named = {p for f in desyncs for p in f["params"]}
    assert named == {n for n, diff in oracle.items() if diff > 0}
    assert oracle["head.weight"] == 0.0 and oracle["edited.bias"] == 0.0
    entry = _entry(report)
    assert entry["checked_steps"] == [0, 1, 16]
    assert entry["steps_checked"] == 3
    # TensorBoard (rank 0): how many parameters differ, and how far apart, at each checked step.
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    scalars = {
        tag: {e.step: e.value for e in events.Scalars(f"grad_audit/rank_sync/{tag}")}
        for tag in ("differing_params", "max_norm_gap")
    }
    assert scalars["differing_params"] == {0: 1, 1: 1, 16: 4}  # late; then + edited, backbone
    gaps = scalars["max_norm_gap"]
    assert set(gaps) == {0, 1, 16} and all(v > 0 for v in gaps.values())


@pytest.mark.slow
def test_clean_ddp_twins_are_quiet(tmp_path: Path) -> None:
    # accumulate_grad_batches=4, BatchNorm with broadcast_buffers=False, an unused branch with
    # find_unused_parameters=True, a backbone frozen by a zero learning rate (the documented fix
    # for BackboneFinetuning under DDP).
    report, desyncs, oracle = _run(tmp_path, "clean")
    assert desyncs == []
    assert [f for f in report["findings"] if f["check"] == "RankSyncCheck"] == []
    # The oracle: parameters equal, BatchNorm's running statistics not (they may differ).
    assert all(diff == 0.0 for name, diff in oracle.items() if "running" not in name)
    assert oracle["backbone.1.running_mean"] > 0
    entry = _entry(report)
    assert entry["checked_steps"] == [0, 1, 16]  # 24 steps of 4 micro-batches


@pytest.mark.slow
def test_no_sync_left_on_for_the_stepping_micro_batch(tmp_path: Path) -> None:
    _report, desyncs, oracle = _run(tmp_path, "manual-broken")
    (finding,) = desyncs
    assert finding["data"]["cause"] == "no-sync"
    assert finding["step"] == 0
    params = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert finding["params"] == params and finding["data"]["grad_params"] == params
    assert "no_sync()" in finding["message"]
    assert all(oracle[p] > 0 for p in params)


@pytest.mark.slow
def test_under_raise_every_rank_stops_at_the_same_step(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "manual-raise")
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        assert outcome["raised"] == "GradientAuditError"
        assert outcome["message"].startswith("[rank-desync] ")
        assert outcome["global_step"] == 1  # stopped at the end of the first checked step
    assert report["status"] == "failed" and "rank-desync" in report["error"]


@pytest.mark.slow
def test_no_sync_used_correctly_is_quiet(tmp_path: Path) -> None:
    report, _desyncs, oracle = _run(tmp_path, "manual-clean")
    assert report["findings"] == []
    assert all(diff == 0.0 for diff in oracle.values())
    assert _entry(report)["checked_steps"] == [0, 1]


@pytest.mark.slow
def test_plain_ddp_checked_at_every_step_is_quiet(tmp_path: Path) -> None:
    report, _desyncs, oracle = _run(tmp_path, "plain")
    assert report["findings"] == []
    assert all(diff == 0.0 for diff in oracle.values())
    assert _entry(report)["checked_steps"] == list(range(10))

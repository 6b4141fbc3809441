"""AutogradCheck under real 2-process DDP on CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_autograd_run.py")


@pytest.mark.slow
def test_ddp_wrong_backward_found_on_every_rank_is_reported_once(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "bad")
    (finding,) = report["findings"]
    assert finding["code"] == "autograd-mismatch"
    assert finding["params"] == ["BadSquare"]
    assert finding["data"]["ranks"] == [0, 1]


@pytest.mark.slow
def test_ddp_correct_function_is_silent(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "good")
    assert report["findings"] == []
    assert report["checks"][0]["name"] == "AutogradCheck"

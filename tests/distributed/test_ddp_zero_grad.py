"""ZeroGradCheck under real 2-process DDP on CPU (gloo): findings from rank 1 reach rank 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_zero_grad_run.py")


@pytest.mark.slow
def test_ddp_rank_that_forgets_zero_grad_is_reported_on_rank_0(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "broken")
    assert report["world_size"] == 2 and report["status"] == "finished"
    (finding,) = [f for f in report["findings"] if f["severity"] != "info"]
    assert finding["code"] == "missing-zero-grad"
    assert finding["data"]["ranks"] == [1]
    assert finding["step"] == 1


@pytest.mark.slow
def test_ddp_clean_run_is_silent(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "clean")
    assert report["world_size"] == 2
    assert [f for f in report["findings"] if f["severity"] != "info"] == []
    assert report["checks"][0]["steps_checked"] == 4

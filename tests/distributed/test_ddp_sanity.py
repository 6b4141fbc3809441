"""GradientSanityCheck under real 2-process DDP on CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_sanity_run.py")


@pytest.mark.slow
def test_ddp_unused_parameters_and_a_nan_on_rank_1(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "broken")
    assert report["world_size"] == 2 and report["status"] == "finished"
    by_code = {f["code"]: f for f in report["findings"]}
    assert set(by_code) == {"missing-grad", "nonfinite-grad"}

    missing = by_code["missing-grad"]
    # unused on every process; rank1_head, used on rank 1 only, gets the averaged gradient
    assert missing["params"] == ["aux_head.weight", "aux_head.bias"]
    assert missing["step"] == 1  # patience 2
    assert missing["data"]["ranks"] == [0, 1]

    nonfinite = by_code["nonfinite-grad"]
    # DDP averaging spreads the NaN to rank 0's gradients; only rank 1's local ones had it
    assert nonfinite["data"]["ranks"] == [1]
    assert nonfinite["step"] == 2
    assert nonfinite["data"]["local"] is True
    assert "net.0.weight" in nonfinite["params"]


@pytest.mark.slow
def test_ddp_clean_run_is_silent(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "clean")
    assert report["world_size"] == 2
    assert report["findings"] == []
    assert report["checks"][0]["steps_checked"] == 3

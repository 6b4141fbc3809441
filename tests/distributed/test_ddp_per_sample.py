"""PerSampleGradientCheck under 2-process DDP: recomputed gradients averaged like DDP's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_per_sample_run.py")


@pytest.mark.slow
def test_ddp_clean_run_has_no_grad_mismatch(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "clean")
    (check,) = report["checks"]
    assert check["steps_checked"] == 2  # 64 samples / 2 ranks / 8 per batch / 2 accumulated
    assert [f for f in report["findings"] if f["severity"] != "info"] == []


@pytest.mark.slow
def test_ddp_hook_on_rank_1_is_grad_mismatch(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "doubling-on-rank-1")
    codes = {f["code"] for f in report["findings"] if f["severity"] != "info"}
    assert codes == {"grad-mismatch"}
    (finding,) = [f for f in report["findings"] if f["code"] == "grad-mismatch"]
    # live (g0 + 2 g1) / 2 against the loss's (g0 + g1) / 2: error |g1| / |g0 + g1|, far above
    # the float32 tolerance, while the clean twin above stays below it
    assert finding["data"]["relative_error"] > 100 * finding["data"]["tolerance"]
    assert finding["data"]["ranks"] == [0, 1]  # both ranks compare the same averaged gradient

"""``on_finding="raise"`` under real 2-process DDP (gloo): an error found on one rank stops
every rank together, at the same step, and rank 0's report names the finding and its rank.

Before, rank 1 raised alone: rank 0 died in the next collective with an unrelated gloo error
(with NCCL it would have waited for the collective's timeout) and its report lacked the finding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_raise_run.py")


def outcomes(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["audit", "zero_grad"])
def test_missing_zero_grad_on_rank_1_stops_both_ranks(tmp_path: Path, mode: str) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, mode)
    rank0, rank1 = outcomes(tmp_path)
    assert rank0["raised"] == rank1["raised"] == "GradientAuditError"
    assert "[missing-zero-grad] (found on rank 1)" in rank0["message"] and rank0["rank"] == 1
    assert rank1["message"].startswith("[missing-zero-grad] ") and rank1["rank"] is None
    assert rank0["global_step"] == rank1["global_step"]
    assert report["status"] == "failed" and "missing-zero-grad" in report["error"]
    (finding,) = [f for f in report["findings"] if f["code"] == "missing-zero-grad"]
    assert finding["data"]["ranks"] == [1]


@pytest.mark.slow
def test_nan_gradient_on_rank_1_stops_both_ranks_before_the_optimizer_applies_it(
    tmp_path: Path,
) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "sanity")
    rank0, rank1 = outcomes(tmp_path)
    assert rank0["raised"] == rank1["raised"] == "GradientAuditError"
    assert "[nonfinite-grad] (found on rank 1)" in rank0["message"]
    # Raised at on_before_optimizer_step of the bad batch (its index 1): one step was taken,
    # and DDP's averaged NaN gradient never reached the parameters on either rank.
    assert rank0["global_step"] == rank1["global_step"] == 1
    assert rank0["finite_params"] and rank1["finite_params"]
    (finding,) = [f for f in report["findings"] if f["code"] == "nonfinite-grad"]
    assert finding["data"]["ranks"] == [1]

"""``GradientAudit``'s watch windows under real 2-process DDP (gloo): silent on a clean run, also
when the ranks watch different batches (timed windows differ between ranks), and a NaN that
starts between windows on rank 1 is found at the next window and attributed to rank 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_windows_run.py")


def outcomes(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def alarms(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] in ("warning", "error")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clean", "skewed"])
def test_clean_ddp_run_with_windows_is_silent(tmp_path: Path, mode: str) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, mode)
    rank0, rank1 = outcomes(tmp_path)
    assert rank0["global_step"] == rank1["global_step"] == 40
    assert rank0["watched"] == 16  # batches 0-7 and 31-38
    assert rank1["watched"] == (16 if mode == "clean" else 40)  # windows every 7: all of them
    assert report["status"] == "finished"
    assert alarms(report) == []


@pytest.mark.slow
def test_nan_from_a_gap_on_rank_1_is_found_at_the_next_window(tmp_path: Path) -> None:
    report = run_ddp_script(SCRIPT, tmp_path, "nan")
    (finding,) = [f for f in report["findings"] if f["code"] == "nonfinite-grad"]
    assert finding["step"] == 31
    assert 1 in finding["data"]["ranks"]
    assert finding["data"]["sampled"] is True

"""ZeroGradCheck under real 2-process DDP on CPU (gloo): findings from rank 1 reach rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_zero_grad_run.py")
ROOT = SCRIPT.parents[2]


def run_ddp_script(script: Path, out: Path, mode: str) -> dict:
    """Run a 2-process DDP script; return the one report rank 0 wrote under ``out``."""
    proc = subprocess.run(
        [sys.executable, str(script), str(out), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = list(out.rglob("grad_audit.json"))
    assert len(reports) == 1, f"one report, written once by rank 0: {reports}"
    return json.loads(reports[0].read_text())


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

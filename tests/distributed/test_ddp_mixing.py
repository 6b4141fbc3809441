"""BatchMixingCheck under real 2-process DDP on CPU (gloo): mixing seen on every rank is
reported once, on rank 0; a clean model with train-mode BatchNorm stays silent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ddp import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_mixing_run.py")


def _run(out: Path, mode: str) -> tuple[dict, dict[int, list[str]]]:
    report = run_ddp_script(SCRIPT, out, mode)
    warned = {r: json.loads((out / f"warnings_rank{r}.json").read_text()) for r in (0, 1)}
    return report, warned


@pytest.mark.slow
def test_ddp_mixing_on_every_rank_is_reported_once_on_rank_0(tmp_path: Path) -> None:
    report, warned = _run(tmp_path, "mixing")
    assert report["world_size"] == 2 and report["status"] == "finished"
    (finding,) = report["findings"]
    assert finding["code"] == "batch-mixing"
    assert finding["params"] == ["MeanOverDim0"]  # the mean is in its forward, before head
    assert finding["data"]["next_module"] == "head"
    assert finding["data"]["ranks"] == [0, 1]
    assert finding["data"]["pairs"] == [[i, j] for i in (0, 2, 3) for j in range(4) if j != i]
    assert finding["step"] == 0
    # 4 batches per rank, checked at steps 0 and 2 on each of the 2 ranks.
    assert finding["count"] == 4
    assert [w for w in warned[0] if "batch-mixing" in w] != []
    assert len(warned[0]) == 1 and warned[1] == []


@pytest.mark.slow
def test_ddp_clean_run_with_batchnorm_is_silent(tmp_path: Path) -> None:
    report, warned = _run(tmp_path, "clean")
    assert report["world_size"] == 2
    assert report["findings"] == []
    assert report["checks"][0]["name"] == "BatchMixingCheck"
    assert report["checks"][0]["steps_checked"] == 2
    assert warned == {0: [], 1: []}

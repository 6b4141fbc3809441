"""The examples run, and check their own conclusions (each asserts what it claims)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_reduction_methods_agree_and_the_clone_pitfall_shows() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = runpy.run_path(str(EXAMPLES / "reduction_methods.py"))
        results = module["main"]()
    finally:
        sys.path.remove(str(EXAMPLES))
    assert results['reduction="sum" / B'] < 1e-6
    assert results[".grad.view(...) saved WITHOUT .clone()"] > 1e-2


@pytest.mark.slow
def test_demo_finds_its_planted_bugs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grad_callbacks.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "missing-zero-grad" in out and "gradient-leak" in out
    assert len(list(tmp_path.rglob("grad_audit.json"))) == 4

"""The examples run, and check their own conclusions (each asserts what it claims)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

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


def _run_example(name: str) -> dict[str, Any]:
    """The module namespace of ``examples/<name>``, loaded as a script would be."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return runpy.run_path(str(EXAMPLES / name))
    finally:
        sys.path.remove(str(EXAMPLES))


def _codes(findings: list[Any], *severities: str) -> set[str]:
    return {f.code for f in findings if f.severity in severities}


def test_quickstart_is_clean_and_writes_a_report(tmp_path: Path) -> None:
    findings = _run_example("quickstart.py")["main"](str(tmp_path))
    assert _codes(findings, "warning", "error") == set()
    assert _codes(findings, "info") <= {"check-skipped"}
    assert len(list(tmp_path.rglob("grad_audit.json"))) == 1
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_manual_gan_leak_is_found_only_in_the_leaky_run() -> None:
    main = _run_example("manual_gan.py")["main"]
    leaky, fixed = main(leak=True), main(leak=False)
    assert _codes(leaky, "warning", "error") == {"gradient-leak"}
    (leak,) = [f for f in leaky if f.code == "gradient-leak"]
    assert leak.severity == "error"
    assert all(p.startswith("discriminator.") for p in leak.params)
    assert _codes(fixed, "warning", "error") == set()


def test_accumulation_short_window_and_missing_zero_grad() -> None:
    results = _run_example("accumulation.py")["main"]()
    short_window, no_zero_grad = results["short_window"], results["no_zero_grad"]
    assert _codes(short_window, "warning", "error") == set()
    (short,) = [f for f in short_window if f.code == "short-accumulation-window"]
    assert short.severity == "info"
    assert short.step == 2
    assert short.data["weight"] == pytest.approx(1 / 3)
    assert _codes(no_zero_grad, "warning", "error") == {"missing-zero-grad"}


def test_custom_function_wrong_backward_is_caught_and_right_one_silent() -> None:
    results = _run_example("custom_function.py")["main"]()
    (finding,) = results["bad"]
    assert (finding.code, finding.severity, finding.params) == (
        "autograd-mismatch", "error", ("BadSquare",),
    )
    assert results["good"] == []

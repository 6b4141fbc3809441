"""``grad-audit demo``: its runs train and are reported in a fixed, explained order, and each
run's summary names every finding its report's table shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from grad_callbacks import demo
from grad_callbacks.findings import make_finding
from grad_callbacks.sinks.report import build_report, write_report

SKIPPED = make_finding(
    "check-skipped",
    check="PerSampleGradientCheck",
    step=0,
    message="m",
    data={"reason": "manual optimization: give the module a per_sample_loss"},
)


def _fake_train(trained: list[str]) -> Any:
    """A stand-in for demo.train_run: writes the report a run with its expected bug would."""

    def train_run(run: demo.DemoRun, out: Path, max_steps: int = -1, name: str = "") -> list[Any]:
        trained.append(name)
        findings = [SKIPPED]
        if run.expected:
            findings.append(make_finding(run.expected, check="ZeroGradCheck", step=1, message="m"))
        entry = {
            "name": "ZeroGradCheck",
            "state_key": "k",
            "settings": {},
            "steps_checked": 3,
            "seconds": 0.0,
            "findings": [f.to_dict() for f in findings],
        }
        write_report(out / name, build_report([entry], status="finished", global_step=3))
        return findings

    return train_run


def test_runs_train_and_are_reported_in_the_order_of_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reports were printed sorted by directory name (gan_fixed first), not as trained."""
    trained: list[str] = []
    monkeypatch.setattr(demo, "train_run", _fake_train(trained))
    assert demo.run_demo(str(tmp_path)) == 0
    out = capsys.readouterr().out
    names = [f"{i}_{run.name}" for i, run in enumerate(demo.RUNS, 1)]
    assert trained == names == sorted(names)  # numbered: every listing keeps the order
    assert "runs train, and are reported, in this order" in out
    report_titles = [out.index(f"{tmp_path}/{name} ") for name in names]
    assert report_titles == sorted(report_titles)
    training = [out.index(f"{i}. training {name}:") for i, name in enumerate(names, 1)]
    assert training == sorted(training) and training[-1] < report_titles[0]


def test_a_summary_names_the_info_findings_its_table_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fixed run said "findings: none" above a table with a check-skipped row."""
    monkeypatch.setattr(demo, "train_run", _fake_train([]))
    demo.run_demo(str(tmp_path))
    out = capsys.readouterr().out
    summary = out[: out.index(str(tmp_path / "1_"))]
    assert "findings: none" not in out
    assert summary.count("warnings and errors: none -> as expected") == 2
    assert summary.count(
        "info: check-skipped (PerSampleGradientCheck): manual optimization: give the module a "
        "per_sample_loss"
    ) == len(demo.RUNS)
    assert out.count("│ check-skipped") == len(demo.RUNS)  # one table row per run


def test_summarize_flags_an_unexpected_alarm() -> None:
    stale = make_finding("stale-grad", check="ZeroGradCheck", step=2, message="m")
    ok, lines = demo.summarize([stale], None)
    assert not ok
    assert lines == ["  warnings and errors: stale-grad -> UNEXPECTED (wanted none)"]

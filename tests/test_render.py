"""What ``grad-audit report`` prints about a run's cost, checks and methods (text, md, json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from grad_callbacks import GradientAudit
from grad_callbacks.cli import main
from grad_callbacks.sinks.report import REPORT_NAME, build_report, load_report, write_report
from tests import zoo


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log dir of a clean MLP trained with GradientAudit()."""
    root = tmp_path_factory.mktemp("audited")
    trainer = zoo.fit(
        zoo.MLP(), [GradientAudit(on_finding="log")], logger=TensorBoardLogger(root, name="mlp")
    )
    assert trainer.log_dir is not None
    return Path(trainer.log_dir)


def _report(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    code = main([str(a) for a in argv])
    out, _ = capsys.readouterr()
    assert code == 0
    return out


def test_the_report_says_why_autograd_check_checked_no_step(audited: Path) -> None:
    checks = load_report(audited / REPORT_NAME)["checks"]
    (entry,) = [c for c in checks if c["name"] == "AutogradCheck"]
    assert entry["steps_checked"] == 0
    assert "no custom torch.autograd.Function" in entry["idle_reason"]
    others = [c for c in checks if c["steps_checked"]]
    assert others and all("idle_reason" not in c for c in others)


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_text_and_md_state_cost_coverage_methods_and_idle_reasons(
    audited: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    report = load_report(audited / REPORT_NAME)
    out = _report(capsys, "report", audited, "--format", fmt, "--width", "400")
    overhead = report["overhead"]
    measured = f"{100 * overhead['measured']:.3g}%"
    watched = f"{100 * overhead['watched_share']:.3g}%"
    # The budget is the steady state's (not reached in this short run); the one-time audit
    # of the first step and the whole run are stated apart.
    assert "cost: steady state (from step 100): not reached in this run (budget 3%)" in out
    one_time = overhead["one_time"]
    assert "one-time audit of the first step: " in out
    assert f" = {one_time['training_steps']:.3g} training steps" in out
    assert f"whole run: the audit took {measured} of training time;" in out
    assert f"it watched {watched} of the batches" in out
    for key in overhead:  # every field of the section, whatever the audit measured
        assert f"{key}: " in out, key
    (per_sample,) = [c for c in report["checks"] if c["name"] == "PerSampleGradientCheck"]
    assert f"per_sample_method: {per_sample['per_sample_method']}" in out
    assert "vmap_fallback_reason: none" in out
    assert "AutogradCheck: 0 steps checked" in out
    assert "why no step: nothing to compare" in out


def test_overhead_fields_are_printed_generically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fields another version of the audit adds (nested ones too) are printed as they are."""
    entry = {
        "name": "PerSampleGradientCheck",
        "state_key": "k",
        "settings": {},
        "steps_checked": 2,
        "seconds": 0.5,
        "findings": [],
        "per_sample_method": "loop",
        "vmap_fallback_reason": "RuntimeError: vmap over a data-dependent branch",
    }
    idle = {**entry, "name": "BatchMixingCheck", "steps_checked": 0, "findings": []}
    idle = {k: v for k, v in idle.items() if k not in ("per_sample_method", "vmap_fallback_reason")}
    report = build_report([entry, idle], status="finished", global_step=9)
    report["overhead"] = {
        "measured": 0.02,
        "one_time_seconds": 1.5,
        "steady_state": {"share": 0.011, "steps": 40},
        "latency_bounds": {"nonfinite-grad": 10},
    }
    write_report(tmp_path, report)
    text = _report(capsys, "report", tmp_path, "--width", "300")
    md = _report(capsys, "report", tmp_path, "--format", "md")
    for out in (text, md):
        assert "one_time_seconds: 1.5" in out
        assert "steady_state: share=0.011, steps=40" in out
        assert "latency_bounds: nonfinite-grad=10" in out
        assert "the audit took 2% of training time" in out
        assert "vmap_fallback_reason: RuntimeError: vmap over a data-dependent branch" in out
        # an older report without the reason still says that it has none
        assert "BatchMixingCheck: 0 steps checked" in out
        assert "why no step: not recorded in this report" in out
    payload = json.loads(_report(capsys, "report", tmp_path, "--format", "json"))
    assert payload[0]["overhead"]["steady_state"] == {"share": 0.011, "steps": 40}


def test_the_cost_line_puts_the_budget_beside_the_steady_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``max_overhead`` budgets the steady state: a long run's line gives it against the budget,
    then the one-time audit of the first step and the whole run (the one-time audit makes the
    whole run's share large in short runs)."""
    report = build_report([], status="finished", global_step=300)
    report["overhead"] = {
        "max_overhead": 0.03,
        "measured": 0.09,
        "one_time": {"seconds": 2.5, "training_steps": 120.0, "what": "first step"},
        "steady_state": {"from_step": 100, "measured": 0.021, "steps": 200},
        "watched_share": 0.12,
        "latency_bounds_steps": {"nonfinite-grad": 10, "missing-grad": 50},
    }
    write_report(tmp_path, report)
    for fmt in ("text", "md"):
        out = _report(capsys, "report", tmp_path, "--format", fmt, "--width", "400")
        assert (
            "cost: steady state (from step 100): 2.1% of training time (budget 3%); one-time "
            "audit of the first step: 2.50 s = 120 training steps; whole run: the audit took 9% "
            "of training time; it watched 12% of the batches"
        ) in out
        assert "latency_bounds_steps: nonfinite-grad=10, missing-grad=50" in out

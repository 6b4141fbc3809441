"""Outputs of a real run: TensorBoard scalars, findings text and layout; grad_audit.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import grad_callbacks
from grad_callbacks import GradientAudit, GradientAuditError, ZeroGradCheck
from grad_callbacks.sinks.report import load_report
from tests import zoo


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TensorBoardLogger, GradientAudit]:
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="broken")
    # recompute=False: PerSampleGradientCheck reports check-skipped at step 0, so that the
    # findings change twice (step 0, then missing-zero-grad at step 1)
    audit = GradientAudit(on_finding="log", recompute=False)
    zoo.fit(zoo.ManualMLP(zero_grad=False), [audit], logger=logger, log_every_n_steps=1)
    return logger, audit


def test_scalars_are_stamped_with_the_step_of_the_finding(broken_run: Any) -> None:
    logger, audit = broken_run
    acc = _events(logger.log_dir)
    uncleared = {e.step: e.value for e in acc.Scalars("grad_audit/zero_grad/uncleared_params")}
    (finding,) = audit.checks[0].findings
    assert uncleared[finding.step - 1] == 0.0  # step 0 was clean
    assert uncleared[finding.step] == 4.0  # all 4 parameters at the first broken step
    assert set(uncleared) == set(range(7))
    assert "grad_audit/zero_grad/microbatches" in acc.Tags()["scalars"]
    overhead = [e.value for e in acc.Scalars("grad_audit/audit/overhead")]
    assert overhead and all(v >= 0 for v in overhead)


def test_findings_text_table(broken_run: Any) -> None:
    logger, audit = broken_run
    texts = _events(logger.log_dir).Tensors("grad_audit/findings")  # the contract's exact tag
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| # | severity | code | check | first step | count |\n")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) - 1 == len(audit.findings)  # one row per finding under the header
    assert rows[1].startswith("| 1 | error | `missing-zero-grad` | ZeroGradCheck | 1 |")
    for i, finding in enumerate(sorted(audit.findings, key=lambda f: f.severity != "error"), 1):
        assert f"{i}. **`{finding.code}`** ({finding.check}, step {finding.step}): " in table
        assert finding.message.replace("|", "\\|") in table  # the message in full


def test_findings_text_is_written_once_per_change_of_the_findings(broken_run: Any) -> None:
    """Step 0 (per-sample skipped), step 1 (missing-zero-grad); the same set again at the end
    of fit was written a second time."""
    logger, audit = broken_run
    texts = _events(logger.log_dir).Tensors("grad_audit/findings")
    firsts = sorted({f.step for f in audit.findings})
    assert firsts == [0, 1]
    # written at the end of the batch that found them (global_step has moved on by one)
    assert [t.step for t in texts] == [1, 2]
    assert "Counts as of step 2" in texts[-1].tensor_proto.string_val[0].decode()


def test_custom_scalars_layout(broken_run: Any) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger, audit = broken_run
    raw = _events(logger.log_dir).Tensors("custom_scalars__config__")[0]
    layout = layout_pb2.Layout.FromString(raw.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "Gradient audit"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    assert charts["ZeroGradCheck"] == ["grad_audit/zero_grad/.*"]
    assert charts["PerSampleGradientCheck"] == ["grad_audit/per_sample/.*"]
    # the charts of every check that logs scalars (AutogradCheck logs none: no empty chart)
    expected = {title for c in [*audit.checks, audit] for title in c.scalar_charts()}
    assert set(charts) == expected
    assert charts["Audit overhead"] == [
        "grad_audit/audit/overhead",
        "grad_audit/audit/steady_overhead",
        "grad_audit/audit/watched_share",
    ]
    assert "AutogradCheck" not in charts and "Gradient norms" in charts
    # a check that runs once says so: its chart is one point
    assert charts["BatchMixingCheck (runs once: one point)"] == ["grad_audit/batch_mixing/.*"]


def test_report_written_at_fit_end(broken_run: Any) -> None:
    logger, audit = broken_run
    report = load_report(Path(logger.log_dir) / "grad_audit.json")
    assert report["status"] == "finished"
    assert report["versions"]["grad_callbacks"] == grad_callbacks.__version__
    assert report["versions"]["torch"] == torch.__version__
    assert [c["name"] for c in report["checks"]] == [c.check_name for c in audit.checks]
    check, per_sample = report["checks"][:2]
    assert check["name"] == "ZeroGradCheck"
    assert check["steps_checked"] == 7
    assert check["seconds"] > 0
    assert check["settings"] == {"every_n_steps": 1, "on_finding": "log"}
    assert per_sample["name"] == "PerSampleGradientCheck"
    assert per_sample["settings"]["every_n_steps"] == 100
    assert [f["code"] for f in report["findings"]][:2] == ["missing-zero-grad", "check-skipped"]
    assert report["findings"][0] == audit.findings[0].to_dict()
    overhead = report["overhead"]
    assert overhead["max_overhead"] == 0.03 and overhead["steps"] == 7
    assert overhead["measured"] == pytest.approx(
        overhead["check_seconds"] / overhead["train_seconds"], rel=1e-3
    )


def test_report_written_when_fit_raises(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="raise")
    with pytest.raises(GradientAuditError):
        zoo.fit(zoo.ManualMLP(zero_grad=False), [ZeroGradCheck(on_finding="raise")], logger=logger)
    report = json.loads((Path(logger.log_dir) / "grad_audit.json").read_text())
    assert report["status"] == "failed"
    assert "missing-zero-grad" in report["error"]
    assert report["findings"][0]["code"] == "missing-zero-grad"


class _InterruptAtBatch3(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 3:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_report_written_on_keyboard_interrupt(tmp_path: Path) -> None:
    audit = GradientAudit(report_dir=str(tmp_path))
    with pytest.raises(SystemExit):  # Lightning exits after its graceful shutdown
        zoo.fit(_InterruptAtBatch3(), [audit])
    report = load_report(tmp_path / "grad_audit.json")
    assert report["status"] == "interrupted"
    assert report["checks"][0]["steps_checked"] == 3


def test_no_logger_writes_report_in_report_dir_only(tmp_path: Path) -> None:
    zoo.fit(zoo.MLP(), [GradientAudit(report_dir=str(tmp_path / "audit"))])
    report = load_report(tmp_path / "audit" / "grad_audit.json")
    assert report["findings"] == [] and report["status"] == "finished"


def test_csv_logger_gets_the_scalars_too(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    zoo.fit(zoo.ManualMLP(zero_grad=False), [GradientAudit()], logger=logger, log_every_n_steps=2)
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "grad_audit/zero_grad/uncleared_params" in header


def test_two_standalone_checks_write_one_report(tmp_path: Path) -> None:
    # Instances need distinct settings: Lightning requires unique state keys.
    first = ZeroGradCheck(on_finding="log")
    first.report_dir = str(tmp_path)  # the leader's setting applies
    second = ZeroGradCheck(on_finding="log", every_n_steps=2)
    zoo.fit(zoo.ManualMLP(zero_grad=False), [first, second])
    report = load_report(tmp_path / "grad_audit.json")
    assert len(report["checks"]) == 2
    assert len(report["findings"]) == 2

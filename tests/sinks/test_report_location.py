"""Where grad_audit.json goes: the logger's log_dir through Lightning's filesystem layer (fsspec
URLs write nothing locally); without a logger only where ``report_dir`` asks, never among the
checkpoints or in the working directory."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from lightning.pytorch.loggers import CSVLogger

from grad_callbacks import GradientAudit
from grad_callbacks.cli import main as cli_main
from grad_callbacks.sinks.report import REPORT_NAME, find_reports, load_report
from tests import zoo


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://grad-audit-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_default_root_dir_writes_the_report_there_and_nothing_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_root: str
) -> None:
    monkeypatch.chdir(tmp_path)
    audit = GradientAudit(on_finding="log")
    zoo.fit(
        zoo.NoZeroGradAutomatic(),
        [audit],
        default_root_dir=memory_root,
        logger=True,  # Lightning's default TensorBoardLogger under default_root_dir
        enable_checkpointing=True,
    )
    assert _files(tmp_path) == []  # was a local directory literally named "memory:"
    expected = f"{memory_root}/lightning_logs/version_0/{REPORT_NAME}"
    assert audit.report_path == expected
    (found,) = find_reports(memory_root)
    report = load_report(found)
    assert "missing-zero-grad" in {f["code"] for f in report["findings"]}


def test_csv_logger_on_a_url_gets_the_report_in_its_log_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_root: str
) -> None:
    monkeypatch.chdir(tmp_path)
    logger = CSVLogger(memory_root, name="csv")
    audit = GradientAudit(on_finding="log")
    zoo.fit(zoo.MLP(), [audit], logger=logger, log_every_n_steps=1)
    assert audit.report_path == os.path.join(logger.log_dir, REPORT_NAME)
    assert load_report(audit.report_path)["status"] == "finished"
    assert _files(tmp_path) == []


def test_without_a_logger_no_report_lands_among_checkpoints_or_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    audit = GradientAudit(on_finding="log")
    zoo.fit(zoo.NoZeroGradAutomatic(), [audit], default_root_dir=root, enable_checkpointing=True)
    assert _files(root) == ["checkpoints/epoch=0-step=7.ckpt"]  # exactly what Lightning wrote
    assert _files(cwd) == []
    assert audit.report_path is None
    assert "missing-zero-grad" in {f.code for f in audit.findings}  # still found

    # and with default_root_dir unset: nothing in the working directory but the checkpoints
    zoo.fit(zoo.MLP(), [GradientAudit()], default_root_dir=None, enable_checkpointing=False)
    assert _files(cwd) == []


def test_fast_dev_run_writes_no_report_unasked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fast_dev_run`` swaps the loggers for Lightning's ``DummyLogger`` and writes nothing;
    the report went to ``default_root_dir`` (the working directory when unset)."""
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for default_root_dir in (root, None):
        audit = GradientAudit(on_finding="log")
        trainer = zoo.fit(
            zoo.NoZeroGradAutomatic(), [audit], default_root_dir=default_root_dir,
            logger=True, enable_checkpointing=True, fast_dev_run=2,
        )
        assert trainer.state.finished and trainer.global_step == 2
        assert _files(tmp_path) == []
        assert audit.report_path is None
        assert "missing-zero-grad" in {f.code for f in audit.findings}
    # asked for, it is written
    audit = GradientAudit(on_finding="log", report_dir=str(root))
    zoo.fit(zoo.MLP(), [audit], logger=True, fast_dev_run=True)
    assert _files(tmp_path) == [f"root/{REPORT_NAME}"]


def test_report_dir_is_where_the_report_goes_with_or_without_a_logger(
    tmp_path: Path, memory_root: str
) -> None:
    audit = GradientAudit(on_finding="log", report_dir=str(tmp_path / "audit"))
    zoo.fit(zoo.MLP(), [audit])
    assert _files(tmp_path) == [f"audit/{REPORT_NAME}"]

    url = f"{memory_root}/reports"
    audit = GradientAudit(on_finding="log", report_dir=url)
    zoo.fit(zoo.MLP(), [audit], logger=CSVLogger(tmp_path / "csv"))
    assert audit.report_path == f"{url}/{REPORT_NAME}"
    assert load_report(audit.report_path)["status"] == "finished"
    assert REPORT_NAME not in _files(tmp_path / "csv")


def test_an_unwritable_report_dir_warns_and_the_fit_finishes(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    audit = GradientAudit(on_finding="log", report_dir=str(blocker / "sub"))
    with pytest.warns(UserWarning, match="could not write the report"):
        trainer = zoo.fit(zoo.MLP(), [audit])
    assert trainer.state.finished and audit.report_path is None


def test_cli_reads_a_report_at_a_url(
    memory_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = GradientAudit(on_finding="log", report_dir=f"{memory_root}/run")
    zoo.fit(zoo.NoZeroGradAutomatic(), [audit])
    assert find_reports(memory_root) == [audit.report_path]
    assert cli_main(["report", memory_root, "--fail-on", "error"]) != 0
    assert "missing-zero-grad" in capsys.readouterr().out

"""The audit's scalars reach the loggers it is told to, called as Lightning calls them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grad_callbacks import GradientAudit, ZeroGradCheck
from grad_callbacks.sinks.loggers import select_loggers
from tests import zoo


class KeywordOnlyLogger(Logger):
    """Accepts ``log_metrics`` only the way Lightning calls it: keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "strict"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, *, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def _audit_tags(logger: KeywordOnlyLogger) -> set[str]:
    return {tag for metrics, _ in logger.calls for tag in metrics if tag.startswith("grad_audit/")}


def test_a_keyword_only_logger_gets_the_scalars() -> None:
    logger = KeywordOnlyLogger()
    zoo.fit(zoo.MLP(), [GradientAudit(on_finding="log")], logger=logger, log_every_n_steps=1)
    assert "grad_audit/zero_grad/uncleared_params" in _audit_tags(logger)
    assert "train_loss" in {tag for metrics, _ in logger.calls for tag in metrics}


def _csv_header(logger: CSVLogger) -> str:
    return (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]


def _tb_tags(logger: TensorBoardLogger) -> tuple[set[str], set[str]]:
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["tensors"])


def _two_loggers(tmp_path: Path, loggers: Any) -> tuple[CSVLogger, TensorBoardLogger]:
    csv, tb = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    audit = GradientAudit(on_finding="log", loggers=loggers)
    zoo.fit(zoo.NoZeroGradAutomatic(), [audit], logger=[csv, tb], log_every_n_steps=1)
    return csv, tb


@pytest.mark.parametrize(
    ("selection", "to_csv", "to_tb"),
    [
        ("all", True, True),
        ("tensorboard", False, True),
        (["CSVLogger"], True, False),
        ([CSVLogger, TensorBoardLogger], True, True),
        (None, False, False),
    ],
    ids=["all", "tensorboard", "csv-by-name", "both-by-class", "none"],
)
def test_loggers_selects_who_gets_the_audit(
    tmp_path: Path, selection: Any, to_csv: bool, to_tb: bool
) -> None:
    csv, tb = _two_loggers(tmp_path, selection)
    assert ("grad_audit/zero_grad/uncleared_params" in _csv_header(csv)) is to_csv
    assert "train_loss" in _csv_header(csv)  # the user's own metrics are never touched
    scalars, tensors = _tb_tags(tb)
    assert ("grad_audit/zero_grad/uncleared_params" in scalars) is to_tb
    assert ("grad_audit/findings" in tensors) is to_tb  # the findings text follows it too
    assert "train_loss" in scalars


def test_a_check_inside_the_audit_follows_the_audits_selection() -> None:
    logger = KeywordOnlyLogger()
    check = ZeroGradCheck(on_finding="log")  # its own setting would be "all"
    zoo.fit(zoo.MLP(), [GradientAudit([check], loggers=None)], logger=logger, log_every_n_steps=1)
    assert _audit_tags(logger) == set()


def test_bad_selection_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="loggers must be 'all', 'tensorboard', None"):
        GradientAudit(loggers="csv")
    with pytest.raises(ValueError, match="logger class or a class name"):
        GradientAudit(loggers=[3])


def test_selection_by_base_class_name_includes_subclasses(tmp_path: Path) -> None:
    class MyCSV(CSVLogger):
        pass

    loggers = [MyCSV(tmp_path), TensorBoardLogger(tmp_path)]
    assert select_loggers(loggers, ["CSVLogger"]) == loggers[:1]

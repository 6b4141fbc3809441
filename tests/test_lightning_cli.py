"""The callbacks configured from a LightningCLI YAML file (``class_path`` / ``init_args``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")

from lightning.pytorch.cli import LightningCLI

from grad_callbacks import GradientAudit, ZeroGradCheck


def _config(tmp_path: Path, callbacks: str) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""\
seed_everything: 0
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  devices: 1
  limit_train_batches: 4
  default_root_dir: {tmp_path / "root"}
  callbacks:
{callbacks}
model:
  class_path: tests.cli_models.TinyRegressor
  init_args:
    hidden: 8
data:
  class_path: tests.cli_models.TinyRegressionData
  init_args:
    batch_size: 4
"""
    )
    return cfg


def _fit(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(sys, "argv", ["cli"])  # pytest's own arguments are not the CLI's
    return LightningCLI(
        args=["fit", "--config", str(cfg)],
        save_config_callback=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
    )


def test_gradient_audit_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(
        tmp_path,
        """\
    - class_path: grad_callbacks.GradientAudit
      init_args:
        on_finding: log
        every_n_steps: 2""",
    )
    cli = _fit(cfg, monkeypatch)
    audits = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientAudit)]
    assert len(audits) == 1
    (audit,) = audits
    assert audit.on_finding == "log"
    assert audit.checks
    for check in audit.checks:
        assert check.on_finding == "log", check
        assert check.every_n_steps == 2, check
    assert cli.trainer.global_step == 4
    assert [f for f in audit.findings if f.severity in ("warning", "error")] == []
    assert type(cli.model).__name__ == "TinyRegressor"


def test_zero_grad_check_alone_from_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(
        tmp_path,
        """\
    - class_path: grad_callbacks.ZeroGradCheck
      init_args:
        on_finding: raise""",
    )
    cli = _fit(cfg, monkeypatch)
    (check,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ZeroGradCheck)]
    assert not any(isinstance(cb, GradientAudit) for cb in cli.trainer.callbacks)
    assert check.on_finding == "raise"
    assert cli.trainer.global_step == 4
    assert check.steps_checked == 4
    assert check.findings == []

"""Shared pieces of the 2-process CPU DDP tests (gloo): the trainer the run scripts build, and
the runner that starts a script and reads the report rank 0 wrote.

Each ``ddp_*_run.py`` script is started in a subprocess (Lightning's DDP launcher re-runs the
script for rank 1) and writes ``grad_audit.json`` into the output directory from rank 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def ddp_trainer(out: str, callbacks: Sequence[Any], **kwargs: Any) -> Any:
    """A 2-process CPU DDP Trainer with everything but the callbacks switched off; the audit
    callbacks write their report to ``out`` (without a logger, only where asked)."""
    import lightning as L

    from grad_callbacks.callbacks.base import AuditCallback

    for callback in callbacks:
        if isinstance(callback, AuditCallback):
            callback.report_dir = out

    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    settings.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **settings)


def close_process_group() -> None:
    """Without it some runs abort after fit (see the facts file)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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

"""Shared pieces of the 2-process CPU DDP tests (gloo): the trainer the run scripts build, and
the runner that starts a script and reads the report rank 0 wrote.

Each ``ddp_*_run.py`` script is started in a subprocess (Lightning's DDP launcher re-runs the
script for rank 1) and writes ``grad_audit.json`` into the output directory from rank 0.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
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


#: The runs started together in one launch (``ddp_batch_run.py``) the first time a test asks for
#: one of them. Runs that end by an exception (``on_finding="raise"``: Lightning then kills the
#: other processes) and ``ddp_spawn`` keep a launch of their own.
BATCHED: tuple[tuple[str, str], ...] = (
    ("ddp_autograd_run", "bad"),
    ("ddp_autograd_run", "good"),
    ("ddp_mixing_run", "mixing"),
    ("ddp_mixing_run", "clean"),
    ("ddp_per_sample_run", "clean"),
    ("ddp_per_sample_run", "doubling-on-rank-1"),
    ("ddp_rank_sync_run", "broken"),
    ("ddp_rank_sync_run", "clean"),
    ("ddp_rank_sync_run", "manual-broken"),
    ("ddp_rank_sync_run", "manual-clean"),
    ("ddp_rank_sync_run", "plain"),
    ("ddp_sanity_run", "broken"),
    ("ddp_sanity_run", "clean"),
    ("ddp_windows_run", "clean"),
    ("ddp_windows_run", "skewed"),
    ("ddp_windows_run", "nan"),
    ("ddp_zero_grad_run", "broken"),
    ("ddp_zero_grad_run", "clean"),
)
_batch_dir: Path | None = None


def _launch(script: Path, args: Sequence[str], timeout: float) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _batched_run(script: str, mode: str, out: Path) -> None:
    """Copy the outputs of a batched run into ``out``, launching the batch the first time."""
    global _batch_dir
    if _batch_dir is None:
        batch_dir = Path(tempfile.mkdtemp(prefix="grad-audit-ddp-"))
        atexit.register(shutil.rmtree, batch_dir, ignore_errors=True)
        scenarios = [f"{s}:{m}" for s, m in BATCHED]
        _launch(Path(__file__).with_name("ddp_batch_run.py"), [str(batch_dir), *scenarios], 600)
        _batch_dir = batch_dir
    shutil.copytree(_batch_dir / script / mode, out, dirs_exist_ok=True)


def run_ddp_script(script: Path, out: Path, mode: str) -> dict:
    """Run a 2-process DDP script (or take its run from the batch, see :data:`BATCHED`); return
    the one report rank 0 wrote under ``out``."""
    if (script.stem, mode) in BATCHED:
        _batched_run(script.stem, mode, out)
    else:
        _launch(script, [str(out), mode], 240)
    reports = list(out.rglob("grad_audit.json"))
    assert len(reports) == 1, f"one report, written once by rank 0: {reports}"
    return json.loads(reports[0].read_text())

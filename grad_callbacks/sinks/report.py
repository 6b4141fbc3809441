"""The report file ``grad_audit.json``: versions, checks, settings, time spent, findings."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPORT_NAME = "grad_audit.json"
SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the package and of the libraries it runs on."""
    import lightning
    import torch

    from grad_callbacks import __version__

    return {
        "grad_callbacks": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def build_report(
    checks: Iterable[Mapping[str, Any]],
    *,
    status: str,
    global_step: int,
    world_size: int = 1,
    error: str | None = None,
) -> dict[str, Any]:
    """Assemble the report.

    Args:
        checks: one mapping per check: ``name``, ``state_key``, ``settings``, ``steps_checked``,
            ``seconds``, ``findings`` (list of dicts), and optional ``extra``.
        status: ``"finished"``, ``"interrupted"`` or ``"failed"``.
        global_step: the trainer's ``global_step`` when the report was written.
        world_size: number of training processes.
        error: the exception's text when fit ended by one.
    """
    checks = [dict(c) for c in checks]
    findings = [f for c in checks for f in c["findings"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "status": status,
        "error": error,
        "global_step": global_step,
        "world_size": world_size,
        "checks": checks,
        "findings": findings,
    }


def write_report(directory: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write ``report`` as ``grad_audit.json`` in ``directory`` (atomically); returns the path."""
    path = Path(directory) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
    return path


def find_reports(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``grad_audit.json`` under ``run_dir`` (the directory itself included), sorted."""
    root = Path(run_dir)
    if root.is_file() and root.name == REPORT_NAME:
        return [root]
    if not root.is_dir():
        return []
    return sorted(root.rglob(REPORT_NAME))


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_report`.

    Raises:
        ValueError: when the file is not a grad_audit report.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "schema_version" not in data or "findings" not in data:
        raise ValueError(f"{path} is not a grad_audit report")
    return data

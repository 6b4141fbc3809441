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


def write_report(directory: str | os.PathLike[str], report: Mapping[str, Any]) -> str:
    """Write ``report`` as ``grad_audit.json`` in ``directory``; returns the file's path.

    ``directory`` is a local path or any fsspec URL (``s3://``, ``gs://``, ``memory://``),
    written through Lightning's filesystem layer as Lightning writes its logs and checkpoints:
    a URL writes nothing locally. A local file is replaced atomically.
    """
    from fsspec.implementations.local import LocalFileSystem
    from lightning.fabric.utilities.cloud_io import get_filesystem

    directory = str(directory)
    fs = get_filesystem(directory)
    path = os.path.join(directory, REPORT_NAME)
    text = json.dumps(report, indent=2, default=str)
    fs.makedirs(directory, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = path + ".tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)
    return path


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``memory://...``), not a local path."""
    return "://" in str(path)


def find_reports(run_dir: str | os.PathLike[str]) -> list[Path] | list[str]:
    """Every ``grad_audit.json`` under ``run_dir`` (the directory itself included), sorted.

    ``run_dir`` may be an fsspec URL: the reports are then given as URL strings.
    """
    if is_url(str(run_dir)):
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(str(run_dir))
        root = str(run_dir).rstrip("/")
        if fs.isfile(root):
            return [root] if root.endswith("/" + REPORT_NAME) else []
        if not fs.isdir(root):
            return []
        # fsspec lists bare paths: put them back under the URL as the user spelt it
        bare = fs._strip_protocol(root)
        found = [p for p in fs.find(root) if p.rsplit("/", 1)[-1] == REPORT_NAME]
        return sorted(root + p[len(bare) :] for p in found)
    root_path = Path(run_dir)
    if root_path.is_file() and root_path.name == REPORT_NAME:
        return [root_path]
    if not root_path.is_dir():
        return []
    return sorted(root_path.rglob(REPORT_NAME))


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_report` (a local path or an fsspec URL).

    Raises:
        ValueError: when the file is not a grad_audit report.
    """
    if is_url(str(path)):
        from lightning.fabric.utilities.cloud_io import get_filesystem

        with get_filesystem(str(path)).open(str(path), "r") as f:
            data = json.loads(f.read())
    else:
        data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "schema_version" not in data or "findings" not in data:
        raise ValueError(f"{path} is not a grad_audit report")
    return data

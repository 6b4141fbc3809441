"""Findings made in processes a spawn launcher started, carried back to the launching process.

Under ``strategy="ddp_spawn"`` (Lightning's ``_MultiProcessingLauncher`` with the ``spawn``
start method) the launching process pickles the Trainer with its callbacks to start the
processes that train; the callback object the user holds does not train, and Lightning carries
back only the weights, the best checkpoint path, the trainer state and ``callback_metrics``.

So a callback pickled *to start a process* (:func:`pickled_to_spawn`) gives its copy a file to
write to (:func:`return_file`, one per callback, removed when the callback is collected or the
process exits); the copy on global rank 0 writes its ``state_dict`` there (findings of every
rank, once gathered; steps checked; seconds) and where the report went, at the end of fit
(:func:`send_back`); the launching process reads it the first time the callback's findings are
asked for after that (:func:`take_back`). The file is written with :func:`torch.save` and read
with ``weights_only=True``: plain data only.

``copy.deepcopy``, ``pickle.dumps(trainer)`` and ``torch.save(trainer)`` are not process starts:
their copies carry nothing back. A ``fork`` start (``ddp_fork``, ``ddp_notebook``) pickles
nothing either; there the report is the way to read the findings.
"""

from __future__ import annotations

import multiprocessing.context
import os
import tempfile
import uuid
import warnings
import weakref
from typing import Any, Protocol

import torch


class Returning(Protocol):
    """What a callback offers to carry its state across a spawn."""

    report_path: str | None
    _spawn_return: str | None

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def pickled_to_spawn() -> bool:
    """Whether the object being pickled is on its way to a process being started (``spawn`` or
    ``forkserver``): multiprocessing marks the pickling it does for a process start so."""
    return multiprocessing.context.get_spawning_popen() is not None


def return_file(callback: Returning) -> str:
    """The file the callback's spawned copies write back to (made once per callback)."""
    if callback._spawn_return is None:
        path = os.path.join(
            tempfile.gettempdir(), f"grad_audit_spawned_{os.getpid()}_{uuid.uuid4().hex}.pt"
        )
        callback._spawn_return = path
        weakref.finalize(callback, _remove, path)
    return callback._spawn_return


def send_back(callback: Returning, path: str) -> None:
    """In the spawned copy on global rank 0: write what the launching process should see."""
    try:
        part = f"{path}.{os.getpid()}.part"
        torch.save({"state": callback.state_dict(), "report_path": callback.report_path}, part)
        os.replace(part, path)  # the launching process never reads half a file
    except Exception as exc:  # the fit itself went well: say so and go on
        warnings.warn(
            f"grad_callbacks: could not hand the findings back to the launching process "
            f"({type(exc).__name__}: {exc}); they are in the report",
            stacklevel=2,
        )


def take_back(callback: Returning) -> None:
    """In the launching process: load what a spawned copy wrote, once, then drop the file."""
    path = callback._spawn_return
    if path is None or not os.path.exists(path):
        return
    try:
        returned = torch.load(path, weights_only=True)
    finally:
        _remove(path)
    callback.load_state_dict(returned["state"])
    callback.report_path = returned["report_path"]


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

"""Recomputations and the module's state beyond its attributes: containers two levels in, files
the step writes. Each run with the audit is compared with the same run without it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from tests import zoo


class _NestedOutputs(zoo.MLP):
    """Keeps its step outputs by split for the epoch end, a list inside a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.outputs["train"].append(loss.detach())
        return loss


def test_a_list_two_levels_in_is_as_without_the_audit() -> None:
    """Before: the recomputations appended to ``self.outputs["train"]`` for good (only the
    first level was put back)."""

    def run(audit: bool) -> list[torch.Tensor]:
        L.seed_everything(0)
        module = _NestedOutputs()
        callbacks = [GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)]
        zoo.fit(module, callbacks if audit else [])
        return module.outputs["train"]

    plain, audited = run(False), run(True)
    assert len(plain) == len(zoo.regression_data())
    assert len(audited) == len(plain) and all(map(torch.equal, plain, audited))


class _FileLogger(zoo.MLP):
    """Appends a line per step to a file of its own (``mode``), through ``open()``."""

    def __init__(self, path: Any, mode: str = "a") -> None:
        super().__init__()
        self.path, self.mode = path, mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.mode == "r+":
            with open(self.path, "r+") as f:
                f.seek(0, 2)
                f.write(f"{batch_idx}\n")
        else:
            with open(self.path, self.mode) as f:
                f.write(f"{batch_idx} {float(loss.detach()):.6f}\n")
        return loss


def test_a_file_the_step_writes_is_as_without_the_audit(tmp_path) -> None:
    """Before: every recomputation appended its line too."""

    def run(audit: bool) -> tuple[str, GradientAudit | None]:
        L.seed_everything(0)
        path = tmp_path / f"log-{audit}.txt"
        callbacks = [GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)]
        zoo.fit(_FileLogger(path), callbacks if audit else [])
        return path.read_text(), (callbacks[0] if audit else None)

    (plain, _), (audited, audit) = run(False), run(True)
    assert audited == plain and len(plain.splitlines()) == len(zoo.regression_data())
    assert audit is not None and [f for f in audit.findings if f.code == "check-skipped"] == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked == len(zoo.regression_data())


def test_a_file_opened_for_reading_and_writing_is_named_and_stops_recomputing(tmp_path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("")
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    zoo.fit(_FileLogger(path, mode="r+"), [check], max_steps=3)
    (skipped,) = [f for f in check.findings if f.code == "check-skipped"]
    assert f"the file {str(path)!r} (opened with mode 'r+'" in skipped.message
    assert "stops recomputing" in skipped.message
    assert check.steps_checked == 1


class _Tracker:
    """An object of the user's own class: a running count and the losses seen."""

    def __init__(self) -> None:
        self.calls = 0
        self.losses: list[float] = []

    def update(self, loss: torch.Tensor) -> None:
        self.calls += 1
        self.losses.append(float(loss.detach()))


class _Tracked(zoo.MLP):
    def __init__(self) -> None:
        super().__init__()
        self.tracker = _Tracker()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.tracker.update(loss)
        return loss


def test_an_object_of_the_users_class_is_as_without_the_audit() -> None:
    """Before: ``self.tracker.update(loss)`` counted every recomputation (only the module's own
    attributes were put back)."""

    def run(audit: bool) -> _Tracker:
        L.seed_everything(0)
        module = _Tracked()
        callbacks = [GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)]
        zoo.fit(module, callbacks if audit else [])
        return module.tracker

    plain, audited = run(False), run(True)
    assert plain.calls == len(zoo.regression_data()) == audited.calls
    assert audited.losses == plain.losses

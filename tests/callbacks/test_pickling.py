"""Every check and GradientAudit pickle, unpickle and deep-copy before, during and after fit.

``strategy="ddp_spawn"`` pickles the callbacks to start its processes, ``pickle.dumps(trainer)``
and ``torch.save(trainer)`` pickle them with the trainer, and some tools deep-copy callbacks.
The oracle for a copy is the same check trained fresh: a copy must find what the original
finds, and pickling during fit must not change the run or its findings.
"""

from __future__ import annotations

import copy
import io
import json
import multiprocessing.context
import operator
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from grad_callbacks import (
    AutogradCheck,
    BatchMixingCheck,
    GradientAudit,
    GradientMonitor,
    GradientSanityCheck,
    PerSampleGradientCheck,
    RankSyncCheck,
    ZeroGradCheck,
)
from grad_callbacks.callbacks.base import AuditCallback
from tests import zoo
from tests.distributed.ddp import ROOT, run_ddp_script

CHECKS: list[Callable[[], AuditCallback]] = [
    lambda: GradientAudit(on_finding="log"),
    lambda: ZeroGradCheck(on_finding="log"),
    lambda: GradientSanityCheck(on_finding="log"),
    lambda: PerSampleGradientCheck(on_finding="log", every_n_steps=1),
    lambda: BatchMixingCheck(on_finding="log"),
    lambda: AutogradCheck(on_finding="log"),
    lambda: GradientMonitor(on_finding="log", every_n_steps=1),
    lambda: RankSyncCheck(on_finding="log", every_n_steps=1),
]
IDS = [
    "GradientAudit",
    "ZeroGradCheck",
    "GradientSanityCheck",
    "PerSampleGradientCheck",
    "BatchMixingCheck",
    "AutogradCheck",
    "GradientMonitor",
    "RankSyncCheck",
]


def _pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _codes(check: AuditCallback) -> list[tuple[str, tuple[str, ...], int]]:
    return sorted((f.code, f.params, f.step) for f in check.findings)


class _CopyAtEveryHook(L.Callback):
    """Pickles and deep-copies ``target`` in every per-batch hook of a running fit."""

    def __init__(self, target: AuditCallback) -> None:
        self.target = target
        self.copies: list[AuditCallback] = []

    def _copy(self) -> None:
        self.copies.append(_pickled(self.target))
        self.copies.append(copy.deepcopy(self.target))

    def on_train_batch_start(self, *args: Any) -> None:
        self._copy()

    def on_before_backward(self, *args: Any) -> None:
        self._copy()

    def on_after_backward(self, *args: Any) -> None:
        self._copy()

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._copy()

    def on_train_batch_end(self, *args: Any) -> None:
        self._copy()


@pytest.mark.parametrize("make", CHECKS, ids=IDS)
def test_copies_before_fit_train_like_the_original(make: Callable[[], AuditCallback]) -> None:
    for copied in (_pickled(make()), copy.deepcopy(make())):
        torch.manual_seed(0)
        zoo.fit(zoo.NoZeroGradAutomatic(), [copied])
        original = make()
        torch.manual_seed(0)
        zoo.fit(zoo.NoZeroGradAutomatic(), [original])
        assert _codes(copied) == _codes(original)


@pytest.mark.parametrize("make", CHECKS, ids=IDS)
def test_copies_during_fit_leave_the_run_and_its_findings_unchanged(
    make: Callable[[], AuditCallback],
) -> None:
    plain = make()
    torch.manual_seed(0)
    plain_model = zoo.NoZeroGradAutomatic()
    zoo.fit(plain_model, [plain])

    watched = make()
    probe = _CopyAtEveryHook(watched)
    torch.manual_seed(0)
    model = zoo.NoZeroGradAutomatic()
    zoo.fit(model, [watched, probe])

    assert probe.copies
    assert _codes(watched) == _codes(plain)
    for name, value in zoo.params_of(plain_model).items():
        assert torch.equal(zoo.params_of(model)[name], value), name
    # A copy made mid-fit carries the findings so far, none of the fit's live objects, and
    # audits a new fit from scratch like a fresh check.
    last = probe.copies[-1]
    assert last._trainer is None
    torch.manual_seed(0)
    zoo.fit(zoo.NoZeroGradAutomatic(), [last])
    assert set(_codes(last)) >= set(_codes(plain))


def test_a_copy_made_inside_a_hook_is_not_inside_it() -> None:
    audit = ZeroGradCheck(on_finding="log")
    audit._in_hook = True
    assert _pickled(audit)._in_hook is False


def test_missing_zero_grad_found_by_a_copy_made_mid_fit() -> None:
    audit = GradientAudit(on_finding="log")
    probe = _CopyAtEveryHook(audit)
    zoo.fit(zoo.NoZeroGradAutomatic(), [audit, probe])
    codes = {f.code for f in audit.findings}
    assert "missing-zero-grad" in codes
    # the last copy (end of the last batch) holds what the original had found by then
    assert "missing-zero-grad" in {f.code for f in probe.copies[-1].findings}


def test_pickled_trainer_round_trips_after_fit(tmp_path: Path) -> None:
    audit = GradientAudit(on_finding="log")
    trainer = zoo.fit(zoo.NoZeroGradAutomatic(), [audit], default_root_dir=tmp_path)
    (restored,) = [cb for cb in _pickled(trainer).callbacks if isinstance(cb, GradientAudit)]
    assert _codes(restored) == _codes(audit) and "missing-zero-grad" in str(_codes(audit))

    buffer = io.BytesIO()
    torch.save(trainer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    (restored,) = [cb for cb in loaded.callbacks if isinstance(cb, GradientAudit)]
    assert _codes(restored) == _codes(audit)


def test_pickled_trainer_before_fit() -> None:
    trainer = L.Trainer(callbacks=[GradientAudit()], logger=False, enable_checkpointing=False)
    restored = _pickled(trainer)
    assert any(isinstance(cb, GradientAudit) for cb in restored.callbacks)


def _as_if_spawned(obj: Any) -> Any:
    """Pickle ``obj`` as multiprocessing does to start a process (``ddp_spawn``), load it."""
    previous = multiprocessing.context.get_spawning_popen()
    multiprocessing.context.set_spawning_popen(object())
    try:
        data = pickle.dumps(obj)
    finally:
        multiprocessing.context.set_spawning_popen(previous)
    return pickle.loads(data)


@pytest.mark.parametrize("make", [CHECKS[0], CHECKS[1]], ids=IDS[:2])
def test_findings_of_a_spawned_copy_come_back_to_the_launching_process(
    make: Callable[[], AuditCallback], tmp_path: Path
) -> None:
    original = make()
    original.report_dir = str(tmp_path)
    worker = _as_if_spawned(original)  # what a ddp_spawn process trains with
    zoo.fit(zoo.NoZeroGradAutomatic(), [worker])
    assert "missing-zero-grad" in {f.code for f in worker.findings}
    # the launching process's callback holds what the spawned rank 0 found, read once
    assert _codes(original) == _codes(worker)
    checked = [c.steps_checked for c in getattr(worker, "checks", [worker])]
    assert [c.steps_checked for c in getattr(original, "checks", [original])] == checked
    assert sum(checked) > 0
    assert original.report_path == worker.report_path == str(tmp_path / "grad_audit.json")
    assert original._spawn_return is not None and not Path(original._spawn_return).exists()
    # a later process start carries them on: the next copy starts from them
    assert _codes(_as_if_spawned(original)) == _codes(worker)


def test_copies_that_are_not_process_starts_carry_nothing_back() -> None:
    original = GradientAudit(on_finding="log")
    for copied in (_pickled(original), copy.deepcopy(original)):
        zoo.fit(zoo.NoZeroGradAutomatic(), [copied])
        assert "missing-zero-grad" in {f.code for f in copied.findings}
        assert original.findings == []


@pytest.mark.slow
def test_ddp_spawn_trains_and_reports(tmp_path: Path) -> None:
    report = run_ddp_script(ROOT / "tests/distributed/ddp_spawn_run.py", tmp_path, "broken")
    assert report["world_size"] == 2 and report["status"] == "finished"
    (finding,) = [f for f in report["findings"] if f["severity"] != "info"]
    assert finding["code"] == "missing-zero-grad"
    assert finding["data"]["ranks"] == [1]
    # The launching process's GradientAudit did not train; what rank 0 found comes back to it.
    launcher = json.loads((tmp_path / "launcher.json").read_text())
    key = operator.itemgetter("check", "code", "step")
    assert sorted(map(key, launcher["findings"])) == sorted(map(key, report["findings"]))
    assert launcher["report_path"] is not None
    written = next(tmp_path.rglob("grad_audit.json"))
    assert Path(launcher["report_path"]).resolve() == written.resolve()
    checked = {c["name"]: c["steps_checked"] for c in report["checks"]}
    assert launcher["steps_checked"] == checked and checked["ZeroGradCheck"] > 0

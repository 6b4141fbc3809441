"""2-process CPU DDP runs (gloo) of ``GradientAudit`` whose per-step checks watch windows.

Usage: python tests/distributed/ddp_windows_run.py OUT_DIR [clean|skewed|nan]

The windows are fixed (``FixedWindows`` of tests/callbacks/test_watch_windows.py, one every 31
batches) instead of timed. ``clean``: a clean MLP; ``skewed``: the same, but rank 1's windows
come every 7 batches (timed windows differ between ranks too); ``nan``: rank 1's loss turns
NaN from batch 12, between two windows. Rank 0 writes the audit report to OUT_DIR, each rank
writes ``rank<r>.json`` with its global step and the batches its checks watched.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import zoo
from tests.callbacks.test_watch_windows import FixedWindows, _audit
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


class NaNOnRank1From12(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and batch_idx >= 12 else loss


class EverySeven(FixedWindows):
    def gap(self, window_seconds: float) -> int:
        return 7


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    model = NaNOnRank1From12() if mode == "nan" else zoo.MLP()
    audit = _audit(on_finding="log")
    trainer = ddp_trainer(out, [audit])
    if mode == "skewed" and trainer.global_rank == 1:
        audit.watch_windows = EverySeven(None, share=1.0, length=1)
    trainer.fit(model, zoo.regression_data(n=320))  # 40 batches per rank
    windows = audit.watch_windows
    assert windows is not None
    outcome = {"global_step": trainer.global_step, "watched": windows.watched}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

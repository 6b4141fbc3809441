"""A 2-process CPU DDP run (gloo) where rank 1 forgets zero_grad; run as a script.

Usage: python tests/distributed/ddp_zero_grad_run.py OUT_DIR [broken|clean]
Rank 0 writes the report to OUT_DIR (the run's default_root_dir).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from grad_callbacks import GradientAudit
from tests import zoo
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


class ForgetsZeroGradOnRank1(zoo.MLP):
    def __init__(self, broken: bool) -> None:
        super().__init__()
        self.broken = broken

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self.broken and self.global_rank == 1:
            return
        optimizer.zero_grad()


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    trainer = ddp_trainer(
        out, [GradientAudit(on_finding="log")], max_epochs=2, accumulate_grad_batches=2
    )
    trainer.fit(ForgetsZeroGradOnRank1(broken=mode == "broken"), zoo.regression_data(n=32))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""A 2-process CPU DDP run (gloo) for GradientSanityCheck; run as a script.

Usage: python tests/distributed/ddp_sanity_run.py OUT_DIR [broken|clean]

``broken``: an auxiliary head no process uses (``find_unused_parameters=True``), and a NaN
feature in one sample of rank 1's last batch. A second head is used on rank 1 only: DDP averages
its gradient into every process, so it is not missing. ``clean``: neither bug.
Rank 0 writes the report to OUT_DIR (the run's default_root_dir).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from grad_callbacks.callbacks.sanity import GradientSanityCheck
from tests import zoo_issue4
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")

BATCHES = 3


class UnusedHeadNaNOnRank1(zoo_issue4.NaNFeature):
    def __init__(self, broken: bool) -> None:
        super().__init__()
        self.broken = broken
        self.aux_head = nn.Linear(9, 1)
        self.rank1_head = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.broken and self.global_rank == 1 and batch_idx == BATCHES - 1:
            x = x.clone()
            x[0, 0] = -10.0  # log(x + 3) of this sample is NaN
        loss = super().training_step((x, y), batch_idx)
        if self.global_rank == 1:
            loss = loss + 0.1 * self.rank1_head(x).pow(2).mean()
        if not self.broken:
            loss = loss + 1e-3 * self.aux_head(torch.cat([x, x[:, :1]], dim=1)).mean()
        return loss


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    trainer = ddp_trainer(
        out,
        [GradientSanityCheck(on_finding="log", patience=2)],
        strategy=DDPStrategy(find_unused_parameters=True),
        limit_train_batches=BATCHES,
    )
    data = zoo_issue4.data_with_bad_sample(index=None, n=32)
    trainer.fit(UnusedHeadNaNOnRank1(broken=mode == "broken"), data)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

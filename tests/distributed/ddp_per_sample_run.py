"""A 2-process CPU DDP run of PerSampleGradientCheck; run as a script.

Usage: python tests/distributed/ddp_per_sample_run.py OUT_DIR [clean|doubling-on-rank-1]
Rank 0 writes the report to OUT_DIR. The live gradient is averaged over the ranks by DDP, so
the check must average its recomputed gradients too (a collective every rank enters).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grad_callbacks import PerSampleGradientCheck
from tests import zoo
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


class DoublingOnRank1(zoo.MLP):
    def on_fit_start(self) -> None:
        if self.global_rank == 1:
            for p in self.parameters():
                p.register_hook(lambda g: 2 * g)


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    trainer = ddp_trainer(
        out, [PerSampleGradientCheck(every_n_steps=1, on_finding="log")], accumulate_grad_batches=2
    )
    module = zoo.MLP() if mode == "clean" else DoublingOnRank1()
    trainer.fit(module, zoo.regression_data(n=64, batch_size=8))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""A 2-process CPU DDP run of AutogradCheck; run as a script.

Usage: python tests/distributed/ddp_autograd_run.py OUT_DIR [bad|good]
``bad`` uses a custom Function whose backward is off by a factor of two on every rank; ``good``
the correct one. Rank 0 writes the report to OUT_DIR.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grad_callbacks import AutogradCheck
from tests import zoo
from tests.callbacks.test_autograd_check import BadSquare, FunctionNet, Square
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    trainer = ddp_trainer(out, [AutogradCheck(on_finding="log")], limit_train_batches=2)
    trainer.fit(FunctionNet(BadSquare if mode == "bad" else Square), zoo.regression_data(n=32))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

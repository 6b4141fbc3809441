"""2-process CPU DDP runs (gloo) under ``on_finding="raise"`` with a bug on rank 1 only.

Usage: python tests/distributed/ddp_raise_run.py OUT_DIR [audit|zero_grad|sanity]

``audit``: ``GradientAudit(on_finding="raise")`` and rank 1 forgets ``zero_grad``;
``zero_grad``: the same with a standalone ``ZeroGradCheck``; ``sanity``: a standalone
``GradientSanityCheck`` and a NaN feature in one sample of rank 1's second batch.

Each rank catches what ``trainer.fit`` raises and writes ``rank<r>.json`` to OUT_DIR: the
exception's type, message and ``rank`` attribute, and whether its parameters are still finite.
Rank 0 writes the audit report to OUT_DIR (the run's default_root_dir).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grad_callbacks import GradientAudit, GradientSanityCheck, ZeroGradCheck
from tests import zoo, zoo_issue4
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


class ForgetsZeroGradOnRank1(zoo.MLP):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self.global_rank != 1:
            optimizer.zero_grad()


class NaNOnRank1(zoo_issue4.NaNFeature):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_rank == 1 and batch_idx == 1:
            x = x.clone()
            x[0, 0] = -10.0  # log(x + 3) of this sample is NaN
        return super().training_step((x, y), batch_idx)


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    if mode == "sanity":
        model: Any = NaNOnRank1()
        callbacks: list[Any] = [GradientSanityCheck(on_finding="raise")]
        data = zoo_issue4.data_with_bad_sample(index=None, n=32)
    else:
        model = ForgetsZeroGradOnRank1()
        check = GradientAudit if mode == "audit" else ZeroGradCheck
        callbacks = [check(on_finding="raise")]
        data = zoo.regression_data(n=32)
    trainer = ddp_trainer(out, callbacks, max_epochs=2)
    outcome: dict[str, Any] = {"raised": None}
    try:
        trainer.fit(model, data)
    except Exception as exc:
        outcome = {
            "raised": type(exc).__name__,
            "message": str(exc),
            "rank": getattr(exc, "rank", None),
        }
    outcome["global_step"] = trainer.global_step
    outcome["finite_params"] = all(bool(p.isfinite().all()) for p in model.parameters())
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

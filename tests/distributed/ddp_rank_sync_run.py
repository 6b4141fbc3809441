"""2-process CPU DDP runs (gloo) for RankSyncCheck; run as a script.

Usage: python tests/distributed/ddp_rank_sync_run.py OUT_DIR MODE

Modes (several planted cases share one run, each in its own part of the model):

* ``broken``: ``GradientAudit()`` with defaults on :class:`Towers`: a backbone that
  Lightning's ``BackboneFinetuning`` freezes in ``setup`` and unfreezes at epoch 1, a layer whose
  gradient rank 1 changes after the reduction from step ``EDIT_FROM`` on, a parameter created and
  added to the optimizer after DDP wrapped the model, and a head that stays in sync.
* ``clean``: ``GradientAudit()`` with ``accumulate_grad_batches=4``, BatchNorm with
  ``broadcast_buffers=False``, ``find_unused_parameters=True`` with a branch never taken, and a
  backbone frozen by a zero learning rate until epoch 1 (the fix the docs give).
* ``manual-broken`` / ``manual-clean``: manual optimization accumulating two micro-batches under
  ``no_sync()``, left on for the micro-batch that steps, or not.
* ``manual-raise``: ``manual-broken`` with ``on_finding="raise"``: every rank stops together
  (each writes ``rank<r>.json`` with what it raised; no oracle).
* ``plain``: a plain MLP, checked at every step.

Rank 0 writes the report to OUT_DIR, and ``oracle.json``: for every parameter and buffer, the
largest absolute difference between rank 1's and rank 0's final values, from an all_gather of
the final tensors (independent of the check).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grad_callbacks import GradientAudit, RankSyncCheck
from tests import zoo
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")

EDIT_FROM = 4


class Towers(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.edited = nn.Linear(8, 1)
        self.late: nn.Parameter | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.head(self.backbone(x)) + self.edited(x)
        if self.late is not None:
            out = out + x @ self.late
        return F.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def on_train_start(self) -> None:
        # Created after DDP wrapped the model: never broadcast, its gradient never averaged.
        self.late = nn.Parameter(torch.zeros(8, 1))
        self.trainer.optimizers[0].add_param_group({"params": [self.late]})

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # After the reduction: a per-rank edit (or what a lossy interconnect does).
        if self.global_rank == 1 and self.global_step >= EDIT_FROM:
            self.edited.weight.grad[0, 0] += 1e-3


class CleanTwins(L.LightningModule):
    """BatchNorm (buffers not broadcast), a branch no rank takes, and a backbone frozen the way
    docs/checks/rank-sync.md recommends under DDP: trainable from the start, learning rate 0
    until epoch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 1)
        self.never = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.head(self.backbone(x))
        if bool(x.abs().max() > 1e6):
            out = out + self.never(x)
        return F.mse_loss(out, y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            [
                {"params": [*self.head.parameters(), *self.never.parameters()]},
                {"params": self.backbone.parameters()},
            ],
            lr=0.01,
        )
        factors = [lambda epoch: 1.0, lambda epoch: 0.0 if epoch < 1 else 0.1]
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, factors)]


class ManualAccumulation(L.LightningModule):
    """Two micro-batches per step, the first under ``no_sync()``; ``leave_on`` keeps it on for
    the second (stepping) one too."""

    def __init__(self, leave_on: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.leave_on = leave_on
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        stepping = batch_idx % 2 == 1
        ddp = self.trainer.strategy.model
        if stepping and not self.leave_on:
            self.manual_backward(F.mse_loss(self.net(x), y) / 2)
        else:
            with ddp.no_sync():
                self.manual_backward(F.mse_loss(self.net(x), y) / 2)
        if stepping:
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def write_oracle(out: str, module: nn.Module) -> None:
    """Largest |rank 1 - rank 0| of every final parameter and buffer (all ranks enter it)."""
    diffs: dict[str, float] = {}
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in tensors:
        gathered = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, t.detach().contiguous())
        diffs[name] = float((gathered[1].double() - gathered[0].double()).abs().max())
    if torch.distributed.get_rank() == 0:
        Path(out, "oracle.json").write_text(json.dumps(diffs))


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    model: L.LightningModule
    if mode == "broken":
        model = Towers()
        callbacks: list[Any] = [
            GradientAudit(on_finding="log"),
            BackboneFinetuning(unfreeze_backbone_at_epoch=1),
        ]
        logger = TensorBoardLogger(save_dir=out, name="tb", version=0)
        trainer = ddp_trainer(out, callbacks, max_epochs=3, logger=logger)
        data = zoo.regression_data(n=64, batch_size=4)  # 8 batches per rank and epoch
    elif mode == "clean":
        model = CleanTwins()
        callbacks = [GradientAudit(on_finding="log")]
        trainer = ddp_trainer(
            out,
            callbacks,
            max_epochs=3,
            accumulate_grad_batches=4,
            strategy=DDPStrategy(find_unused_parameters=True, broadcast_buffers=False),
        )
        data = zoo.regression_data(n=256, batch_size=4)  # 32 batches, 8 steps per epoch
    elif mode.startswith("manual"):
        model = ManualAccumulation(leave_on=mode != "manual-clean")
        callbacks = [RankSyncCheck(on_finding="raise" if mode == "manual-raise" else "log")]
        trainer = ddp_trainer(out, callbacks, max_epochs=1)
        data = zoo.regression_data(n=64, batch_size=4)
    else:
        model = zoo.MLP()
        callbacks = [RankSyncCheck(every_n_steps=1, first_steps=0, on_finding="log")]
        trainer = ddp_trainer(out, callbacks, max_epochs=1)
        data = zoo.regression_data(n=80, batch_size=4)
    if mode == "manual-raise":
        outcome: dict[str, Any] = {"raised": None}
        try:
            trainer.fit(model, data)
        except Exception as exc:
            outcome = {"raised": type(exc).__name__, "message": str(exc)}
        outcome["global_step"] = trainer.global_step
        Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))
    else:
        trainer.fit(model, data)
        write_oracle(out, model)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Gradient accumulation: the short last window, and a forgotten ``zero_grad``.

With ``Trainer(accumulate_grad_batches=N)`` Lightning divides each micro-batch's loss by ``N``,
accumulates ``N`` backward passes into ``.grad`` and then steps the optimizer (and zeroes the
gradients). It also steps on the *last batch of the epoch*, however many micro-batches the window
holds by then. With 7 batches and ``N = 3`` the windows are 3, 3 and 1 micro-batches: the last
step uses a single micro-batch whose loss was still divided by 3, so that update is applied with
weight 1/3 of a full one (its gradient is a third of the mean gradient). That is by design and
usually harmless, so ``ZeroGradCheck`` reports it as ``short-accumulation-window`` with severity
``info`` and ``data["weight"] == 1/3`` (pick a batch count divisible by ``N``, or drop the last
partial window, if it matters to you).

The broken variant, with the same accumulation, overrides ``LightningModule.optimizer_zero_grad``
with a no-op (as one might, thinking that accumulation means "never clear"). The gradients are
then never cleared: every step applies the sum of all gradients since the start of training, not
just its own window's. That is ``missing-zero-grad`` (error).

Run it: ``python examples/accumulation.py``; it trains both for one epoch of 7 batches and checks
the findings.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_callbacks import Finding, GradientAudit


class Regressor(L.LightningModule):
    """A clean MLP regressor (automatic optimization)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


class NeverZeroGrad(Regressor):
    """Broken: ``optimizer_zero_grad`` does nothing, so gradients pile up across steps."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass


def seven_batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(28, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(28, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)  # 28 / 4 = 7 batches


def train(module: L.LightningModule, accumulate_grad_batches: int) -> list[Finding]:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[audit],
        accumulate_grad_batches=accumulate_grad_batches,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="grad_audit_accumulation_"),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(module, seven_batches())
    print(f"{type(module).__name__}, accumulate_grad_batches={accumulate_grad_batches}: "
          f"{trainer.global_step} optimizer steps")
    for f in audit.findings:
        print(f"  [{f.severity}] {f.code} at step {f.step}: {f.message}")
    return audit.findings


def main() -> dict[str, list[Finding]]:
    results = {
        "short_window": train(Regressor(), accumulate_grad_batches=3),
        "no_zero_grad": train(NeverZeroGrad(), accumulate_grad_batches=3),
    }

    (short,) = [f for f in results["short_window"] if f.code == "short-accumulation-window"]
    assert short.severity == "info"
    assert abs(short.data["weight"] - 1 / 3) < 1e-9, short.data
    assert not [f for f in results["short_window"] if f.severity != "info"]
    print(f"\nshort window: step {short.step}, {short.data['microbatches']} micro-batch(es), "
          f"weight {short.data['weight']:.3f}")

    codes = {f.code for f in results["no_zero_grad"] if f.severity != "info"}
    assert codes == {"missing-zero-grad"}, codes
    print("no-op optimizer_zero_grad: missing-zero-grad found")
    return results


if __name__ == "__main__":
    main()

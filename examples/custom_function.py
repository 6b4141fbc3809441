"""A custom ``torch.autograd.Function`` whose ``backward`` is off by a factor of 2.

A hand-written ``backward()`` is only as right as its derivation. Here ``Square`` computes
``x ** 2`` but its backward returns ``grad * x`` instead of ``2 * x * grad``: the gradient points
the right way with half the size, so training still "works", just as if that part of the network
had a smaller learning rate. Nothing crashes and no loss curve gives it away.

``AutogradCheck`` (part of ``GradientAudit``) walks the loss's autograd graph at the first
training batch, finds the custom Functions the training step used, records their inputs by
recomputing the step on a couple of samples (without touching the run), and compares the
Jacobian from ``backward()`` with central finite differences in float64. The wrong one is
reported as ``autograd-mismatch`` (error) naming the Function (``BadSquare``), with the worst
entry (analytic vs numerical value); the correct one is silent.

(``torch.autograd.gradcheck`` does the same by hand; the callback runs it for you, on the inputs
your model really sees.)

Run it: ``python examples/custom_function.py``; it trains with both Functions and checks the
findings.
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

from grad_callbacks import AutogradCheck, Finding


class Square(torch.autograd.Function):
    """``x ** 2`` with the right derivative, ``2 x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class BadSquare(torch.autograd.Function):
    """``x ** 2`` with a wrong derivative: the factor 2 is missing."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x * grad  # BUG: should be 2 * x * grad


class SquareNet(L.LightningModule):
    """Linear -> the custom square -> tanh -> Linear."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function
        self.inner = nn.Linear(8, 16)
        self.outer = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.function.apply(self.inner(x)))
        return nn.functional.mse_loss(self.outer(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = x[:, :2].sum(dim=1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def train(function: type[torch.autograd.Function]) -> list[Finding]:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    check = AutogradCheck(on_finding="log")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[check],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="grad_audit_custom_function_"),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(SquareNet(function), data())
    print(f"{function.__name__}: {len(check.findings)} finding(s)")
    for f in check.findings:
        print(f"  [{f.severity}] {f.code} {list(f.params)}: {f.message}")
    return check.findings


def main() -> dict[str, list[Finding]]:
    results = {"bad": train(BadSquare), "good": train(Square)}

    (finding,) = results["bad"]
    assert finding.code == "autograd-mismatch" and finding.severity == "error", finding
    assert finding.params == ("BadSquare",), finding.params
    ratio = finding.data["numerical"] / finding.data["analytic"]
    assert abs(ratio - 2) < 1e-3, finding.data  # the backward is off by exactly a factor 2
    print(f"\nworst entry: numerical {finding.data['numerical']:.4g} vs "
          f"analytic {finding.data['analytic']:.4g} (ratio {ratio:.3f})")

    assert results["good"] == [], results["good"]
    print("the correct Square is silent")
    return results


if __name__ == "__main__":
    main()

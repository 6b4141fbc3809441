"""Small modules for GradientSanityCheck and AutogradCheck tests (shared with the DDP scripts)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests import zoo

ALL_MLP_PARAMS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")


class DetachedBranch(L.LightningModule):
    """Broken: the branch's output is detached, so ``branch`` never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(8, 8)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.cat([x, torch.tanh(self.branch(x)).detach()], dim=1)
        return nn.functional.mse_loss(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class UnusedHead(zoo.MLP):
    """Broken: an auxiliary head is built and handed to the optimizer, but never used."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_head = nn.Linear(16, 3)


class NaNFeature(zoo.MLP):
    """A ``log`` feature of the input: NaN for a sample whose first feature is below -3."""

    def __init__(self) -> None:
        super().__init__(features=9)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super().training_step((torch.cat([x, torch.log(x[:, :1] + 3.0)], dim=1), y), 0)


def data_with_bad_sample(
    index: int | None = 9, n: int = 28, batch_size: int = 4, seed: int = 0
) -> DataLoader:
    """``zoo.regression_data`` where sample ``index`` (batch ``index // batch_size``) makes
    :class:`NaNFeature` produce NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g).clamp(-2.5, 2.5)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    if index is not None:
        x[index, 0] = -10.0
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class OverflowOnBatch2(zoo.MLP):
    """Clean under a GradScaler: batch 2's loss is huge, so its 16-bit gradients overflow."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1e30 if batch_idx == 2 else 1.0)

"""A tiny LightningModule and LightningDataModule for LightningCLI tests (importable by path)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyRegressor(L.LightningModule):
    """A clean two-layer regressor."""

    def __init__(self, features: int = 8, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyRegressionData(L.LightningDataModule):
    """Synthetic regression data: ``n`` samples of ``features`` features."""

    def __init__(self, n: int = 32, features: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.features, self.batch_size = n, features, batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.features, generator=g)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(self.n, 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

"""Generative models as users train them, drawing their own noise in ``training_step``: a VAE
(reparameterisation ``torch.randn_like``, KL term) and a denoising-diffusion step (a random
timestep per sample ``torch.randint(0, T, (B,))``, noise ``torch.randn_like(x)``).

Clean unless ``summed=True``, which plants ``reduction-sum`` (the per-sample losses summed over
the batch instead of averaged).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 12


def vector_data(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, FEATURES, generator=g)), batch_size=batch_size)


class VAE(L.LightningModule):
    """Gaussian VAE: ``z = mu + eps * sigma`` with ``eps = torch.randn_like(mu)``; per-sample
    reconstruction + KL, averaged over the batch."""

    def __init__(self, latent: int = 4, summed: bool = False) -> None:
        super().__init__()
        self.summed = summed
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 24), nn.ReLU(), nn.Linear(24, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, 24), nn.ReLU(), nn.Linear(24, FEATURES))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.mse_loss(self.decoder(z), x, reduction="none").sum(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        per_sample = recon + kl
        return per_sample.sum() if self.summed else per_sample.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class DiffusionStep(L.LightningModule):
    """DDPM's training step: noise prediction at a random timestep per sample."""

    steps = 50

    def __init__(self, summed: bool = False) -> None:
        super().__init__()
        self.summed = summed
        self.time = nn.Embedding(self.steps, 8)
        self.net = nn.Sequential(nn.Linear(FEATURES + 8, 32), nn.SiLU(), nn.Linear(32, FEATURES))
        betas = torch.linspace(1e-4, 0.02, self.steps)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        t = torch.randint(0, self.steps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = self.alpha_bar[t].unsqueeze(-1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        pred = self.net(torch.cat([noisy, self.time(t)], dim=-1))
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(-1)
        return per_sample.sum() if self.summed else per_sample.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)

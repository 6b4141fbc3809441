"""Models that mix samples of a batch (and clean ones that must not be flagged), for
BatchMixingCheck. Every model is a LightningModule doing regression on ``(x, y)`` batches unless
said otherwise; the broken ones mix in a known place, named in their docstring."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.zoo import regression_data

__all__ = ["regression_data"]


class Regressor(L.LightningModule):
    """``forward(x) -> (B, 1)``, MSE against ``y``, SGD."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[-1]
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


# ---------------------------------------------------------------------------------- broken
class FoldNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.mixer = nn.Linear(16, 16)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        # Meant to be (B, 2, 8) -> (B, 16); folds samples 2k and 2k+1 into one row instead.
        h = self.mixer(h.reshape(-1, 16)).reshape(x.shape[0], 8)
        return self.head(torch.tanh(h))


class FoldsBatch(Regressor):
    """Broken: a reshape folds pairs of samples (0, 1), (2, 3) into one row before
    ``model.mixer``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = FoldNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TransposeNet(nn.Module):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 6)
        self.mixer = nn.Linear(batch_size, batch_size)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        h = self.mixer(h.transpose(0, 1)).transpose(0, 1)  # a Linear over the batch axis
        return self.head(torch.tanh(h))


class TransposeMixer(Regressor):
    """Broken: ``model.mixer`` is a Linear applied after a transpose, i.e. across samples."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TransposeNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MeanOverDim0(Regressor):
    """Broken: centres features with a mean over dim 0 (meant dim 1) between ``enc`` and
    ``head``. With ``at_end=True`` the mean is taken on the output in the module's own forward."""

    def __init__(self, at_end: bool = False) -> None:
        super().__init__()
        self.at_end = at_end
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        if self.at_end:
            out = self.head(h)
            return out - out.mean(dim=0, keepdim=True)
        return self.head(h - h.mean(dim=0, keepdim=True))


class TwoInTwoOut(L.LightningModule):
    """Two inputs, two outputs; ``output[1]`` of sample i reads ``input[0]`` of sample i-1
    (a ``roll`` over the batch axis) before ``head_b``. ``output[0]`` is clean."""

    def __init__(self) -> None:
        super().__init__()
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head_a(x1), self.head_b(x2 + x1.roll(1, dims=0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x1, x2, y = batch
        a, b = self(x1, x2)
        return nn.functional.mse_loss(a, y) + nn.functional.mse_loss(b, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def two_input_data(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x1, x2, torch.randn(n, 1, generator=g)), batch_size=batch_size)


class BatchPool(nn.Module):
    """Replaces every sample by the batch mean (a pooling over the wrong axis)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=0, keepdim=True).expand_as(h)


class DictOut(Regressor):
    """Returns ``{"logits": clean, "score": mixed}``; ``pool`` averages over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.logits = nn.Linear(8, 1)
        self.pool = BatchPool()
        self.score = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.enc(x))
        return {"logits": self.logits(h), "score": self.score(self.pool(h))}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        return nn.functional.mse_loss(out["logits"], y) + nn.functional.mse_loss(out["score"], y)


class TinyTransformer(Regressor):
    """Token ids ``(B, T)`` -> token + positional embeddings -> self-attention -> mean over T.

    ``bug=True`` builds ``nn.MultiheadAttention`` with ``batch_first=False`` (the default) and
    feeds it batch-first ``(B, T, E)`` data: it attends over the batch axis (broken, ``attn``).
    ``bug=False`` is the same model correctly configured. The positional embedding looks up
    ``arange(T)`` with T equal to the batch size, which must not be mistaken for a per-sample
    input.
    """

    def __init__(self, bug: bool, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(16, width)
        self.attn = nn.MultiheadAttention(width, 2, dropout=0.1, batch_first=not bug)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return self.head(h.mean(dim=1))


class TokenMeanOverBatch(Regressor):
    """Token ids ``(B, T)``; ``mix=True`` averages the embeddings over dim 0 instead of the
    sequence dim 1 (broken: every sample sees the others, ``head`` is the first mixing module);
    ``mix=False`` averages over dim 1 (clean)."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.mix = mix
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(dim=1)
        if self.mix:
            h = h + self.emb(ids).mean(dim=(0, 1))
        return self.head(h)


def token_data(n: int = 20, batch_size: int = 4, length: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 20, (n, length), generator=g)
    return DataLoader(TensorDataset(ids, torch.randn(n, 1, generator=g)), batch_size=batch_size)


# ---------------------------------------------------------------------------------- clean
class BatchNormNet(Regressor):
    """Clean: Linear -> train-mode BatchNorm1d -> Dropout -> Linear. Its forward logs (through
    ``self.log``) when ``log_in_forward``, which the check must mute."""

    def __init__(self, log_in_forward: bool = False) -> None:
        super().__init__()
        self.log_in_forward = log_in_forward
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.log_in_forward and self._trainer is not None:
            self.log("forward_mean", out.mean())
        return out


class StringBatches(Dataset):
    """Samples are strings; the default collate makes a list of strings."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, k: int) -> str:
        return "sample " * (k + 1)


class Strings(L.LightningModule):
    """Takes a list of strings (no tensor in the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, texts: list[str]) -> torch.Tensor:
        lengths = torch.tensor([[float(len(t))] for t in texts])
        return self.head(lengths)

    def training_step(self, batch: list[str], batch_idx: int) -> torch.Tensor:
        return self(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)

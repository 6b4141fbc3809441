"""Sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``, as recommender
models train them with SGD or SparseAdam): every check runs on them, the per-sample comparison
included (vmap cannot: the loop takes over), finds a planted bug, and leaves training unchanged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo


class SparseBag(L.LightningModule):
    def __init__(self, reduction: str = "mean", double_embedding: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.bag = nn.EmbeddingBag(100, 8, mode="mean", sparse=True)
        self.head = nn.Linear(8, 2)
        if double_embedding:  # planted: the optimizer sees twice the embedding's gradient
            self.bag.weight.register_hook(lambda g: 2 * g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self.head(self.bag(ids)), y, reduction=self.reduction)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> zoo.DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (48, 6), generator=g)
    return zoo.DataLoader(
        zoo.TensorDataset(ids, torch.randint(0, 2, (48,), generator=g)), batch_size=8
    )


def _audit() -> GradientAudit:
    return GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)


def test_clean_sparse_model_is_checked_quietly_and_unchanged() -> None:
    states = []
    for callbacks in ([_audit()], []):
        torch.manual_seed(0)
        module = SparseBag()
        zoo.fit(module, callbacks, data=_data())
        states.append(module.state_dict())
        if callbacks:
            audit = callbacks[0]
            assert audit.findings == []  # was check-skipped: both vmap and the loop failed
            (check,) = [c for c in audit.checks if isinstance(c, PerSampleGradientCheck)]
            assert check.steps_checked == len(_data())
            assert check.last_stats is not None and check.last_stats.method == "loop"
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_summed_loss_on_a_sparse_model_is_reduction_sum() -> None:
    audit = _audit()
    zoo.fit(SparseBag(reduction="sum"), [audit], data=_data())
    (finding,) = [f for f in audit.findings if f.code == "reduction-sum"]
    assert finding.data["scale"] == pytest.approx(8, rel=1e-3)


def test_a_doubled_sparse_gradient_is_grad_mismatch_on_the_embedding() -> None:
    audit = _audit()
    zoo.fit(SparseBag(double_embedding=True), [audit], data=_data())
    (finding,) = [f for f in audit.findings if f.code == "grad-mismatch"]
    assert finding.params == ("bag.weight",)

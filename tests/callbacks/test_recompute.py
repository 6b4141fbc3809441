"""isolated(): a recomputed training_step leaves no trace on the module, metrics, RNG or logs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from grad_callbacks.callbacks.recompute import capture_rng, isolated
from tests import zoo


class Busy(L.LightningModule):
    """Dropout, BatchNorm, a torchmetrics metric and self.log: every side effect at once."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                                 nn.Linear(16, 3))
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.cat = torchmetrics.CatMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.acc(logits.argmax(-1), y)
        self.cat.update(loss.detach())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_isolated_restores_buffers_metrics_rng_and_mutes_log() -> None:
    module = Busy().train()
    module.training_step(_batch(), 0)  # some real state to protect
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    acc_state = {k: getattr(module.acc, k).clone() for k in module.acc._defaults}
    cat_len = len(module.cat.value)
    rng = torch.get_rng_state()
    logged: list[str] = []
    module.log = lambda name, *a, **k: logged.append(name)  # type: ignore[method-assign]

    with isolated(module):
        assert module.log is not None
        module.training_step(_batch(), 0)
        module.training_step(_batch(), 1)
    assert logged == []  # muted inside
    del module.log

    for k, v in module.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, v in acc_state.items():
        assert torch.equal(getattr(module.acc, k), v), k
    assert module.acc._update_count == 1
    assert len(module.cat.value) == cat_len
    assert torch.equal(torch.get_rng_state(), rng)
    assert "log" not in module.__dict__


def test_rng_state_replays_the_same_dropout_mask() -> None:
    drop = nn.Dropout(0.5).train()
    x = torch.ones(100)
    state = capture_rng()
    first = drop(x)
    with isolated(drop, rng_state=state):
        replay = drop(x)
    assert torch.equal(first, replay)
    assert not torch.equal(drop(x), first)  # the live stream moved on as if nothing happened


def test_isolated_in_a_real_run_keeps_logged_metrics() -> None:
    class Recomputing(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, opt: Any) -> None:
            with isolated(pl_module):
                pl_module.training_step(_batch(), 0)

    results = []
    for callbacks in ([], [Recomputing()]):
        torch.manual_seed(0)
        module = Busy()
        data = zoo.DataLoader(zoo.TensorDataset(*_batch()), batch_size=3)
        trainer = zoo.fit(module, callbacks, data=data)
        results.append((zoo.params_of(module), dict(trainer.callback_metrics)))
    (p0, m0), (p1, m1) = results
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)

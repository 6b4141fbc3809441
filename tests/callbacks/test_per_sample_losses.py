"""How PerSampleGradientCheck obtains its losses from a stateful training_step: Lightning's
LightningLSTM carries ``self.hidden`` from batch to batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo, zoo_real


class SummedLSTM(zoo_real.DemoLSTM):
    """Broken: the demo's loss times the batch size (``reduction-sum``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * batch[0].shape[0]


class LoopOracle(L.Callback):
    """At each step, the per-sample squared gradient norms by a plain loop of single-sample
    passes, each starting from the sample's own row of the hidden state the real step saw."""

    def __init__(self) -> None:
        self.sq_norms: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        self.hidden, self.batch, self.idx = module.hidden, batch, idx

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        after = module.hidden
        params = [p for p in module.parameters() if p.requires_grad]
        module.log = lambda *a, **k: None  # training_step logs
        module.eval()  # the check compares with dropout off
        norms = []
        tokens, target = self.batch
        for i in range(tokens.shape[0]):
            if self.hidden is not None:
                module.hidden = tuple(h[:, i : i + 1] for h in self.hidden)
            else:
                module.hidden = None
            loss = module.training_step((tokens[i : i + 1], target[i : i + 1]), self.idx)
            grads = torch.autograd.grad(loss, params)
            norms.append(sum(float(g.double().pow(2).sum()) for g in grads))
        module.train()
        del module.log
        module.hidden = after
        self.sq_norms.append(torch.tensor(norms, dtype=torch.float64))


def test_demo_lstm_trains_identically_and_quietly_under_the_audit() -> None:
    """Before: grad-mismatch at step 0 (the replay started from the hidden state the real step
    had just made) and a changed run (the replays advanced self.hidden)."""

    def run(audit: bool) -> tuple[dict[str, torch.Tensor], GradientAudit | None]:
        L.seed_everything(0)
        module = zoo_real.DemoLSTM(nhid=16)
        callbacks = [GradientAudit(on_finding="log")] if audit else []
        zoo.fit(module, callbacks, data=module.train_dataloader(), max_steps=4)
        return zoo.params_of(module), (callbacks[0] if audit else None)

    plain, _ = run(False)
    audited, audit = run(True)
    assert audit is not None
    assert all(torch.equal(plain[k], audited[k]) for k in plain)
    loud = [f for f in audit.findings if f.severity != "info"]
    assert loud == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked >= 1
    assert [f for f in per_sample.findings if f.code == "check-skipped"] == []


def test_a_carried_hidden_state_is_cut_with_the_batch() -> None:
    """From the second step on the hidden state has one row per sample: each sample's loss must
    start from its own row (an independent loop of single-sample passes agrees)."""
    L.seed_everything(0)
    module = zoo_real.DemoLSTM(nhid=16)
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    oracle = LoopOracle()
    zoo.fit(module, [check, oracle], data=module.train_dataloader(), max_steps=3)
    assert check.steps_checked == 3
    assert check.findings == []
    assert check.last_stats is not None
    torch.testing.assert_close(
        check.last_stats.sq_norms.double(), oracle.sq_norms[-1], rtol=1e-4, atol=1e-8
    )


def test_a_summed_loss_is_found_on_every_step_of_a_stateful_model() -> None:
    L.seed_everything(0)
    module = SummedLSTM(nhid=16)
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    zoo.fit(module, [check], data=module.train_dataloader(), max_steps=3)
    codes = {(f.code, f.count) for f in check.findings}
    assert codes == {("reduction-sum", 3)}


def test_a_carried_state_without_a_clear_batch_axis_is_skipped_by_name() -> None:
    L.seed_everything(0)
    module = zoo_real.DemoLSTM(nhid=8)  # hidden (2, 8, 8) with batches of 8
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    zoo.fit(module, [check], data=module.train_dataloader(), max_steps=2)
    skipped = [f for f in check.findings if f.code == "check-skipped"]
    assert len(skipped) == 1 and "self.hidden" in skipped[0].message
    assert [f for f in check.findings if f.severity != "info"] == []

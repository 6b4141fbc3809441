"""Weighted reductions (``reduction-weighted``) and accumulation weighting
(``accumulation-weighting``) in real runs, against a plain loop of single-sample backward passes.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from grad_callbacks import Finding, GradientAudit, GradientAuditWarning
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from tests import zoo, zoo_real


def _check(**kwargs: Any) -> PerSampleGradientCheck:
    return PerSampleGradientCheck(every_n_steps=1, on_finding="log", **kwargs)


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity != "info"]


def _codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


def _oracle(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """Per-sample gradients by a loop of single-sample backward passes on a copy of the module
    (``training_step`` on ``batch[i:i+1]``), and the batch gradient by one backward pass."""
    model = copy.deepcopy(module)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        model.zero_grad()
        model.training_step(b, 0).backward()
        return torch.cat([p.grad.flatten().clone() for p in params])

    n = batch["labels"].shape[0]
    rows = torch.stack([grad_of({k: v[i : i + 1] for k, v in batch.items()}) for i in range(n)])
    return rows, grad_of(batch)


# ------------------------------------------------------------------ weighted reductions
def test_token_mean_weights_are_the_token_counts_by_the_oracle() -> None:
    torch.manual_seed(0)
    module = zoo_real.TokenLM()
    batch = zoo_real.token_batch([2, 9, 5, 4, 12, 7], length=16)
    before = copy.deepcopy(module)
    check = _check(check_optimizer_grad=False)
    zoo.fit(module, [check], data=torch.utils.data.DataLoader([batch], batch_size=None))
    (finding,) = check.findings
    assert finding.code == "reduction-weighted" and finding.severity == "info"
    assert "non-ignored tokens in `labels`" in finding.message and "6 of 6" in finding.message
    weights = torch.tensor(finding.data["weights"], dtype=torch.float64)
    counts = torch.tensor([2.0, 9, 5, 4, 12, 7], dtype=torch.float64)
    # The oracle: per-sample gradients from single-sample backward passes; the reported weights
    # rebuild the batch gradient, and they are the token counts over their total.
    rows, batch_grad = _oracle(before, batch)
    rebuilt = weights.float() @ rows
    assert torch.linalg.vector_norm(rebuilt - batch_grad) <= 1e-5 * batch_grad.norm()
    torch.testing.assert_close(weights, counts / counts.sum(), rtol=1e-4, atol=1e-6)
    assert finding.data["counts"] == counts.tolist()


def test_summed_token_loss_is_reduction_sum() -> None:
    torch.manual_seed(0)
    check = _check()
    data = zoo_real.token_windows([[[2, 9, 5, 4]]], length=16)
    zoo.fit(zoo_real.TokenLM("sum"), [check], data=data)
    (finding,) = check.findings
    assert finding.code == "reduction-sum"
    assert finding.data["scale"] == pytest.approx(4.0, rel=1e-4)


def test_mixing_under_a_token_mean_stays_batch_coupling() -> None:
    torch.manual_seed(0)
    check = _check(check_optimizer_grad=False)
    data = zoo_real.token_windows([[[2, 9, 5, 4]]], length=16)
    zoo.fit(zoo_real.TokenLM(mix=True), [check], data=data)
    (finding,) = _alarms(check.findings)
    assert finding.code == "batch-coupling" and finding.severity == "warning"
    assert finding.data["weighted_fit"] is True and finding.data["residual"] > 0.1
    assert "after fitting the best per-sample weighting" in finding.message


def test_batchnorm_under_a_token_mean_is_explained_and_weighted() -> None:
    torch.manual_seed(0)
    check = _check(check_optimizer_grad=False)
    data = zoo_real.token_windows([[[2, 9, 5, 4]]], length=16)
    zoo.fit(zoo_real.TokenLM(batchnorm=True), [check], data=data)
    assert _alarms(check.findings) == []
    coupling = [f for f in check.findings if f.code == "batch-coupling"]
    assert coupling and coupling[0].data["explained_by"] == "BatchNorm"
    assert "reduction-weighted" in _codes(check.findings)


class InBatchNegatives(zoo.MLP):
    """A contrastive loss: each sample's positive is its own target, the others' targets are
    its negatives. One sample alone has a softmax over one entry: no gradient."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        scores = self.net(x) @ y.T  # (B, B)
        return F.cross_entropy(scores, torch.arange(len(x)))


def test_in_batch_negatives_give_finite_messages() -> None:
    check = _check(check_optimizer_grad=False)
    zoo.fit(InBatchNegatives(), [check], data=zoo.regression_data(n=16, batch_size=8))
    coupling = [f for f in check.findings if f.code == "batch-coupling"]
    assert coupling, check.findings
    for finding in check.findings:
        assert "nan" not in finding.message.lower() and "inf " not in finding.message.lower()
    assert "one sample alone gives no gradient" in coupling[0].message
    assert coupling[0].data["in_the_loss"] is True
    assert coupling[0].severity == "warning" and "coupled_loss=True" in coupling[0].message


def test_coupling_declared_in_the_loss_is_info_and_the_rest_is_still_compared() -> None:
    check = _check(coupled_loss=True)
    zoo.fit(InBatchNegatives(), [check], data=zoo.regression_data(n=16, batch_size=8))
    assert _alarms(check.findings) == []
    (coupling,) = [f for f in check.findings if f.code == "batch-coupling"]
    assert coupling.severity == "info" and coupling.data["declared"] is True
    assert check.settings()["coupled_loss"] is True
    # the grad-mismatch replay still runs on the declared loss
    assert check.report_entry()["recomputations"] > 0 and check.steps_checked == 2


def test_declared_coupling_covers_coupling_one_sample_alone_also_has() -> None:
    class BatchCentred(zoo.MLP):
        """A batch-level statistic (as a mixture-of-experts load-balancing term reads the
        routing over the batch): one sample alone still has a gradient, and the samples are
        coupled."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.net(x - x.mean(0)), y)

    for declared in (False, True):
        check = _check(coupled_loss=declared, check_optimizer_grad=False)
        zoo.fit(BatchCentred(), [check], data=zoo.regression_data(n=16, batch_size=8))
        (coupling,) = [f for f in check.findings if f.code == "batch-coupling"]
        assert coupling.data["in_the_loss"] is False
        assert coupling.severity == ("info" if declared else "warning")
        assert ("coupled_loss=True" in coupling.message) is declared


# ------------------------------------------------------------------ accumulation weighting
CLASSIC = [[[3, 7], [40, 60]]]  # one window: micro-batches with 10 and 100 target tokens


def _fit_window(module: Any, windows: list[Any], num_items: bool = False) -> Any:
    torch.manual_seed(0)
    check = _check()
    data = zoo_real.token_windows(windows, length=64, num_items=num_items)
    zoo.fit(module, [check], data=data, accumulate_grad_batches=len(windows[0]))
    return check


def test_each_micro_batch_normalized_by_its_own_tokens_is_accumulation_weighting() -> None:
    check = _fit_window(zoo_real.TokenLM("mean"), CLASSIC)
    (finding,) = _alarms(check.findings)
    assert finding.code == "accumulation-weighting" and finding.severity == "warning"
    assert finding.data["counts"] == [10.0, 100.0]
    assert finding.data["ratio"] == pytest.approx(10.0)
    assert "10x" in finding.message and "whole accumulation window" in finding.message


def test_equal_counts_across_micro_batches_are_silent() -> None:
    check = _fit_window(zoo_real.TokenLM("mean"), [[[3, 7], [4, 6]]])
    assert _alarms(check.findings) == []
    assert check.steps_checked == 1


def test_window_normalized_loss_is_a_mean_not_a_sum() -> None:
    # The num_items_in_batch recipe: the token sum over the window's count. A sum over the
    # micro-batch, but a mean over the optimizer step's tokens.
    check = _fit_window(zoo_real.TokenLM("window"), CLASSIC, num_items=True)
    assert check.findings == []
    assert check.steps_checked == 1


def test_per_sample_means_are_silent_under_accumulation() -> None:
    check = _fit_window(zoo_real.TokenLM("per-sample"), CLASSIC)
    assert check.findings == []


# ------------------------------------------------------------------ real models
WEIGHTED = {"gpt2", "llama", "t5", "bart"}


@pytest.mark.parametrize("kind", ["bart", "t5", "gpt2", "llama", "bert"])
def test_hugging_face_models_train_clean_with_the_audit(kind: str) -> None:
    zoo_real.require_transformers()
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        zoo.fit(zoo_real.HFModule(kind), [audit], data=zoo_real.hf_loader(kind), max_steps=1)
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked == 1
    assert _alarms(audit.findings) == []
    weighted = [f for f in audit.findings if f.code == "reduction-weighted"]
    if kind in WEIGHTED:
        (finding,) = weighted
        assert "tokens" in finding.data["follows"]
        assert math.isclose(finding.data["weight_sum"], 1.0, rel_tol=1e-3)
    else:
        assert weighted == []


class SummedGPT2(zoo_real.HFModule):
    """Planted: the token losses of a GPT-2 LM summed, not averaged."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )


def test_summed_gpt2_token_loss_is_reduction_sum() -> None:
    zoo_real.require_transformers()
    torch.manual_seed(0)
    check = _check(check_optimizer_grad=False)
    zoo.fit(SummedGPT2("gpt2"), [check], data=zoo_real.hf_loader("gpt2"), max_steps=1)
    (finding,) = check.findings
    assert finding.code == "reduction-sum"
    assert finding.data["scale"] == pytest.approx(8.0, rel=1e-3)


def test_run_scale_and_token_weighting_are_checkpointed() -> None:
    check = _fit_window(zoo_real.TokenLM("mean"), CLASSIC)
    extra = check.state_dict()["extra"]
    assert extra["norm_scale"] > 0
    assert extra["own_count"] == {"path": ["labels"], "rule": "non-ignored", "shift": False}
    fresh = _check()
    fresh.load_state_dict(check.state_dict())
    assert fresh._norm_scale.value == extra["norm_scale"]
    assert fresh._own_count == check._own_count


class ClassWeighted(zoo.MLP):
    """``F.cross_entropy(weight=...)``: a mean weighted by each sample's class weight."""

    CLASS_WEIGHTS = (1.0, 3.0, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.net[2] = torch.nn.Linear(16, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, weight=torch.tensor(self.CLASS_WEIGHTS))


class SampleWeighted(zoo.MLP):
    """Per-sample weights carried in the batch: ``sum_i v_i l_i / sum_i v_i``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, v = batch
        losses = F.mse_loss(self.net(x), y, reduction="none").mean(1)
        return (v * losses).sum() / v.sum()


def test_class_weights_and_per_sample_weights_are_named() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    v = torch.rand(8, generator=g) + 0.1
    cases = [
        (ClassWeighted(), (x, y), torch.tensor(ClassWeighted.CLASS_WEIGHTS)[y], "class in `[1]`"),
        (SampleWeighted(), (x, torch.randn(8, 1, generator=g), v), v, "weights `[2]`"),
    ]
    for module, tensors, expected, follows in cases:
        check = _check(check_optimizer_grad=False)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=8)
        zoo.fit(module, [check], data=data)
        (finding,) = check.findings
        assert finding.code == "reduction-weighted" and follows in finding.data["follows"]
        weights = torch.tensor(finding.data["weights"])
        torch.testing.assert_close(weights, expected / expected.sum(), rtol=1e-4, atol=1e-6)


class WindowNormalizedGPT2(zoo_real.HFModule):
    """GPT-2's own loss with ``num_items_in_batch``: the window's target tokens (the fix)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs, num_items_in_batch=batch["num_items"][0]).loss


@pytest.mark.parametrize("window_normalized", [False, True])
def test_gpt2_with_accumulate_grad_batches(window_normalized: bool) -> None:
    """A tiny GPT-2 (tied embeddings) on padded batches with -100 labels, two micro-batches per
    step: its own loss (a mean over each micro-batch's target tokens) is accumulation-weighting
    with the counts counted by hand; with ``num_items_in_batch`` it is silent."""
    zoo_real.require_transformers()
    from tests.callbacks.test_per_sample_manual import _gpt2_windows

    batches, counts = _gpt2_windows()
    assert counts[0] != counts[1]
    data = torch.utils.data.DataLoader(batches, batch_size=None)
    torch.manual_seed(0)
    module = WindowNormalizedGPT2("gpt2") if window_normalized else zoo_real.HFModule("gpt2")
    check = _check()
    zoo.fit(module, [check], data=data, accumulate_grad_batches=2)
    assert check.steps_checked == 1 and check.last_stats is not None
    if window_normalized:
        assert _alarms(check.findings) == []
        assert "accumulation-weighting" not in _codes(check.findings)
        return
    (finding,) = _alarms(check.findings)
    assert finding.code == "accumulation-weighting" and finding.data["manual"] is False
    assert finding.data["counts"] == [float(c) for c in counts]
    assert finding.data["ratio"] == pytest.approx(max(counts) / min(counts))
    assert "accumulate_grad_batches=2" in finding.message

"""PerSampleGradientCheck in manual optimization without extra user code: the losses handed to
``manual_backward`` are captured from a replay of ``training_step`` and checked per optimizer."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo, zoo_real

CLASSIC = [[[3, 7], [40, 60]]]  # one window: micro-batches with 10 and 100 target tokens


def _check() -> PerSampleGradientCheck:
    return PerSampleGradientCheck(every_n_steps=1, on_finding="log")


class SummedGAN(zoo.GAN):
    """Broken: one of the two losses is summed over the batch (``reduction-sum``)."""

    def __init__(self, mode: str, summed: str) -> None:
        super().__init__(mode)
        self.summed = summed

    def _losses(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_loss, d_loss = super()._losses(real)
        b = real.shape[0]
        return (g_loss * b, d_loss) if self.summed == "generator" else (g_loss, d_loss * b)


class HookedGAN(zoo.GAN):
    """Broken: a hook doubles one network's gradients before its optimizer steps
    (``grad-mismatch`` on that network only)."""

    def __init__(self, mode: str, hooked: str) -> None:
        super().__init__(mode)
        for p in getattr(self, hooked).parameters():
            p.register_hook(lambda g: 2 * g)


@pytest.mark.parametrize("mode", ["toggle", "zero_first", "alternate"])
def test_a_clean_gan_is_checked_per_optimizer_and_quiet(mode: str) -> None:
    """Before: check-skipped (manual optimization needed a per_sample_loss method)."""
    check = _check()
    zoo.fit(zoo.GAN(mode), [check], data=zoo.gan_data(), max_steps=4)
    assert check.findings == []
    assert check.steps_checked >= 2 and check.last_stats is not None
    assert check.last_stats.n == 4


@pytest.mark.parametrize("mode", ["toggle", "zero_first"])
@pytest.mark.parametrize("summed", ["generator", "discriminator"])
def test_a_summed_loss_is_found_for_either_optimizer(mode: str, summed: str) -> None:
    check = _check()
    zoo.fit(SummedGAN(mode, summed), [check], data=zoo.gan_data(), max_steps=2)
    assert [f.code for f in check.findings] == ["reduction-sum"]
    assert check.findings[0].step == 0  # the batch's first step, not the global step after it
    assert check.findings[0].data["scale"] == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("mode", ["toggle", "zero_first"])
@pytest.mark.parametrize("hooked", ["generator", "discriminator"])
def test_a_gradient_changed_before_the_step_is_found_on_its_optimizer(
    mode: str, hooked: str
) -> None:
    check = _check()
    zoo.fit(HookedGAN(mode, hooked), [check], data=zoo.gan_data(), max_steps=2)
    (finding,) = check.findings
    assert finding.code == "grad-mismatch"
    assert finding.params and all(name.startswith(hooked) for name in finding.params)
    assert finding.data["relative_error"] == pytest.approx(1.0, rel=1e-3)  # 2g against g


@pytest.mark.parametrize("raw_backward", [False, True])
def test_manual_single_optimizer_is_checked(raw_backward: bool) -> None:
    check = _check()
    zoo.fit(zoo.ManualMLP(raw_backward=raw_backward), [check], max_steps=3)
    assert check.findings == [] and check.steps_checked == 3


def test_a_per_sample_loss_method_stays_an_option() -> None:
    class WithPerSampleLoss(zoo.ManualMLP):
        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return ((self.net(x) - y) ** 2).mean(dim=1)

    check = _check()
    zoo.fit(WithPerSampleLoss(), [check], max_steps=2)
    assert check.findings == [] and check.last_stats is not None


def test_the_audit_leaves_a_gan_bitwise_identical_and_checks_it() -> None:
    def run(audit: bool) -> tuple[dict[str, torch.Tensor], GradientAudit | None]:
        L.seed_everything(0)
        module = zoo.GAN("toggle")
        callbacks = [GradientAudit(on_finding="log")] if audit else []
        zoo.fit(module, callbacks, data=zoo.gan_data())
        return zoo.params_of(module), (callbacks[0] if audit else None)

    plain, _ = run(False)
    audited, audit = run(True)
    assert audit is not None
    assert all(torch.equal(plain[k], audited[k]) for k in plain)
    assert [f for f in audit.findings if f.severity != "info"] == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked >= 1 and per_sample.findings == []


# ------------------------------------------------------------------ hand-written accumulation
class ManualTokenLM(zoo_real.TokenLM):
    """:class:`~tests.zoo_real.TokenLM` trained with accumulation written by hand: every batch's
    loss goes to ``manual_backward``, the optimizer steps every ``accumulate`` batches. A loss
    normalized by its own micro-batch ("mean", "per-sample") is divided by ``accumulate``; the
    window-normalized one ("window": token sum / the window's count) is not."""

    def __init__(
        self, reduction: str = "mean", accumulate: int = 2, zero_first: bool = False
    ) -> None:
        super().__init__(reduction)
        self.automatic_optimization = False
        self.accumulate = accumulate
        self.zero_first = zero_first  # zero_grad at the window's start, not after the step

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        if self.zero_first and batch_idx % self.accumulate == 0:
            opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        if self.reduction != "window":
            loss = loss / self.accumulate
        self.manual_backward(loss)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            if not self.zero_first:
                opt.zero_grad()


def _fit_manual(module: L.LightningModule, windows: list[Any], num_items: bool = False) -> Any:
    torch.manual_seed(0)
    check = _check()
    data = zoo_real.token_windows(windows, length=128, num_items=num_items)
    zoo.fit(module, [check], data=data)
    return check


def _window_oracle(
    module: zoo_real.TokenLM, batches: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """By plain backward passes on a copy: the gradient the hand-written accumulation steps on
    (each micro-batch's own token mean, divided by the number of micro-batches), and the
    gradient of the window as one batch (the token sum over the window's token count)."""
    model = copy.deepcopy(module)
    params = list(model.parameters())

    def grad_of(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params)
        return torch.cat([g.flatten() for g in grads])

    def token_sum(b: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(b["input_ids"]).reshape(-1, zoo_real.VOCAB)
        return F.cross_entropy(logits, b["labels"].reshape(-1), ignore_index=-100, reduction="sum")

    counts = [int((b["labels"] != -100).sum()) for b in batches]
    k = len(batches)
    accumulated = sum(grad_of(token_sum(b) / (k * c)) for b, c in zip(batches, counts, strict=True))
    window = sum(grad_of(token_sum(b) / sum(counts)) for b in batches)
    return accumulated, window


@pytest.mark.parametrize("zero_first", [False, True])
def test_hand_written_accumulation_of_own_token_means_is_accumulation_weighting(
    zero_first: bool,
) -> None:
    """Before: the batch that stepped was never checked (the one before it, which stepped
    nothing, took the scheduled step), so nothing was found."""
    torch.manual_seed(0)
    module = ManualTokenLM("mean", zero_first=zero_first)
    before = copy.deepcopy(module)
    check = _fit_manual(module, [*CLASSIC, *CLASSIC] if zero_first else CLASSIC)
    (finding,) = [f for f in check.findings if f.severity != "info"]
    assert finding.code == "accumulation-weighting" and finding.severity == "warning"
    assert finding.step == 0 and finding.data["manual"] is True
    assert finding.data["counts"] == [10.0, 100.0]
    # The oracle: per-token weights 1 / (k * N_m), by hand; and by plain backward passes, the
    # accumulated gradient is not the window's.
    weights = [1 / (2 * 10), 1 / (2 * 100)]
    assert finding.data["ratio"] == pytest.approx(max(weights) / min(weights))
    assert "hand-written accumulation: 2 micro-batches" in finding.message
    accumulated, window = _window_oracle(before, list(zoo_real.token_windows(CLASSIC, 128)))
    assert (accumulated - window).norm() > 0.1 * window.norm()


@pytest.mark.parametrize(
    ("reduction", "windows", "num_items"),
    [
        ("mean", [[[3, 7], [4, 6]]], False),  # equal counts
        ("window", CLASSIC, True),  # normalized over the window's count
        ("per-sample", CLASSIC, False),  # plain per-sample means
    ],
)
def test_hand_written_accumulation_done_right_is_silent(
    reduction: str, windows: list[Any], num_items: bool
) -> None:
    torch.manual_seed(0)
    module = ManualTokenLM(reduction)
    before = copy.deepcopy(module)
    check = _fit_manual(module, windows, num_items=num_items)
    assert [f for f in check.findings if f.severity != "info"] == []
    assert "accumulation-weighting" not in {f.code for f in check.findings}
    # the stepping batch was compared (before: only the batch that stepped nothing was taken)
    assert check.steps_checked == 1 and check.last_stats is not None
    if reduction == "mean":  # the oracle: equal counts, so the two gradients agree
        batches = list(zoo_real.token_windows(windows, 128))
        accumulated, window = _window_oracle(before, batches)
        torch.testing.assert_close(accumulated, window, rtol=1e-4, atol=1e-7)


def test_hand_written_accumulation_under_the_audit_whose_checks_sleep() -> None:
    """GradientAudit calls a check only from its due step on: the window of step 2 is found
    after the check slept through step 1 (counts by hand: 10 and 100 tokens)."""
    windows = [[[5, 5], [4, 6]], [[3, 7], [40, 60]], [[3, 7], [40, 60]]]
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log", every_n_steps=2, max_overhead=None)
    data = zoo_real.token_windows(windows, length=128)
    zoo.fit(ManualTokenLM("mean"), [audit], data=data)
    (finding,) = [f for f in audit.findings if f.severity != "info"]
    assert finding.code == "accumulation-weighting" and finding.step == 2
    assert finding.data["counts"] == [10.0, 100.0]
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked == 2


class AccumulatingGAN(zoo.GAN):
    """Lightning's toggle recipe with both optimizers stepping every second batch (clean)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        last = (batch_idx + 1) % 2 == 0
        g_loss, d_loss = self._losses(real)
        self.toggle_optimizer(opt_d)
        self.manual_backward(d_loss / 2)
        if last:
            opt_d.step()
            opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_loss, _ = self._losses(real)
        self.manual_backward(g_loss / 2)
        if last:
            opt_g.step()
            opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)


def test_a_gan_accumulating_by_hand_is_checked_per_optimizer_and_quiet() -> None:
    check = _check()
    zoo.fit(AccumulatingGAN(), [check], data=zoo.gan_data(), max_steps=4)
    assert check.findings == []
    assert check.steps_checked == 2 and check.last_stats is not None


def test_a_gan_accumulating_by_hand_with_a_hook_is_grad_mismatch() -> None:
    class Hooked(AccumulatingGAN):
        def __init__(self) -> None:
            super().__init__()
            for p in self.generator.parameters():
                p.register_hook(lambda g: 2 * g)

    check = _check()
    zoo.fit(Hooked(), [check], data=zoo.gan_data(), max_steps=2)
    (finding,) = check.findings
    assert finding.code == "grad-mismatch"
    assert all(name.startswith("generator") for name in finding.params)


class ManualAccumGPT2(zoo_real.HFModule):
    """A tiny GPT-2 LM (tied embeddings) trained with accumulation written by hand over padded
    batches with -100 labels: its own loss (a mean over each micro-batch's target tokens)
    divided by the number of micro-batches (planted), or, with ``window_normalized``, the token
    sum over the window's count passed as ``num_items_in_batch`` (the transformers fix)."""

    def __init__(self, window_normalized: bool) -> None:
        super().__init__("gpt2")
        self.automatic_optimization = False
        self.window_normalized = window_normalized

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt = self.optimizers()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if self.window_normalized:
            loss = self.model(**inputs, num_items_in_batch=batch["num_items"][0]).loss
        else:
            loss = self.model(**inputs).loss / 2
        self.manual_backward(loss)
        if (batch_idx + 1) % 2 == 0:
            opt.step()
            opt.zero_grad()


def _gpt2_windows() -> tuple[list[dict[str, Any]], list[int]]:
    """Two padded micro-batches of 4 sequences (one window), each carrying ``num_items``: the
    window's target tokens (labels other than -100 from the second position on)."""
    batches = list(zoo_real.token_loader(batch_size=4, n=8))
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    for b in batches:
        b["num_items"] = torch.full((4,), sum(counts))
    return batches, counts


def test_gpt2_accumulating_by_hand_over_padded_batches() -> None:
    zoo_real.require_transformers()
    batches, counts = _gpt2_windows()
    assert counts[0] != counts[1]
    data = torch.utils.data.DataLoader(batches, batch_size=None)
    torch.manual_seed(0)
    check = _check()
    zoo.fit(ManualAccumGPT2(window_normalized=False), [check], data=data)
    (finding,) = [f for f in check.findings if f.severity != "info"]
    assert finding.code == "accumulation-weighting"
    assert finding.data["counts"] == [float(c) for c in counts]  # counted by hand above
    assert finding.data["ratio"] == pytest.approx(max(counts) / min(counts))
    assert "from the second position on" in finding.message

    def run(audit: bool) -> tuple[dict[str, torch.Tensor], GradientAudit | None]:
        L.seed_everything(0)
        module = ManualAccumGPT2(window_normalized=True)
        callbacks = [GradientAudit(on_finding="log")] if audit else []
        zoo.fit(module, callbacks, data=data)
        return zoo.params_of(module), (callbacks[0] if audit else None)

    plain, _ = run(False)
    audited, audit = run(True)
    assert audit is not None and all(torch.equal(plain[k], audited[k]) for k in plain)
    assert [f for f in audit.findings if f.severity != "info"] == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked == 1 and per_sample.last_stats is not None
    assert per_sample.findings == []


class SharedParamsOptimizers(zoo.MLP):
    """Manual optimization, two optimizers over the same parameters stepping in turn, each on a
    loss computed after the other stepped (Lightning's test_multiple_optimizers_basefinetuning).
    ``clear_between``: each optimizer's ``zero_grad`` right after its step, so the next one
    applies its own loss only; else the second applies both losses' gradients (accumulated)."""

    def __init__(self, clear_between: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.clear_between = clear_between

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            self.manual_backward(F.mse_loss(self.net(x), y))
            opt.step()
            if self.clear_between:
                opt.zero_grad()
        if not self.clear_between:
            for opt in self.optimizers():
                opt.zero_grad()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = list(self.parameters())
        return [torch.optim.SGD(params, lr=0.1), torch.optim.Adam(params, lr=0.01)]


@pytest.mark.parametrize("clear_between", [True, False])
def test_optimizers_sharing_parameters_replay_each_ones_gradient(clear_between: bool) -> None:
    check = _check()
    zoo.fit(SharedParamsOptimizers(clear_between), [check], limit_train_batches=3)
    assert check.steps_checked == 3
    assert [f.message for f in check.findings if f.severity != "info"] == []

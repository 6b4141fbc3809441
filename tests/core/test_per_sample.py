"""Tests for grad_callbacks.core.per_sample against an independent oracle.

The oracle is a plain loop of single-sample ``loss.backward()`` calls on a deep copy of the model,
with each ``.grad`` cloned, and samples cut with ``x[i:i+1]`` (not with ``slice_batch``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grad_callbacks.core.per_sample import (
    PerSampleGradError,
    PerSampleStats,
    batchnorm_eval,
    fit_scale,
    gradient_noise_scale,
    per_sample_grad_stats,
    per_sample_grads,
)

Grads = dict[str, Tensor]


# ---------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


class CNN(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.emb(tokens))).mean(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def ce(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_case(kind: str, n: int = 6, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(seed)
    y = torch.randint(0, 3, (n,))
    if kind == "mlp":
        return MLP(), (torch.randn(n, 6), y)
    if kind == "cnn":
        return CNN(), (torch.randn(n, 1, 8, 8), y)
    if kind == "transformer":
        return TinyTransformer().eval(), (torch.randint(0, 20, (n, 5)), y)
    if kind == "lstm":
        return LSTMNet(), (torch.randn(n, 5, 4), y)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------- oracle
def oracle_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], samples: list
) -> list[Grads]:
    """Per-sample gradients by single-sample backward passes on a deep copy."""
    m = copy.deepcopy(model)
    out = []
    for sample in samples:
        m.zero_grad(set_to_none=True)
        loss_fn(m, sample).backward()
        out.append(
            {
                n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in m.named_parameters()
                if p.requires_grad
            }
        )
    return out


def pair_samples(batch: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
    x, y = batch
    return [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]


def batch_grad(model: nn.Module, batch: tuple[Tensor, Tensor], reduction: str) -> Grads:
    m = copy.deepcopy(model)
    x, y = batch
    F.cross_entropy(m(x), y, reduction=reduction).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def sq_norm(g: Grads) -> float:
    return sum(float(v.double().square().sum()) for v in g.values())


def assert_rel_close(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    a, b = a.double(), b.double()
    err = float(torch.linalg.vector_norm(a - b))
    assert err <= rtol * float(torch.linalg.vector_norm(b)) + atol, (err, float(b.norm()))


def assert_grads_close(a: Grads, b: Grads, rtol: float = 1e-5) -> None:
    """Each parameter within rtol of its own norm, or of the whole gradient's for parameters
    whose gradient is float noise (e.g. a conv bias followed by BatchNorm)."""
    assert a.keys() == b.keys()
    total = math.sqrt(sq_norm(b))
    for k in a:
        assert_rel_close(a[k], b[k], rtol, atol=rtol * 0.1 * total)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for k in ("params", "buffers"):
        assert after[k].keys() == before[k].keys()
        for n in before[k]:
            assert torch.equal(after[k][n], before[k][n]), (k, n)
    assert all(g is None for g in after["grad"].values())
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]


# ------------------------------------------------------------------------------ engine vs oracle
MODELS = ["mlp", "cnn", "transformer", "lstm"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_grads_match_oracle(kind: str, method: str) -> None:
    model, batch = make_case(kind)
    before = snapshot(model)
    got = per_sample_grads(model, ce, batch, method=method)
    assert_untouched(model, before)
    expected = oracle_grads(model, ce, pair_samples(batch))
    for i, exp in enumerate(expected):
        assert_grads_close({k: v[i] for k, v in got.items()}, exp)


@pytest.mark.parametrize("kind", MODELS)
def test_stats_match_oracle_and_batch_gradient(kind: str) -> None:
    model, batch = make_case(kind)
    before = snapshot(model)
    stats = per_sample_grad_stats(model, ce, batch)
    assert_untouched(model, before)
    # The LSTM has no batching rule in torch 2.13 but vmap's per-sample fallback handles it.
    assert stats.method == "vmap" and stats.fallback_reason is None
    expected = oracle_grads(model, ce, pair_samples(batch))
    n = len(expected)
    assert stats.n == n and stats.n_finite == n and not stats.nonfinite.any()
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})
    assert_rel_close(stats.sq_norms, torch.tensor([sq_norm(g) for g in expected]))
    for k in expected[0]:
        assert_rel_close(
            stats.param_sq_norm_sum[k],
            torch.tensor(sum(float(g[k].double().square().sum()) for g in expected)),
        )
    # No coupling between samples: mean per-sample gradient == gradient of the mean loss.
    mean_batch = batch_grad(model, batch, "mean")
    assert_grads_close(stats.mean_grad, mean_batch)
    sum_batch = batch_grad(model, batch, "sum")
    assert_grads_close({k: n * v for k, v in stats.mean_grad.items()}, sum_batch)
    fit = fit_scale(sum_batch, stats.mean_grad)
    assert float(fit.scale) == pytest.approx(n, rel=1e-5)
    assert float(fit.residual) < 1e-5


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_chunking_does_not_change_results(method: str) -> None:
    model, batch = make_case("cnn", n=10)
    small = per_sample_grad_stats(model, ce, batch, chunk_size=3, method=method)
    big = per_sample_grad_stats(model, ce, batch, chunk_size=64, method=method)
    assert_grads_close(small.grad_sum, big.grad_sum, rtol=1e-6)
    assert_rel_close(small.sq_norms, big.sq_norms, rtol=1e-6)
    for k in big.param_sq_norm_sum:
        assert_rel_close(small.param_sq_norm_sum[k], big.param_sq_norm_sum[k], rtol=1e-6)


def test_loop_and_vmap_agree() -> None:
    model, batch = make_case("mlp", n=9)
    v = per_sample_grad_stats(model, ce, batch, method="vmap", chunk_size=4)
    lo = per_sample_grad_stats(model, ce, batch, method="loop", chunk_size=4)
    assert (v.method, lo.method) == ("vmap", "loop")
    assert_grads_close(v.mean_grad, lo.mean_grad)
    assert_rel_close(v.sq_norms, lo.sq_norms)


# ---------------------------------------------------------------------------------- non-finite
class LogNet(nn.Module):
    """log of the input: a negative feature makes that sample's gradient NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.log(x))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_nonfinite_samples_are_flagged_and_excluded(method: str) -> None:
    torch.manual_seed(0)
    model = LogNet()
    x = torch.rand(8, 4) + 0.5
    x[3, 1] = -1.0
    x[6, 0] = -2.0
    y = torch.randint(0, 3, (8,))
    stats = per_sample_grad_stats(model, ce, (x, y), method=method)
    assert stats.nonfinite.tolist() == [i in (3, 6) for i in range(8)]
    assert stats.n_finite == 6 and stats.n == 8
    assert torch.isnan(stats.sq_norms[3]) and torch.isnan(stats.sq_norms[6])
    good = [i for i in range(8) if i not in (3, 6)]
    expected = oracle_grads(model, ce, [(x[i : i + 1], y[i : i + 1]) for i in good])
    mean = {k: sum(g[k] for g in expected) / len(good) for k in expected[0]}
    assert_grads_close(stats.mean_grad, mean)
    assert all(torch.isfinite(v).all() for v in stats.param_sq_norm_sum.values())
    assert_rel_close(stats.sq_norms[good], torch.tensor([sq_norm(g) for g in expected]))


def test_all_samples_nonfinite_gives_nan_mean() -> None:
    model = LogNet()
    x = -torch.ones(3, 4)
    stats = per_sample_grad_stats(model, ce, (x, torch.zeros(3, dtype=torch.long)))
    assert stats.n_finite == 0 and stats.nonfinite.all()
    assert all(torch.isnan(v).all() for v in stats.mean_grad.values())
    assert torch.isnan(gradient_noise_scale(stats))


# ---------------------------------------------------------------------------------- fallback
class ItemNet(MLP):
    """Host-side control flow on a tensor value: vmap cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out * 2 if x.sum().item() > 0 else out


class BranchNet(MLP):
    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if x.sum() > 0:  # data-dependent control flow
            out = -out
        return out


@pytest.mark.parametrize("cls, needle", [(ItemNet, "item"), (BranchNet, "control flow")])
def test_auto_falls_back_to_loop_with_reason(cls: type[nn.Module], needle: str) -> None:
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    before = snapshot(model)
    stats = per_sample_grad_stats(model, ce, (x, y))
    assert_untouched(model, before)
    assert stats.method == "loop"
    assert stats.fallback_reason is not None and stats.fallback_reason.startswith("RuntimeError")
    assert needle in stats.fallback_reason.lower()
    expected = oracle_grads(model, ce, pair_samples((x, y)))
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})
    with pytest.raises(RuntimeError):
        per_sample_grad_stats(model, ce, (x, y), method="vmap")


def test_per_sample_python_values_fall_back_and_reach_loss_fn() -> None:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    names = ["neg", "pos", "neg", "pos"]
    seen: list[Any] = []

    def loss_fn(m: nn.Module, b: dict[str, Any]) -> Tensor:
        seen.append(b["names"])
        sign = 1.0 if b["names"] == ["pos"] else -1.0
        return sign * F.cross_entropy(m(b["x"]), b["y"])

    stats = per_sample_grad_stats(model, loss_fn, {"x": x, "y": y, "names": names, "k": 2})
    assert stats.method == "loop" and "per-sample Python values" in (stats.fallback_reason or "")
    assert seen == [["neg"], ["pos"], ["neg"], ["pos"]]
    signs = [-1.0, 1.0, -1.0, 1.0]
    expected = oracle_grads(model, ce, pair_samples((x, y)))
    total = {k: sum(s * g[k] for s, g in zip(signs, expected, strict=True)) for k in expected[0]}
    assert_grads_close(stats.grad_sum, total)


def test_nested_batch_through_vmap() -> None:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    weights = torch.tensor([1.0, 2.0, 0.5])
    batch = {"inputs": (x, "tag"), "target": {"y": y}, "w": weights, "scale": 3.0}

    def loss_fn(m: nn.Module, b: dict[str, Any]) -> Tensor:
        assert b["inputs"][0].shape == (1, 6) and b["inputs"][1] == "tag"
        assert b["w"].shape == (3,)
        return b["scale"] * F.cross_entropy(m(b["inputs"][0]), b["target"]["y"], weight=b["w"])

    stats = per_sample_grad_stats(model, loss_fn, batch, size=5)
    assert stats.method == "vmap"

    def oracle_loss(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return 3.0 * F.cross_entropy(m(b[0]), b[1], weight=weights)

    expected = oracle_grads(model, oracle_loss, pair_samples((x, y)))
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})


# ---------------------------------------------------------------------------------- non-invasive
class CountingNet(MLP):
    """Writes to a buffer in place on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        return super().forward(x)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_buffers_written_in_forward_are_restored(method: str) -> None:
    model = CountingNet()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    calls = model.calls
    before = snapshot(model)
    stats = per_sample_grad_stats(model, ce, (x, y), method=method)
    assert stats.method == method
    assert_untouched(model, before)
    assert model.calls is calls and int(calls) == 0


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_batchnorm_train_mode_is_left_untouched(method: str) -> None:
    torch.manual_seed(0)
    model = CNN(batchnorm=True).train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    model(x)  # give the running stats non-trivial values
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    assert int(model.bn.num_batches_tracked) == 1
    stats = per_sample_grad_stats(model, ce, (x, y), method=method)
    assert_untouched(model, before)
    assert stats.method == ("loop" if method == "loop" else "vmap")
    # Each sample is normalised by its own statistics, like a train-mode batch of one.
    expected = oracle_grads(model, ce, pair_samples((x, y)))
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})
    assert_rel_close(stats.sq_norms, torch.tensor([sq_norm(g) for g in expected]))


def test_batchnorm1d_train_mode_needs_eval_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).train()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    model(x)
    before = snapshot(model)
    with pytest.raises(PerSampleGradError, match="more than 1 value per channel"):
        per_sample_grad_stats(model, ce, (x, y))
    assert_untouched(model, before)
    stats = per_sample_grad_stats(model, ce, (x, y), eval_batchnorm=True)
    assert_untouched(model, before)
    assert stats.method == "vmap" and model[1].training
    eval_model = copy.deepcopy(model).eval()
    expected = oracle_grads(eval_model, ce, pair_samples((x, y)))
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})


def test_batchnorm_eval_restores_each_flag() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2).eval(), nn.Linear(2, 2))
    with pytest.raises(KeyError), batchnorm_eval(model) as m:
        assert m is model
        assert [mod.training for mod in model] == [False, False, True]
        raise KeyError("boom")
    assert [mod.training for mod in model] == [True, False, True]


def test_frozen_params_grad_and_flags_untouched() -> None:
    torch.manual_seed(0)
    model = MLP()
    model.l1.weight.requires_grad_(False)
    model.l2.bias.grad = None
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = snapshot(model)
    for method in ("vmap", "loop"):
        stats = per_sample_grad_stats(model, ce, (x, y), method=method)
        assert set(stats.grad_sum) == {"l1.bias", "l2.weight", "l2.bias"}
        assert_untouched(model, before)
    expected = oracle_grads(model, ce, pair_samples((x, y)))
    assert_grads_close(stats.grad_sum, {k: sum(g[k] for g in expected) for k in expected[0]})


def test_existing_grads_are_not_modified() -> None:
    model, batch = make_case("mlp")
    ce(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items()}
    for method in ("vmap", "loop"):
        per_sample_grad_stats(model, ce, batch, method=method)
        for n, p in model.named_parameters():
            assert p.grad is grads[n] and torch.equal(p.grad, values[n])


def test_params_subset_keyed_by_given_names() -> None:
    model, batch = make_case("mlp")
    sub = {"head_w": model.l2.weight}
    for method in ("vmap", "loop"):
        stats = per_sample_grad_stats(model, ce, batch, params=sub, method=method)
        assert list(stats.grad_sum) == ["head_w"]
        expected = oracle_grads(model, ce, pair_samples(batch))
        assert_rel_close(stats.grad_sum["head_w"], sum(g["l2.weight"] for g in expected))
    with pytest.raises(ValueError, match="not a parameter"):
        per_sample_grad_stats(model, ce, batch, params={"w": nn.Parameter(torch.ones(2))})


def test_runs_under_no_grad() -> None:
    model, batch = make_case("mlp")
    with torch.no_grad():
        v = per_sample_grad_stats(model, ce, batch, method="vmap")
        lo = per_sample_grad_stats(model, ce, batch, method="loop")
    assert_grads_close(v.grad_sum, lo.grad_sum)


def test_bad_arguments() -> None:
    model, batch = make_case("mlp")
    with pytest.raises(ValueError, match="scalar"):
        per_sample_grad_stats(model, lambda m, b: m(b[0]), batch, method="loop")
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_stats(model, ce, batch, method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grad_stats(model, ce, batch, chunk_size=0)


# ---------------------------------------------------------------------------------- randomness
def test_dropout_randomness_modes() -> None:
    model, batch = make_case("transformer", n=5)
    model.train()
    before = snapshot(model)
    torch.manual_seed(1)
    different = per_sample_grad_stats(model, ce, batch, randomness="different")
    torch.manual_seed(1)
    same = per_sample_grad_stats(model, ce, batch, randomness="same")
    assert (different.method, same.method) == ("vmap", "vmap")
    assert different.n_finite == 5 and same.n_finite == 5
    assert not torch.allclose(different.sq_norms, same.sq_norms)
    err = per_sample_grad_stats(model, ce, batch, randomness="error")
    assert err.method == "loop" and "random" in (err.fallback_reason or "")
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------- analysis
def test_fit_scale_exact_multiple() -> None:
    m = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    fit = fit_scale({k: 3 * v for k, v in m.items()}, m)
    assert float(fit.scale) == pytest.approx(3.0)
    assert float(fit.residual) == pytest.approx(0.0, abs=1e-7)
    assert float(fit.cosine) == pytest.approx(1.0)
    assert all(float(r) == pytest.approx(0.0, abs=1e-7) for r in fit.param_residual.values())


def test_fit_scale_with_orthogonal_part() -> None:
    m = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0]])}
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[2.0]])}
    fit = fit_scale(g, m)
    # <g,m> = 1, <m,m> = 1 -> c = 1; residual (0, 0, 2), ||g|| = sqrt(5)
    assert float(fit.scale) == pytest.approx(1.0)
    assert float(fit.residual) == pytest.approx(2 / math.sqrt(5))
    assert float(fit.param_residual["a"]) == pytest.approx(0.0)
    assert float(fit.param_residual["b"]) == pytest.approx(2 / math.sqrt(5))
    assert float(fit.cosine) == pytest.approx(1 / math.sqrt(5))
    assert float(fit.batch_norm) == pytest.approx(math.sqrt(5))
    assert float(fit.mean_norm) == pytest.approx(1.0)
    with pytest.raises(KeyError):
        fit_scale({"a": g["a"]}, m)


def noise_scale_numpy(per_sample: np.ndarray) -> float:
    g_mean = per_sample.mean(0)
    trace = ((per_sample - g_mean) ** 2).sum() / (per_sample.shape[0] - 1)
    return float(trace / (g_mean**2).sum())


def test_gradient_noise_scale_against_numpy() -> None:
    # Linear map without bias, loss = sum of outputs: the per-sample weight gradient is x_i.
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False)
    x = torch.randn(7, 5, dtype=torch.float64) + 0.3
    model.double()

    def loss_fn(m: nn.Module, b: Tensor) -> Tensor:
        return m(torch.log(b.exp())).sum()  # exp/log: a planted inf gives a NaN gradient

    stats = per_sample_grad_stats(model, loss_fn, x)
    assert float(gradient_noise_scale(stats)) == pytest.approx(noise_scale_numpy(x.numpy()))
    x_bad = x.clone()
    x_bad[2, 0] = float("inf")
    stats = per_sample_grad_stats(model, loss_fn, x_bad)
    assert stats.nonfinite.tolist() == [i == 2 for i in range(7)]
    rest = np.delete(x.numpy(), 2, axis=0)
    assert float(gradient_noise_scale(stats)) == pytest.approx(noise_scale_numpy(rest))
    one = per_sample_grad_stats(model, loss_fn, x[:1])
    assert torch.isnan(gradient_noise_scale(one))


def test_gradient_noise_scale_from_hand_built_stats() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 2, 2))
    flat = np.concatenate([a, b.reshape(6, -1)], axis=1)
    stats = PerSampleStats(
        method="loop",
        fallback_reason=None,
        n=6,
        finite_count=torch.tensor(6),
        grad_sum={"a": torch.tensor(a.sum(0)), "b": torch.tensor(b.sum(0))},
        sq_norms=torch.tensor((flat**2).sum(1)),
        nonfinite=torch.zeros(6, dtype=torch.bool),
        param_sq_norm_sum={"a": torch.tensor((a**2).sum()), "b": torch.tensor((b**2).sum())},
    )
    assert float(gradient_noise_scale(stats)) == pytest.approx(noise_scale_numpy(flat))

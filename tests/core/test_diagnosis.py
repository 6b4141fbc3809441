"""Verdicts of grad_callbacks.core.diagnosis against hand-computed cases."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from grad_callbacks.core.diagnosis import (
    classify_scale,
    coupling_tolerance,
    judge_samples,
    relative_error,
    worst_params,
)


@pytest.mark.parametrize(
    ("scale", "residual", "n", "verdict"),
    [
        (1.0, 1e-7, 16, "mean"),
        (1.004, 1e-7, 16, "mean"),
        (16.0, 1e-7, 16, "sum"),
        (15.9, 1e-7, 16, "sum"),
        (4.0, 1e-7, 16, "scale"),
        (0.5, 1e-7, 16, "scale"),
        (1.0, 0.2, 16, "coupled"),
        (1.0, math.nan, 16, "coupled"),
        (1.0, 1e-7, 1, "mean"),
    ],
)
def test_classify_scale(scale: float, residual: float, n: int, verdict: str) -> None:
    assert classify_scale(scale, residual, n) == verdict


def test_coupling_tolerance_grows_for_low_precision() -> None:
    assert coupling_tolerance(torch.float64) < coupling_tolerance(torch.float32)
    assert coupling_tolerance(torch.float32) < coupling_tolerance(torch.bfloat16)


def _norms(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(values)
    return t.square(), ~torch.isfinite(t)


def test_a_dominating_sample_is_an_outlier() -> None:
    sq, bad = _norms([1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.0, 50.0])
    verdict = judge_samples(sq, bad)
    assert verdict.outliers == (7,) and verdict.nonfinite == ()
    assert verdict.outlier_ratio == pytest.approx(50.0)
    assert verdict.norm_quantiles[2] == pytest.approx(50.0)


def test_near_zero_gradients_do_not_make_a_normal_sample_an_outlier() -> None:
    # Four well-fitted samples pull the median down to 0.1; the largest is 12x the median but
    # only about 2x the root-mean-square of the others: natural spread.
    sq, bad = _norms([0.01, 0.02, 0.05, 0.1, 0.1, 3.0, 4.0, 1.2])
    assert judge_samples(sq, bad).outliers == ()


def test_two_large_samples_share_the_batch_and_neither_is_an_outlier() -> None:
    sq, bad = _norms([1.0] * 8 + [40.0, 40.0])
    assert judge_samples(sq, bad).outliers == ()


def test_too_few_samples_for_outliers() -> None:
    sq, bad = _norms([1.0, 1.0, 1.0, 100.0])
    assert judge_samples(sq, bad).outliers == ()


def test_nonfinite_samples_are_named_and_left_out_of_the_statistics() -> None:
    sq, bad = _norms([1.0, math.nan, 1.0, math.inf, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0])
    verdict = judge_samples(sq, bad)
    assert verdict.nonfinite == (1, 3)
    assert verdict.outliers == (9,)


def test_relative_error_and_worst_params() -> None:
    expected = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    seen = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([9.0])}
    assert float(relative_error(seen, expected)) == pytest.approx(1.0)  # |5| / |(3, 4)|
    assert worst_params({"a": torch.tensor(0.1), "b": torch.tensor(2.0)}, k=1) == [("b", 2.0)]


# ------------------------------------------------------------------ outliers over a long run
def _converging_run(steps: int = 20_000, every: int = 100, batch: int = 32) -> list[Any]:
    """Per-sample squared gradient norms, every ``every`` steps, of a 2-8-2 tanh MLP trained
    with SGD to convergence on two separable Gaussian blobs (cross-entropy).

    NumPy, with the per-sample gradients written out by hand (the gradient of sample i's loss:
    ``d2 = softmax - onehot``, ``d1 = (d2 W2) * (1 - h^2)``; norms over W1, b1, W2, b2), so 20,000
    steps take seconds. The norms are checked against the per-sample engine at step 0.
    """
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.7, (n, 2)) + (2 * y[:, None] - 1) * 2.0
    onehot = np.eye(2)[y]
    w1, b1 = rng.normal(0, 0.7, (8, 2)), np.zeros(8)
    w2, b2 = rng.normal(0, 0.35, (2, 8)), np.zeros(2)
    seen = []
    for step in range(steps):
        idx = rng.integers(0, n, batch)
        xb, tb = x[idx], onehot[idx]
        h = np.tanh(xb @ w1.T + b1)
        z = h @ w2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d2 = p - tb
        d1 = (d2 @ w2) * (1 - h * h)
        if step % every == 0:
            sq = (d2**2).sum(1) * ((h**2).sum(1) + 1) + (d1**2).sum(1) * ((xb**2).sum(1) + 1)
            seen.append((step, torch.from_numpy(sq), (w1, b1, w2, b2, xb, y[idx])))
        w2, b2 = w2 - d2.T @ h / batch, b2 - d2.mean(0)
        w1, b1 = w1 - d1.T @ xb / batch, b1 - d1.mean(0)
    return seen


def test_a_long_run_to_convergence_stays_quiet_and_an_early_corrupted_sample_is_found() -> None:
    from torch.nn import functional as F

    from grad_callbacks.core.diagnosis import RunNormScale
    from grad_callbacks.core.per_sample import per_sample_grad_stats

    seen = _converging_run()
    # The hand-written per-sample norms are those of the engine (at step 0).
    _, sq0, (w1, b1, w2, b2, xb, yb) = seen[0]
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p, v in zip(net.parameters(), (w1, b1, w2, b2), strict=True):
            p.copy_(torch.from_numpy(v))
    net = net.double()
    batch = (torch.from_numpy(xb), torch.from_numpy(yb))
    stats = per_sample_grad_stats(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch)
    torch.testing.assert_close(stats.sq_norms, sq0, rtol=1e-6, atol=1e-12)

    scale = RunNormScale()
    old_rule, new_rule, ratios = [], [], []
    bad = torch.zeros(32, dtype=torch.bool)
    for step, sq, _ in seen:
        if judge_samples(sq, bad).outliers:  # the median alone: what fired at step 1183
            old_rule.append(step)
        verdict = judge_samples(sq, bad, run_scale=scale.value)
        scale.observe(verdict.norm_quantiles[0])
        ratios.append(verdict.outlier_ratio)
        if verdict.outliers:
            new_rule.append(step)
    assert len(old_rule) > 10  # the converged batches do fool a median-only rule
    assert new_rule == []
    assert max(ratios[10:]) < 10  # judged against the run's scale: no astronomic ratio

    # One corrupted sample (its label flipped) among normal ones, early in training (step 200):
    # the others are fitted already, it carries the batch, and its norm is no smaller than what
    # samples had at the start.
    _, _, (w1, b1, w2, b2, xb, yb) = seen[2]
    labels = torch.from_numpy(yb).clone()
    labels[5] = 1 - labels[5]
    with torch.no_grad():
        for p, v in zip(net.parameters(), (w1, b1, w2, b2), strict=True):
            p.copy_(torch.from_numpy(v))
    stats = per_sample_grad_stats(
        net, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (torch.from_numpy(xb), labels)
    )
    early = RunNormScale()
    for _, sq, _ in seen[:2]:
        early.observe(float(sq.sqrt().median()))
    verdict = judge_samples(stats.sq_norms, bad, run_scale=early.value)
    assert verdict.outliers == (5,)
    assert 1 < verdict.outlier_ratio < 10  # over the run's scale, not the fitted batch's median

"""Tests for grad_callbacks.core.per_sample.weights against independent oracles (numpy least
squares, counts written out by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grad_callbacks.core.batch import replace_leaf
from grad_callbacks.core.per_sample.fit import fit_scale
from grad_callbacks.core.per_sample.weights import (
    Weighting,
    batch_weightings,
    count_leaves,
    fit_weights,
    gram_of,
    judge_reduction,
    scaled_leaf,
)


def _grads(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 7, 3, generator=g), "b": torch.randn(n, 11, generator=g)}


def _combine(grads: dict[str, torch.Tensor], w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: torch.einsum("i,i...->...", w, v) for k, v in grads.items()}


def test_free_fit_matches_numpy_least_squares() -> None:
    grads = _grads()
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.randn(v.shape[1:], generator=g) for k, v in grads.items()}
    fit = fit_weights(gram_of(grads, batch))
    a = np.concatenate([v.reshape(5, -1).double().numpy() for v in grads.values()], axis=1).T
    b = np.concatenate([v.reshape(-1).double().numpy() for v in batch.values()])
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    np.testing.assert_allclose(fit.weights.numpy(), w, rtol=1e-8, atol=1e-10)
    res = np.linalg.norm(a @ w - b) / np.linalg.norm(b)
    assert float(fit.residual) == pytest.approx(res, rel=1e-6)
    per_param = torch.stack(list(fit.param_residual.values())).square().sum().sqrt()
    assert float(per_param) == pytest.approx(res, rel=1e-6)


def test_weighted_sum_is_recovered_exactly_and_a_basis_restricts_it() -> None:
    grads = _grads()
    w = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    gram = gram_of(grads, _combine(grads, w))
    fit = fit_weights(gram)
    torch.testing.assert_close(fit.weights.float(), w, rtol=1e-5, atol=1e-6)
    assert float(fit.residual) < 1e-6
    counts = torch.tensor([2.0, 6, 4, 5, 3])  # w = counts / 20
    along = fit_weights(gram, basis=counts)
    assert float(along.residual) < 1e-6
    assert float(along.weights.sum()) == pytest.approx(1.0, rel=1e-6)
    wrong = fit_weights(gram, basis=torch.ones(5))
    assert float(wrong.residual) > 0.05


def test_judge_reduction_keeps_equal_weight_verdicts_and_names_counts() -> None:
    grads = _grads()
    mean = {k: v.mean(0) for k, v in grads.items()}
    labels = torch.full((5, 8), -100)
    for i, c in enumerate([2, 6, 4, 5, 3]):
        labels[i, :c] = 1
    found = [(w, w.basis({"labels": labels}, 5)) for w in batch_weightings({"labels": labels}, 5)]
    summed = {k: 5 * v for k, v in mean.items()}
    r = judge_reduction(fit_scale(summed, mean), gram_of(grads, summed), found, 5, 1e-3)
    assert r.verdict == "sum" and not r.weighted
    token_mean = _combine(grads, torch.tensor([2.0, 6, 4, 5, 3]) / 20)
    r = judge_reduction(fit_scale(token_mean, mean), gram_of(grads, token_mean), found, 5, 1e-3)
    assert r.verdict == "weighted" and r.own_count
    assert r.follows == Weighting(("labels",), "non-ignored") and r.basis == [2, 6, 4, 5, 3]
    g = torch.Generator().manual_seed(3)
    coupled = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in token_mean.items()}
    r = judge_reduction(fit_scale(coupled, mean), gram_of(grads, coupled), found, 5, 1e-3)
    assert r.verdict == "coupled" and r.weighted and r.residual > 0.1


def test_too_few_coordinates_for_a_free_fit_fall_back_to_equal_weights() -> None:
    grads = {"w": torch.randn(6, 3)}  # 3 coordinates, 6 samples: anything would fit
    batch = {"w": torch.randn(3)}
    mean = {"w": grads["w"].mean(0)}
    r = judge_reduction(fit_scale(batch, mean), gram_of(grads, batch), [], 6, 1e-3)
    assert r.verdict == "coupled" and not r.weighted


def test_batch_weightings_of_a_hugging_face_style_batch() -> None:
    labels = torch.tensor([[4, 5, -100, -100], [4, 5, 6, 7]])
    batch = {
        "input_ids": torch.tensor([[4, 5, 0, 0], [4, 5, 6, 7]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        "labels": labels,
        "text": ["a", "b"],
    }
    found = {
        (w.path, w.rule, w.shift): w.basis(batch, 2).tolist() for w in batch_weightings(batch, 2)
    }
    assert found == {
        (("attention_mask",), "mask", False): [2.0, 4.0],
        (("attention_mask",), "mask", True): [1.0, 3.0],
        (("labels",), "non-ignored", False): [2.0, 4.0],
        (("labels",), "non-ignored", True): [1.0, 3.0],
    }
    weights = {
        "x": torch.ones(3, 2),
        "w": torch.tensor([0.5, 1.0, 2.0]),
        "y": torch.tensor([0, 1, 0]),
    }
    rules = {w.rule: w.basis(weights, 3).tolist() for w in batch_weightings(weights, 3)}
    assert rules["weights"] == [0.5, 1.0, 2.0]
    assert rules["class"] == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_count_leaves_and_scaling_them() -> None:
    batch = {
        "x": torch.ones(2, 3),
        "num_items": torch.tensor([40, 40]),
        "n": 7,
        "flag": True,
        "zero": torch.tensor(0.0),
    }
    assert count_leaves(batch, 2) == [("num_items",), ("n",)]
    doubled = scaled_leaf(batch, ("num_items",))
    assert doubled["num_items"].tolist() == [80, 80] and doubled["x"] is batch["x"]
    assert scaled_leaf(batch, ("n",))["n"] == 14
    assert replace_leaf([1, (2, 3)], (1, 0), 9) == [1, (9, 3)]

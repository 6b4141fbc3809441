"""Verdicts of grad_callbacks.core.diagnosis against hand-computed cases."""

from __future__ import annotations

import math

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

"""grad_norms against torch.linalg.vector_norm one tensor at a time, on every path it takes."""

from __future__ import annotations

import pytest
import torch

from grad_callbacks.core.norms import NormCache, grad_norms


def _reference(t: torch.Tensor) -> float:
    values = t.coalesce().values() if t.is_sparse else t
    return float(torch.linalg.vector_norm(values.double()))


@pytest.mark.parametrize("large", [False, True], ids=["foreach", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_norms_match_vector_norm(large: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n = 700_000 if large else 50
    tensors = [
        torch.randn(n, generator=g).to(dtype),
        torch.randn(3, n // 3, generator=g).to(dtype).t(),  # not contiguous
        torch.zeros(5, dtype=dtype),
        torch.empty(0, dtype=dtype),
    ]
    norms = grad_norms(tensors)
    assert all(x.dtype == torch.float32 and x.dim() == 0 for x in norms)
    for t, x in zip(tensors, norms, strict=True):
        assert float(x) == pytest.approx(_reference(t), rel=1e-4), (t.shape, dtype)
    assert float(norms[2]) == 0.0 and float(norms[3]) == 0.0


@pytest.mark.parametrize("large", [False, True], ids=["foreach", "blas"])
def test_nan_and_inf_propagate(large: bool) -> None:
    n = 1 << 20 if large else 8
    nan, inf = torch.zeros(n), torch.zeros(n)
    nan[3], inf[5] = float("nan"), float("-inf")
    a, b = grad_norms([nan, inf])
    assert a.isnan() and b.isinf()


def test_sparse_and_mixed_dtypes() -> None:
    sparse = torch.sparse_coo_tensor([[0, 2]], [3.0, 4.0], (5,))
    dense = torch.tensor([1.0, 2.0], dtype=torch.float16)
    norms = grad_norms([dense, sparse])
    assert [float(x) for x in norms] == pytest.approx([5**0.5, 5.0])


def test_cache_recomputes_when_a_tensor_changes() -> None:
    cache = NormCache()
    t = torch.ones(4)
    assert float(cache.norms([t])[0]) == 2.0
    t.mul_(2)  # the version counter moves
    assert float(cache.norms([t])[0]) == 4.0 and cache.computed == 2

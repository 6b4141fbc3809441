"""Per-tensor fingerprints: against a pure-Python reference of the hash, and the guarantees the
rank comparison relies on (any single-element change is seen; equal tensors agree)."""

from __future__ import annotations

import struct

import pytest
import torch

from grad_callbacks.core.fingerprint import MISSING, fingerprints

M = 0xFFFFFFFF


def _fmix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 13
    x = (x * 0x68E31DA5) & M
    return x ^ (x >> 16)


def _mix_b(x: int) -> int:
    x = (x * 0x2C1B3C6D) & M
    x ^= x >> 15
    return (x * 0x297A2D39) & M


def reference(t: torch.Tensor) -> tuple[int, int]:
    """The fingerprint, element by element in Python integers (the module's documented hash)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    size = t.element_size()
    a = b = 0
    for i in range(t.numel()):
        chunk = raw[i * size : (i + 1) * size]
        position = (i * 0x27D4EB2F) & M
        if size == 8:
            low, high = struct.unpack("<II", chunk)
        else:
            low = high = int.from_bytes(chunk, "little")
        a = (a + _fmix(low ^ position)) & M
        b = (b + _mix_b(high ^ position)) & M
    return a, b


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]


def _sample(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    return torch.randint(0, 200, (n,), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_a_python_reference(dtype: torch.dtype) -> None:
    t = _sample(dtype, 300)
    assert fingerprints([t])[0].tolist() == list(reference(t))


def test_reference_across_chunks_and_pieces() -> None:
    # Small chunks split tensors over several passes and pack several tensors in one.
    tensors = [_sample(torch.float32, n, seed=n) for n in (5, 70, 1, 33)]
    expected = [list(reference(t)) for t in tensors]
    for chunk in (1, 7, 64, 1000, None):
        assert fingerprints(tensors, chunk_elements=chunk).tolist() == expected


def test_equal_tensors_have_equal_fingerprints_whatever_the_layout() -> None:
    x = torch.randn(6, 5)
    rows = fingerprints([x, x.clone(), x.t().contiguous().t(), x.reshape(30), x.view(3, 10)])
    assert (rows == rows[0]).all()
    alone = fingerprints([x])
    with_others = fingerprints([torch.randn(100), x, torch.randn(7).double()])
    assert torch.equal(alone[0], with_others[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_single_bit_of_an_element_changes_it(dtype: torch.dtype) -> None:
    t = _sample(dtype, 40)
    base = fingerprints([t])[0]
    bits = t.element_size() * 8
    ints = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    for position in (0, 17, 39):
        for bit in range(bits):
            changed = ints.clone()
            changed[position] ^= torch.tensor(1, dtype=ints.dtype) << bit
            assert not torch.equal(fingerprints([changed.view(dtype)])[0], base), (position, bit)


def test_signed_zero_and_nan_payloads() -> None:
    zeros = torch.tensor([0.0, 1.0])
    negative = torch.tensor([-0.0, 1.0])
    assert torch.equal(zeros, negative)  # equal as floats
    assert not torch.equal(fingerprints([zeros])[0], fingerprints([negative])[0])
    quiet = torch.tensor([0x7FC00000, 0], dtype=torch.int32).view(torch.float32)
    payload = torch.tensor([0x7FC00001, 0], dtype=torch.int32).view(torch.float32)
    assert quiet[0].isnan() and payload[0].isnan()
    assert not torch.equal(fingerprints([quiet])[0], fingerprints([payload])[0])


def test_any_single_element_change_anywhere() -> None:
    t = torch.randn(257)
    base = fingerprints([t], chunk_elements=64)[0]
    for position in range(t.numel()):
        changed = t.clone()
        changed[position] = torch.nextafter(changed[position], torch.tensor(float("inf")))
        assert not torch.equal(fingerprints([changed], chunk_elements=64)[0], base)


def test_changes_a_float_sum_would_cancel_are_seen() -> None:
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    moved = torch.tensor([1.5, 1.5, 3.0, 4.0])  # same sum, same mean
    swapped = torch.tensor([2.0, 1.0, 3.0, 4.0])  # same multiset
    flipped = torch.tensor([-1.0, -2.0, 3.0, 4.0])  # two sign flips
    rows = fingerprints([t, moved, swapped, flipped])
    assert len({tuple(r) for r in rows.tolist()}) == 4


def test_no_collisions_among_many_random_multi_element_changes() -> None:
    torch.manual_seed(0)
    t = torch.randn(64)
    variants = [t]
    for _ in range(2000):
        v = t.clone()
        idx = torch.randint(0, 64, (torch.randint(2, 5, ()).item(),))
        v[idx] = -v[idx]
        if not torch.equal(v.view(torch.int32), t.view(torch.int32)):
            variants.append(v)
    rows = {tuple(r) for r in fingerprints(variants).tolist()}
    distinct = {tuple(v.view(torch.int32).tolist()) for v in variants}
    assert len(rows) == len(distinct)


def test_missing_empty_complex_and_bool() -> None:
    rows = fingerprints([None, torch.empty(0), torch.ones(3, dtype=torch.bool)])
    assert rows[0].tolist() == [MISSING, MISSING]
    assert rows[1].tolist() == [0, 0]
    assert rows[2].tolist() == list(reference(torch.ones(3, dtype=torch.bool)))
    z = torch.randn(4, dtype=torch.complex64)
    assert fingerprints([z])[0].tolist() == list(reference(torch.view_as_real(z)))
    assert fingerprints([None]).tolist() == [[MISSING, MISSING]]


def test_leaves_the_tensors_alone() -> None:
    x = torch.randn(10, requires_grad=True)
    before = x.detach().clone()
    fingerprints([x, x.detach()[::2]])
    assert torch.equal(x.detach(), before) and x.grad is None


def test_rejects_a_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_elements"):
        fingerprints([torch.ones(2)], chunk_elements=0)

"""Per-tensor fingerprints of the raw bits, computed on the device, to compare tensors across
processes without moving them.

A fingerprint is two 32-bit lanes (an ``int64`` pair, each in ``[0, 2**32)``). Each lane is the
sum, modulo ``2**32``, of a hash of every element's bits mixed with its position in the tensor.
For a given position, the hash of one element is a bijection of its (up to) 32 bits (a xor with
the position or its hash, then xor-shifts and multiplications by odd constants), so:

* tensors with the same shape, dtype and bits have the same fingerprint, whatever the device
  or the other tensors they were fingerprinted with;
* a change of any single element changes the fingerprint, always, not just with high
  probability: the other elements' hashes are unchanged, and that element's hash changes. This
  holds for every bit: ``0.0`` and ``-0.0``, two NaNs with different payloads, the last bit of
  the mantissa. For 8-byte dtypes (float64, int64) the low 32 bits feed one lane and the high
  32 bits the other, so the pair still changes;
* when several elements change, the lanes collide only by chance (about ``2**-64`` for
  unrelated changes), unlike a float sum, where changes cancel.

It is not a cryptographic hash: a change crafted to collide is possible. Fingerprints are only
compared between processes that run the same code, so that does not matter here.

Cost: the tensors are viewed as integers (no float arithmetic) and hashed in chunks of at most
``chunk_elements`` elements, each chunk in about 20 element-wise kernels on int32 words whatever
the number of tensors in it (batched over tensors: one flattened pass, no Python loop over
tensors or elements), then summed in int64. Nothing is read to the host: the result stays on
the device. The tensors are never modified.

Example:
    >>> import torch
    >>> a = torch.tensor([1.0, 2.0, 0.0])
    >>> b = a.clone()
    >>> torch.equal(fingerprints([a])[0], fingerprints([b])[0])
    True
    >>> b[2] = -0.0  # equal as floats, different bits
    >>> torch.equal(fingerprints([a])[0], fingerprints([b])[0])
    False
    >>> fingerprints([a, None]).tolist()[1]  # a missing tensor (no gradient)
    [-1, -1]
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch

#: The fingerprint lanes of ``None`` (a parameter without a gradient): never a real
#: fingerprint's, which are non-negative.
MISSING = -1
#: Elements hashed per pass by default: small enough for the CPU's caches, large enough to keep
#: a GPU busy (32 MiB per int32 temporary, about four of them alive at once).
CHUNK_CPU = 1 << 18
CHUNK_DEVICE = 1 << 23

_MASK = 0xFFFFFFFF
# The hashing runs on int32 and relies on multiplication wrapping around modulo 2**32, as it
# does on every torch backend. Multiplying by an odd constant is then a bijection of 32-bit
# words, and so are x ^ c and x ^ (x >>> k) (a logical shift: torch's >> on int32 is
# arithmetic, so the sign copies are masked off): each step keeps the hash of one element a
# bijection of its bits.
_POSITION = 0x27D4EB2F
#: murmur3's 32-bit finaliser (lane A), and a shorter, different mix (lane B).
_FMIX = ((16, 0x7FEB352D), (13, 0x68E31DA5), (16, 0))
_MIX_B = ((0, 0x2C1B3C6D), (15, 0x297A2D39))
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprints(
    tensors: Sequence[torch.Tensor | None], *, chunk_elements: int | None = None
) -> torch.Tensor:
    """The fingerprint of each tensor, as an ``(n, 2)`` int64 tensor on the tensors' device.

    Args:
        tensors: tensors of any dtype, shape and strides; ``None`` entries get the fingerprint
            ``[MISSING, MISSING]``. Tensors on several devices are fingerprinted where they
            are, and the rows are gathered on the first tensor's device.
        chunk_elements: the most elements hashed in one pass (it bounds the temporary memory:
            about four int32 temporaries of this many elements); default :data:`CHUNK_CPU` on
            the CPU, :data:`CHUNK_DEVICE` elsewhere. It does not change the result.

    Returns:
        Row ``i`` is the fingerprint of ``tensors[i]``: two lanes in ``[0, 2**32)``. Only the
        bits of the elements and their positions in the flattened tensor count: a tensor and
        a reshaped or non-contiguous copy of it have the same fingerprint.

    Example:
        >>> import torch
        >>> x = torch.randn(1000)
        >>> y = x.clone()
        >>> y[123] = float("nan")
        >>> rows = fingerprints([x, y, x.double()])
        >>> rows.shape, torch.equal(rows[0], rows[1])
        (torch.Size([3, 2]), False)
    """
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    present = [t for t in tensors if t is not None]
    device = present[0].device if present else torch.device("cpu")
    out = torch.full((len(tensors), 2), MISSING, dtype=torch.int64, device=device)
    # (element size, device) -> [(row, flat integer view)]
    groups: dict[tuple[int, torch.device], list[tuple[int, torch.Tensor]]] = {}
    for row, t in enumerate(tensors):
        if t is not None:
            flat = _bits(t)
            groups.setdefault((flat.element_size(), flat.device), []).append((row, flat))
    for (_, dev), members in groups.items():
        chunk = chunk_elements or (CHUNK_CPU if dev.type == "cpu" else CHUNK_DEVICE)
        sums = _hash_group([flat for _, flat in members], chunk=chunk)
        rows = _index(tuple(row for row, _ in members), device)
        out.index_copy_(0, rows, sums.to(device))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat integer tensor of the same element size (a view when
    the tensor is contiguous)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.reshape(-1)
    return flat.view(_INT_VIEW[flat.element_size()])


def _hash_group(flats: list[torch.Tensor], *, chunk: int) -> torch.Tensor:
    """``(len(flats), 2)`` lane sums for flat integer tensors of one element size."""
    device = flats[0].device
    wide = flats[0].element_size() == 8
    totals = torch.zeros(len(flats), 2, dtype=torch.int64, device=device)
    for pieces in _chunks(tuple(f.numel() for f in flats), chunk):
        if len(pieces) == 1:
            i, s, k = pieces[0]
            data = flats[i][s : s + k]
        else:
            data = torch.cat([flats[i][s : s + k] for i, s, k in pieces])
        words = _words(data)  # (elements, 2) for 8-byte dtypes, else (elements,)
        position = _positions(pieces, chunk, device)
        if wide:
            a, b = words[:, 0] ^ position, words[:, 1] ^ position
        else:
            b = words ^ position
            a = b.clone()
        del data, words, position
        for lane, (value, rounds) in enumerate(((a, _FMIX), (b, _MIX_B))):
            hashed = _mix(value, rounds)
            # Sums of fewer than 2**31 int32 values, in int64: no overflow. Each piece's sum is
            # the difference of a running sum (a scan, no atomics) at its ends.
            if len(pieces) == 1:
                sums = hashed.sum(dtype=torch.int64).reshape(1)
            else:
                at_end = torch.cumsum(hashed, 0, dtype=torch.int64)[_layout(pieces, device)[1]]
                sums = at_end - torch.cat([at_end.new_zeros(1), at_end[:-1]])
            totals[:, lane].index_add_(0, _layout(pieces, device)[2], sums & _MASK)
    return totals & _MASK


def _mix(x: torch.Tensor, rounds: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """xor-shifts right (logical) and odd multiplications of int32 words, in place."""
    for shift, multiplier in rounds:
        if shift:
            x.bitwise_xor_((x >> shift).bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier:
            x.mul_(multiplier)
    return x


def _words(data: torch.Tensor) -> torch.Tensor:
    """The elements' bits as int32 words: one per element (zero-extended below 4 bytes), or
    the two words of each 8-byte element as the columns of an ``(elements, 2)`` tensor,
    low word first."""
    size = data.element_size()
    if size == 4:
        return data.view(torch.int32)
    if size == 8:
        words = data.view(torch.int32).view(-1, 2)
        return words if sys.byteorder == "little" else words.flip(1)
    return data.to(torch.int32).bitwise_and_((1 << (8 * size)) - 1)


def _positions(
    pieces: tuple[tuple[int, int, int], ...], chunk: int, device: torch.device
) -> torch.Tensor:
    """The hash of each element's position in its tensor: ``position * _POSITION`` modulo
    ``2**32``, from a cached table of a chunk's hashes shifted per piece (it is linear)."""
    size = sum(k for _, _, k in pieces)
    table = _position_table(chunk, device)[:size]
    if len(pieces) == 1:
        start = pieces[0][1]
        return table + _wrap(start * _POSITION) if start else table
    shifts, _, _ = _layout(pieces, device)
    lengths = _lengths(pieces, device)
    return table + torch.repeat_interleave(shifts, lengths, output_size=size)


def _wrap(value: int) -> int:
    """``value`` modulo ``2**32``, as a signed 32-bit int."""
    value &= _MASK
    return value - (1 << 32) if value >= 1 << 31 else value


@functools.lru_cache(maxsize=8)
def _position_table(chunk: int, device: torch.device) -> torch.Tensor:
    return torch.arange(chunk, dtype=torch.int32, device=device).mul_(_POSITION)


@functools.lru_cache(maxsize=64)
def _chunks(numels: tuple[int, ...], chunk: int) -> list[tuple[tuple[int, int, int], ...]]:
    """Pieces ``(tensor, start, length)`` of the flat tensors, in order, packed into chunks of
    at most ``chunk`` elements (a large tensor is split over several chunks)."""
    chunks: list[tuple[tuple[int, int, int], ...]] = []
    current: list[tuple[int, int, int]] = []
    filled = 0
    for i, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(numel - start, chunk - filled)
            current.append((i, start, take))
            start += take
            filled += take
            if filled == chunk:
                chunks.append(tuple(current))
                current, filled = [], 0
    if current:
        chunks.append(tuple(current))
    return chunks


@functools.lru_cache(maxsize=256)
def _layout(
    pieces: tuple[tuple[int, int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per piece of a chunk: what shifts the hash of an element's place in the chunk to that of
    its position in its tensor, the place of the piece's last element, and its tensor.

    Small tensors, cached: the same parameters give the same chunks at every call, and a
    host-to-device copy at every call would cost more than the hashing on a GPU.
    """
    shifts, ends, offset = [], [], 0
    for _, start, length in pieces:
        shifts.append(_wrap((start - offset) * _POSITION))
        offset += length
        ends.append(offset - 1)
    return (
        torch.tensor(shifts, dtype=torch.int32, device=device),
        torch.tensor(ends, dtype=torch.int64, device=device),
        torch.tensor([i for i, _, _ in pieces], dtype=torch.int64, device=device),
    )


@functools.lru_cache(maxsize=256)
def _lengths(pieces: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([k for _, _, k in pieces], dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)

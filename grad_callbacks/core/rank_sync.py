"""Comparing replicas across data-parallel ranks: what each rank sends, and what the gathered
rows say.

Plain torch (``torch.distributed`` only for the one collective). At a checked optimizer step
each rank describes the step's tensors by one row per parameter: the fingerprints
(:mod:`grad_callbacks.core.fingerprint`) of the gradient the optimizer stepped on and of the
parameter after the step, and the two L2 norms (to say how far apart differing tensors are).
The rows, behind a small header, are padded to a capacity every rank agrees on, gathered from
every rank in one ``all_gather``, and compared with rank 0's on the device; one small tensor
comes to the host (:func:`summary`). Only when something differs is the gathered table read
(:func:`compare`), to name the rows, the ranks and the kind of difference.

Nothing here changes a tensor it is given.

Example:
    >>> import torch
    >>> params = [torch.nn.Parameter(torch.ones(3))]
    >>> params[0].grad = torch.full((3,), 0.5)
    >>> rows = step_rows(params)
    >>> mine = pack(rows, layout=7, step=0, capacity=4)
    >>> theirs = mine.clone()
    >>> theirs[HEADER + 2] += 1  # rank 1's parameter differs
    >>> gathered = torch.stack([mine, theirs])
    >>> differs, _ = summary(gathered).tolist()
    >>> bool(differs)
    True
    >>> result = compare(gathered, capacity=4)
    >>> result.rows[0].param_ranks, result.rows[0].grad_ranks
    ((1,), ())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from grad_callbacks.core.fingerprint import MISSING, fingerprints

#: Header entries: the layout hash (parameter names, shapes, dtypes), the number of rows, the
#: optimizer step, and an error flag (the rank could not fingerprint its tensors).
HEADER = 4
#: Columns per row: gradient fingerprint (2 lanes), parameter fingerprint (2 lanes), and the
#: float64 bits of the gradient's and of the parameter's L2 norms.
COLUMNS = 6
_COMPARED = 4
#: Fingerprint lanes of a parameter whose optimizer did not step on this rank at this check.
NOT_STEPPED = -2
#: Rows beyond a rank's own parameters.
PADDING = -3


def next_check(step: int, every_n_steps: int, first_steps: int) -> int:
    """The first scheduled optimizer step at or after ``step``: each of the first
    ``first_steps`` steps, then every multiple of ``every_n_steps``.

    A function of the step count only, so every rank computes the same schedule.

    Example:
        >>> [next_check(s, 16, 2) for s in (0, 1, 2, 16, 17)]
        [0, 1, 16, 16, 32]
    """
    if step < first_steps:
        return step
    return -(-step // every_n_steps) * every_n_steps


def step_rows(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(len(params), COLUMNS)`` int64 rows describing one optimizer step, on the device.

    Call it right after the step: ``.grad`` is then still the gradient the optimizer used (after
    the DDP reduction, AMP unscaling and clipping), and the parameter its updated value. A
    parameter without a gradient gets the fingerprint of ``None``.
    """
    if not params:
        return torch.empty(0, COLUMNS, dtype=torch.int64)
    grads = [p.grad for p in params]
    prints = fingerprints([*grads, *params])
    n = len(params)
    device = prints.device
    norms = torch.zeros(2 * n, dtype=torch.float64, device=device)
    tensors = [*grads, *params]
    floating = [
        i for i, t in enumerate(tensors) if t is not None and t.is_floating_point() and t.numel()
    ]
    if floating:
        values = torch._foreach_norm([tensors[i].detach() for i in floating])
        stacked = torch.stack([v.to(torch.float64) for v in values])
        index = torch.tensor(floating, dtype=torch.int64).to(device, non_blocking=True)
        norms.index_copy_(0, index, stacked.to(device))
    return torch.cat(
        [prints[:n], prints[n:], norms.view(torch.int64).view(2, n).t()], dim=1
    ).contiguous()


def not_stepped_rows(n: int, device: torch.device) -> torch.Tensor:
    """Rows for ``n`` parameters whose optimizer did not step while the check was armed."""
    rows = torch.full((n, COLUMNS), NOT_STEPPED, dtype=torch.int64, device=device)
    rows[:, _COMPARED:] = 0
    return rows


def pack(
    rows: torch.Tensor,
    *,
    layout: int,
    step: int,
    capacity: int,
    error: bool = False,
) -> torch.Tensor:
    """The flat int64 tensor a rank sends: the header, then ``capacity`` rows (padded with
    :data:`PADDING`, or cut: the header keeps the true number of rows)."""
    header = torch.tensor([layout, rows.shape[0], step, int(error)], dtype=torch.int64)
    body = torch.full((capacity, COLUMNS), PADDING, dtype=torch.int64, device=rows.device)
    kept = min(capacity, rows.shape[0])
    body[:kept] = rows[:kept]
    return torch.cat([header.to(rows.device, non_blocking=True), body.reshape(-1)])


def all_gather_rows(mine: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's packed tensor, as ``(world_size, len(mine))``: one ``all_gather`` that every
    rank must enter with a tensor of the same length."""
    out = torch.empty(world_size * mine.numel(), dtype=mine.dtype, device=mine.device)
    gather = getattr(torch.distributed, "all_gather_single", None)
    if gather is None:  # torch < 2.13
        gather = torch.distributed.all_gather_into_tensor
    gather(out, mine)
    return out.view(world_size, -1)


def summary(gathered: torch.Tensor) -> torch.Tensor:
    """Two numbers computed on the device, for one read: whether anything differs from rank 0
    (header or fingerprints; an error flag counts as a difference), and the most rows a rank
    has (to grow the capacity every rank uses)."""
    header = gathered[:, :HEADER]
    rows = gathered[:, HEADER:].view(gathered.shape[0], -1, COLUMNS)[..., :_COMPARED]
    differs = (header[:, :3] != header[:1, :3]).any() | (header[:, 3] != 0).any()
    differs |= (rows != rows[:1]).any()
    return torch.stack([differs.to(torch.int64), header[:, 1].max()])


@dataclass(frozen=True)
class RowDifference:
    """How one parameter's row differs between ranks.

    Attributes:
        index: the row (the parameter's place in the optimizers' parameter lists).
        grad_ranks: ranks whose gradient differs from rank 0's.
        param_ranks: ranks whose parameter after the step differs from rank 0's.
        stepped_ranks: when the optimizer stepped on some ranks only, the ranks where it
            stepped (else empty).
        grad_gap: the largest ``|norm(rank r) - norm(rank 0)|`` of the gradient over the
            differing ranks (a lower bound of the largest distance); 0 when they agree.
        param_gap: the same for the parameter.
    """

    index: int
    grad_ranks: tuple[int, ...]
    param_ranks: tuple[int, ...]
    stepped_ranks: tuple[int, ...] = ()
    grad_gap: float = 0.0
    param_gap: float = 0.0


@dataclass(frozen=True)
class Comparison:
    """What the gathered rows say (see :func:`compare`).

    Attributes:
        error_ranks: ranks that could not describe their step (nothing else is compared).
        layout_ranks: ranks whose parameter list (names, shapes, dtypes, or count) differs from
            rank 0's (rows are then not compared).
        step_ranks: ranks whose optimizer step number differs from rank 0's.
        rows: the differing rows.
        with_grad: the rows whose parameter had a gradient at the step on rank 0.
    """

    error_ranks: tuple[int, ...] = ()
    layout_ranks: tuple[int, ...] = ()
    step_ranks: tuple[int, ...] = ()
    rows: tuple[RowDifference, ...] = field(default_factory=tuple)
    with_grad: frozenset[int] = frozenset()

    @property
    def ranks(self) -> tuple[int, ...]:
        """Every rank that disagrees with rank 0 in some way."""
        found = {*self.layout_ranks, *self.step_ranks}
        for row in self.rows:
            found.update(row.grad_ranks, row.param_ranks)
        return tuple(sorted(found))

    @property
    def max_gap(self) -> float:
        """The largest norm gap over the differing rows (0 when none)."""
        return max((max(r.grad_gap, r.param_gap) for r in self.rows), default=0.0)


def compare(gathered: torch.Tensor, capacity: int) -> Comparison:
    """Read the gathered table (call it only when :func:`summary` says something differs)."""
    table = gathered.cpu()
    header = table[:, :HEADER]
    world = table.shape[0]
    errors = tuple(r for r in range(world) if header[r, 3] != 0)
    if errors:
        return Comparison(error_ranks=errors)
    layout = tuple(r for r in range(1, world) if (header[r, :2] != header[0, :2]).any())
    if layout:
        return Comparison(layout_ranks=layout)
    steps = tuple(r for r in range(1, world) if header[r, 2] != header[0, 2])
    body = table[:, HEADER:].view(world, capacity, COLUMNS)
    n = min(int(header[0, 1]), capacity)
    prints = body[:, :n, :_COMPARED]
    norms = body[:, :n, _COMPARED:].contiguous().view(torch.float64)
    differing = (prints != prints[:1]).any(dim=2).any(dim=0).nonzero().flatten().tolist()
    rows = []
    for i in differing:
        grad = prints[:, i, :2]
        param = prints[:, i, 2:]
        stepped = [r for r in range(world) if grad[r, 0] != NOT_STEPPED]
        grad_ranks = tuple(r for r in range(1, world) if not torch.equal(grad[r], grad[0]))
        param_ranks = tuple(r for r in range(1, world) if not torch.equal(param[r], param[0]))
        rows.append(
            RowDifference(
                index=i,
                grad_ranks=grad_ranks if len(stepped) == world else (),
                param_ranks=param_ranks,
                stepped_ranks=tuple(stepped) if len(stepped) < world else (),
                grad_gap=_gap(norms[:, i, 0], grad_ranks),
                param_gap=_gap(norms[:, i, 1], param_ranks),
            )
        )
    present = ((prints[0, :, 0] != MISSING) & (prints[0, :, 0] != NOT_STEPPED)).nonzero()
    return Comparison(
        step_ranks=steps, rows=tuple(rows), with_grad=frozenset(present.flatten().tolist())
    )


def _gap(norms: torch.Tensor, ranks: Sequence[int]) -> float:
    gaps = [abs(float(norms[r]) - float(norms[0])) for r in ranks]
    finite = [g for g in gaps if math.isfinite(g)]
    return max(finite, default=0.0)

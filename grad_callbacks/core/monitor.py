"""Device-side gradient monitoring: per-module gradient norms, update/weight ratios, histograms.

Pure torch (no Lightning). :func:`observe` looks at one optimizer's parameters just before its
step (gradients before clipping) and returns a :class:`StepObservation` whose tensors stay on the
device: the gradient L2 norm of each group of parameters (a module, or a parameter) and the
total, optionally a histogram of each group's gradient values, and a copy of the parameters.
After the optimizer step, :meth:`StepObservation.finish` measures how far the parameters moved
and packs everything into one tensor; reading that tensor is the caller's single host transfer,
and :meth:`StepObservation.decode` turns it into numbers on the host.

Nothing here writes to ``.grad`` or to a parameter: gradients and parameters are only read.

Histograms are binned on the device (no host synchronisation, fixed shapes): the range is the
[min, max] of the finite values, ``bins`` equal-width buckets as ``torch.histc`` would make them
(the maximum falls in the last bucket), and NaN/Inf values are counted apart and left out.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> obs = observe(list(model.named_parameters()), histogram_bins=4)
    >>> obs.labels
    ('0', '1')
    >>> with torch.no_grad():
    ...     for p in model.parameters():
    ...         _ = p.mul_(1.5)
    >>> result = obs.decode(obs.finish())
    >>> round(result.update_ratios["0"], 3), round(result.update_ratios["1"], 3)
    (0.5, 0.5)
    >>> result.histograms["1"].num
    3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from grad_callbacks.core.norms import NormFn, grad_norms

# Fields of a histogram row before the bucket counts.
_NUM, _NONFINITE, _MIN, _MAX, _SUM, _SUMSQ = range(6)
_HEAD = 6


def group_label(name: str, per_parameter: bool = False) -> str:
    """The group a parameter belongs to: its module (the name without its last component), or
    the parameter itself when ``per_parameter`` or when it sits on the root module.

    Example:
        >>> group_label("net.0.weight"), group_label("scale"), group_label("net.0.bias", True)
        ('net.0', 'scale', 'net.0.bias')
    """
    if per_parameter or "." not in name:
        return name
    return name.rsplit(".", 1)[0]


def _group_norms(norms: list[Tensor], index: Tensor, n_groups: int) -> Tensor:
    """Per-group L2 norms from per-tensor norms, then the total: ``n_groups + 1`` values."""
    squares = torch.stack(norms).square()
    grouped = torch.zeros(n_groups, dtype=squares.dtype, device=squares.device)
    grouped.index_add_(0, index, squares)
    return torch.cat([grouped, squares.sum().reshape(1)]).sqrt()


def histogram_row(tensors: Sequence[Tensor], bins: int) -> Tensor:
    """A histogram of the values of ``tensors`` together, on their device, as one row.

    The row holds ``num`` (finite values), the count of NaN/Inf values, ``min``, ``max``,
    ``sum`` and ``sum of squares`` of the finite values, then ``bins`` bucket counts over
    [min, max] in equal widths (the maximum falls in the last bucket, as with ``torch.histc``).
    Computed without host synchronisation; in float64 where the device has it (exact counts).

    Example:
        >>> row = histogram_row([torch.tensor([0.0, 1.0, float("nan"), 4.0])], bins=2)
        >>> row.tolist()
        [3.0, 1.0, 0.0, 4.0, 5.0, 17.0, 2.0, 1.0]
    """
    device = tensors[0].device
    wide = torch.float32 if device.type == "mps" else torch.float64
    values = torch.cat([t.detach().reshape(-1) for t in tensors]).to(torch.float32)
    finite = torch.isfinite(values)
    inf = torch.tensor(math.inf, device=device)
    lo = torch.where(finite, values, inf).amin()
    hi = torch.where(finite, values, -inf).amax()
    safe = torch.where(finite, values, torch.zeros((), device=device))
    width = hi - lo
    scale = torch.where(width > 0, bins / torch.where(width > 0, width, 1.0), 0.0)
    start = torch.where(torch.isfinite(lo), lo, 0.0)
    index = ((safe - start) * scale).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.int64, device=device)
    counts.index_add_(0, index, finite.long())
    num = finite.sum()
    head = torch.stack(
        [
            num.to(wide),
            (values.numel() - num).to(wide),
            lo.to(wide),
            hi.to(wide),
            safe.to(wide).sum(),
            safe.to(wide).square().sum(),
        ]
    )
    return torch.cat([head, counts.to(wide)])


@dataclass(frozen=True)
class Histogram:
    """A histogram in the form ``SummaryWriter.add_histogram_raw`` takes (bucket right edges)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]
    nonfinite: int


def decode_histogram(row: Tensor, bins: int) -> Histogram | None:
    """A :class:`Histogram` from a host row of :func:`histogram_row`; None when it has no
    finite value (nothing to draw; the NaN/Inf count is in the row)."""
    values = row.tolist()
    num = int(values[_NUM])
    if num == 0:
        return None
    lo, hi = values[_MIN], values[_MAX]
    limits = [lo + (hi - lo) * (k + 1) / bins for k in range(bins)]
    limits[-1] = hi
    return Histogram(
        min=lo,
        max=hi,
        num=num,
        sum=values[_SUM],
        sum_squares=values[_SUMSQ],
        bucket_limits=limits,
        bucket_counts=values[_HEAD : _HEAD + bins],
        nonfinite=int(values[_NONFINITE]),
    )


@dataclass
class MonitorResult:
    """What one observed optimizer step showed, on the host.

    Attributes:
        grad_norms: group label -> gradient L2 norm (groups with a gradient only).
        total_norm: the L2 norm of all the optimizer's gradients together.
        update_ratios: group label -> ||p_after - p_before|| / ||p_before|` (groups whose
            parameters were not all zero before the step).
        histograms: group label -> histogram (groups with a finite gradient value).
        nonfinite: group label -> NaN/Inf gradient values (only those with some; only when
            histograms were computed).
    """

    grad_norms: dict[str, float] = field(default_factory=dict)
    total_norm: float = 0.0
    update_ratios: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


class StepObservation:
    """One optimizer's gradients at a step, and a copy of its parameters, on the device.

    Made by :func:`observe`. Call :meth:`finish` after the optimizer step, read its tensor on
    the host, and pass it to :meth:`decode`. :meth:`release` frees the copies early.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        per_parameter: bool,
        histogram_bins: int | None,
        norm_fn: NormFn = grad_norms,
    ) -> None:
        self.params = [p for _, p in named]
        labels = [group_label(n, per_parameter) for n, _ in named]
        self.labels: tuple[str, ...] = tuple(dict.fromkeys(labels))
        position = {label: i for i, label in enumerate(self.labels)}
        self._index = [position[label] for label in labels]
        self.bins = histogram_bins
        self.device = self.params[0].device if self.params else torch.device("cpu")
        with torch.no_grad():
            present = [
                i for i, p in enumerate(self.params) if p.grad is not None and p.grad.numel()
            ]
            grads = [self.params[i].grad for i in present]
            self.grad_labels = tuple(dict.fromkeys(self.labels[self._index[i]] for i in present))
            gpos = {label: i for i, label in enumerate(self.grad_labels)}
            self._grad_norms: Tensor | None = None
            if grads:
                index = torch.tensor(
                    [gpos[self.labels[self._index[i]]] for i in present], device=self.device
                )
                norms = [n.to(self.device) for n in norm_fn(grads)]  # type: ignore[arg-type]
                self._grad_norms = _group_norms(norms, index, len(self.grad_labels))
            self._hist: list[Tensor] = []
            if histogram_bins is not None:
                for label in self.grad_labels:
                    members = [
                        g
                        for i, g in zip(present, grads, strict=True)
                        if self.labels[self._index[i]] == label
                    ]
                    self._hist.append(histogram_row(members, histogram_bins))  # type: ignore[arg-type]
            # The parameters before the step: copies, and the norms of each group.
            self._before: list[Tensor] | None = [p.detach().clone() for p in self.params]
            self._group_index = torch.tensor(self._index, device=self.device, dtype=torch.long)
            self._before_norms = (
                _group_norms(grad_norms(self._before), self._group_index, len(self.labels))
                if self.params
                else None
            )

    def finish(self) -> Tensor:
        """After the optimizer step: measure the update, free the copies, and return every
        number of this observation in one device tensor (read it with one host transfer)."""
        parts: list[Tensor] = []
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        if self._grad_norms is not None:
            parts.append(self._grad_norms.to(wide))
        if self._before is not None and self._before_norms is not None:
            with torch.no_grad():
                after = [p.detach() for p in self.params]
                torch._foreach_sub_(self._before, after)  # before - after, in the copies
                deltas = _group_norms(grad_norms(self._before), self._group_index, len(self.labels))
            parts += [self._before_norms.to(wide), deltas.to(wide)]
        parts += [h.to(self.device) for h in self._hist]
        self.release()
        if not parts:
            return torch.zeros(0, dtype=wide, device=self.device)
        return torch.cat(parts)

    def release(self) -> None:
        """Free the parameter copies and histogram rows (idempotent)."""
        self._before = None
        self._hist = []

    def decode(self, host: Tensor) -> MonitorResult:
        """The numbers of :meth:`finish`'s tensor, read on the host."""
        values = host.double().cpu()
        result = MonitorResult()
        offset = 0
        if self._grad_norms is not None:
            n = len(self.grad_labels)
            norms = values[offset : offset + n + 1].tolist()
            offset += n + 1
            result.grad_norms = dict(zip(self.grad_labels, norms[:n], strict=True))
            result.total_norm = norms[n]
        if self._before_norms is not None:
            n = len(self.labels)
            before = values[offset : offset + n + 1].tolist()
            delta = values[offset + n + 1 : offset + 2 * n + 2].tolist()
            offset += 2 * n + 2
            for label, b, d in zip(self.labels, before[:n], delta[:n], strict=True):
                if b > 0 and math.isfinite(b):
                    result.update_ratios[label] = d / b
        if self.bins is not None and self._grad_norms is not None:
            width = _HEAD + self.bins
            for label in self.grad_labels:
                row = values[offset : offset + width]
                offset += width
                nonfinite = int(row[_NONFINITE])
                if nonfinite:
                    result.nonfinite[label] = nonfinite
                hist = decode_histogram(row, self.bins)
                if hist is not None:
                    result.histograms[label] = hist
        return result


def observe(
    named: Sequence[tuple[str, Tensor]],
    *,
    per_parameter: bool = False,
    histogram_bins: int | None = None,
    norm_fn: NormFn = grad_norms,
) -> StepObservation:
    """Observe one optimizer's parameters before its step (device operations only).

    Args:
        named: ``(name, parameter)`` pairs, the optimizer's parameters.
        per_parameter: one group per parameter instead of per module.
        histogram_bins: bin each group's gradient values into this many buckets; None for no
            histograms.
        norm_fn: per-tensor gradient L2 norms (``NormCache.norms`` shares them with other
            checks).
    """
    return StepObservation(named, per_parameter, histogram_bins, norm_fn)

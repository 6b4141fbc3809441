"""Where per-sample gradient chunks go: streaming statistics, or every gradient materialised."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass
class PerSampleStats:
    """Streaming statistics of the per-sample gradients of one batch.

    Every tensor stays on the module's device; reading :attr:`n_finite` synchronises with it.

    Attributes:
        method: how the gradients were computed, ``"vmap"`` or ``"loop"``.
        fallback_reason: why ``"auto"`` fell back to the loop (``"ExcType: first line"``), or
            None.
        n: number of samples in the batch.
        finite_count: 0-dim integer tensor, the number of samples whose gradient is finite.
        grad_sum: per parameter, the sum of the finite samples' gradients (accumulated in at least
            float32).
        sq_norms: ``[n]``, each sample's squared gradient norm over all parameters (NaN or inf for
            non-finite samples).
        nonfinite: ``[n]`` bool, whether a sample's gradient holds a NaN or inf.
        param_sq_norm_sum: per parameter, the sum over finite samples of ``||g_i[p]||^2``.
        grads: with ``keep_grads=True``, per parameter every sample's gradient flattened,
            ``[n, numel]`` in the parameter's dtype (for :mod:`~.weights`); else None.
    """

    method: str
    fallback_reason: str | None
    n: int
    finite_count: Tensor
    grad_sum: dict[str, Tensor]
    sq_norms: Tensor
    nonfinite: Tensor
    param_sq_norm_sum: dict[str, Tensor]
    grads: dict[str, Tensor] | None = None

    @property
    def n_finite(self) -> int:
        """Number of samples with a finite gradient (one host-device synchronisation)."""
        return int(self.finite_count)

    @property
    def mean_grad(self) -> dict[str, Tensor]:
        """Per parameter, the mean gradient over the finite samples (NaN if there are none)."""
        return {k: v / self.finite_count for k, v in self.grad_sum.items()}



class _StatsSink:
    def __init__(self, params: dict[str, Tensor], n: int, keep_grads: bool = False) -> None:
        self.n = n
        # Kept for the weighted fit, which needs every pair of samples (see weights.py).
        self.kept: dict[str, list[Tensor]] | None = {k: [] for k in params} if keep_grads else None
        dtypes = [_acc_dtype(p.dtype) for p in params.values()]
        dtype = dtypes[0]
        for d in dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        device = next(iter(params.values())).device
        self.shapes = {k: p.shape for k, p in params.items()}
        # Row 1 accumulates the finite samples' gradients and row 0 the others (discarded): one
        # index_add_ pass, where a masked sum would first copy every per-sample gradient.
        self.sums = {
            k: torch.zeros(2, p.numel(), dtype=_acc_dtype(p.dtype), device=p.device)
            for k, p in params.items()
        }
        self.param_sq = {k: torch.zeros((), dtype=dtype, device=device) for k in params}
        self.sq_norms = torch.zeros(n, dtype=dtype, device=device)
        self.nonfinite = torch.zeros(n, dtype=torch.bool, device=device)

    def add(self, start: int, grads: dict[str, Tensor]) -> None:
        c = next(iter(grads.values())).shape[0]
        dtype = self.sq_norms.dtype
        flats = {k: g.reshape(c, -1) for k, g in grads.items()}
        total = torch.zeros(c, dtype=dtype, device=self.sq_norms.device)
        bad = torch.zeros(c, dtype=torch.bool, device=self.sq_norms.device)
        sq: dict[str, Tensor] = {}
        for k, f in flats.items():
            sq[k] = torch.linalg.vector_norm(f, dim=1, dtype=dtype).square()
            total += sq[k]
            # A row holding a NaN or inf has a NaN or inf sum (cheaper than isfinite().all()).
            bad |= ~torch.isfinite(f.sum(1, dtype=dtype))
        ok = ~bad
        slot = ok.long()
        for k, f in flats.items():
            self.sums[k].index_add_(0, slot, f.to(self.sums[k].dtype))
            self.param_sq[k] += torch.where(ok, sq[k], 0).sum()
        self.sq_norms[start : start + c] = total
        self.nonfinite[start : start + c] = bad
        if self.kept is not None:
            for k, f in flats.items():
                self.kept[k].append(f)

    def result(self, method: str, reason: str | None) -> PerSampleStats:
        return PerSampleStats(
            method=method,
            fallback_reason=reason,
            n=self.n,
            finite_count=self.n - self.nonfinite.sum(),
            grad_sum={k: s[1].reshape(self.shapes[k]).clone() for k, s in self.sums.items()},
            sq_norms=self.sq_norms,
            nonfinite=self.nonfinite,
            param_sq_norm_sum=self.param_sq,
            grads=None if self.kept is None else {k: torch.cat(v) for k, v in self.kept.items()},
        )


class _GradsSink:
    def __init__(self, params: dict[str, Tensor], n: int) -> None:
        self.grads = {k: p.new_zeros((n, *p.shape)) for k, p in params.items()}

    def add(self, start: int, grads: dict[str, Tensor]) -> None:
        for k, g in grads.items():
            self.grads[k][start : start + g.shape[0]] = g

    def result(self, method: str, reason: str | None) -> dict[str, Tensor]:
        return self.grads

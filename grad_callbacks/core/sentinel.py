"""Always-on sentinels: next to free signs that something went wrong, to open an exact look.

Pure torch (no Lightning). Watch windows (:class:`~grad_callbacks.core.budget.WatchWindows`)
keep the exact per-step checks cheap by watching some batches only; the sentinels here run at
every batch at a cost of a few host operations, so that a bug that starts between two windows
is noticed within a few steps and a window can be opened at once.

* :class:`FiniteSentinel`: whether the losses and the gradients stayed finite, and the first
  step and batch where they did not. Losses are kept as references to their (detached) scalar
  tensors, with no device work at all; every ``every`` optimizer steps the gradients of the
  stepping optimizer are reduced once on the device, the losses since the last look are stacked,
  and one small tensor of flags goes to the host (without waiting on CUDA: see
  :class:`~grad_callbacks.core.grad_stats.HostCopy`).
* :class:`ClearSentinel`: whether an optimizer steps on a gradient tensor it already stepped on,
  read from the identity of one parameter's ``.grad`` per optimizer (host only). An optimizer
  whose gradients are set to None by ``zero_grad()`` (the default) gets new gradient tensors at
  every step; the same tensor again means ``zero_grad`` was not called, or not for that
  parameter, or the gradients are cleared in place (``set_to_none=False``: the sentinel cannot
  tell, and a look costs one window).

Example:
    >>> import torch
    >>> sentinel = FiniteSentinel(every=2)
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> for step in range(4):
    ...     loss = (w * (float("nan") if step >= 2 else 1.0)).sum()
    ...     w.grad = None
    ...     loss.backward()
    ...     sentinel.add_loss(loss, step, batch_idx=step)
    ...     if sentinel.due():
    ...         sentinel.check([w.grad], step, batch_idx=step)
    >>> sentinel.poll()
    NonFinite(step=2, batch_idx=2, source='loss')
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from grad_callbacks.core.grad_stats import HostCopy


@dataclass(frozen=True)
class NonFinite:
    """Where a sentinel first saw a NaN/Inf: the optimizer step, the batch, and in what
    (``"loss"`` or ``"gradients"``)."""

    step: int
    batch_idx: int
    source: str


class FiniteSentinel:
    """Notices a non-finite loss or gradient within ``every`` optimizer steps.

    Args:
        every: look (one device reduction, one small transfer) every this many optimizer steps.
    """

    def __init__(self, every: int = 5) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._losses: list[Tensor] = []
        self._where: list[tuple[int, int]] = []  # (step, batch_idx) per loss kept
        self._steps = 0
        self._reads: list[tuple[HostCopy, list[tuple[int, int]], tuple[int, int]]] = []
        #: The first non-finite value seen (None while everything is finite).
        self.found: NonFinite | None = None
        #: Looks taken (for tests and the report).
        self.looks = 0

    def add_loss(self, loss: Tensor, step: int, batch_idx: int) -> None:
        """Keep ``loss`` (a scalar about to be backpropagated) for the next look; no device work."""
        if self.found is None and isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())  # shaped () at the look
            self._where.append((step, batch_idx))

    def due(self) -> bool:
        """Call once per optimizer step: whether this step is one to look at."""
        self._steps += 1
        return self.found is None and self._steps % self.every == 0

    @torch.no_grad()
    def check(
        self,
        grads: Sequence[Tensor],
        step: int,
        batch_idx: int,
        norms: Sequence[Tensor] | None = None,
    ) -> None:
        """Look: the losses kept since the last look and ``grads`` (the gradients of this step)
        are tested on the device and the flags start their way to the host (see :meth:`poll`).

        ``norms``, when given, are the gradients' norms already computed (one pass shared with
        other checks); NaN/Inf in a gradient makes its norm non-finite.
        """
        # One vector of the losses then the gradient norms, tested at once (two device
        # operations where every value is a 0-d tensor on one device, as usual).
        values: list[Tensor] = list(self._losses)
        if grads:
            if norms is None:
                norms = torch._foreach_norm([g.detach() for g in grads])
            values.extend(norms)
        if values:
            try:  # 0-d tensors on one device, as usual (mixed dtypes are promoted)
                stacked = torch.stack(values)
            except RuntimeError:  # a loss of shape (1,), or values on several devices
                device = values[0].device
                stacked = torch.stack([v.reshape(()).to(device, torch.float32) for v in values])
            where = list(self._where)
            self._reads.append((HostCopy(torch.isfinite(stacked)), where, (step, batch_idx)))
            self.looks += 1
        self._losses.clear()
        self._where.clear()

    def poll(self, wait: bool = False) -> NonFinite | None:
        """The first non-finite value among the looks whose flags have landed (in order;
        waits for them if ``wait``); None while all is finite."""
        while self.found is None and self._reads and (wait or self._reads[0][0].ready()):
            copy, where, at = self._reads.pop(0)
            flags = copy.result().tolist()  # the losses', then the gradient norms'
            for ok, (step, batch_idx) in zip(flags, where, strict=False):
                if not ok:
                    self.found = NonFinite(step, batch_idx, "loss")
                    break
            else:
                if not all(flags[len(where) :]):
                    self.found = NonFinite(at[0], at[1], "gradients")
        if self.found is not None:
            self._reads.clear()
        return self.found


class ClearSentinel:
    """Notices an optimizer stepping on a gradient tensor it already stepped on (host only).

    Args:
        optimizers: the optimizers to follow; one parameter of each (its first with a
            gradient at a step) is looked at.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self._optimizers = list(optimizers)
        self._seen: list[weakref.ref[Tensor] | None] = [None] * len(self._optimizers)
        # Per optimizer, the parameter looked at last time (looked at first next time).
        self._param: list[Tensor | None] = [None] * len(self._optimizers)

    def reset(self) -> None:
        """Forget what was seen (the exact check watched in between)."""
        self._seen = [None] * len(self._optimizers)
        self._param = [None] * len(self._optimizers)  # the optimizers' groups may have changed

    def step(self, index: int) -> bool:
        """Call at each step of optimizer ``index``: True when it steps on the same gradient
        tensor as at its previous step."""
        param = self._param[index]
        grad = param.grad if param is not None else None
        if grad is None:
            for group in self._optimizers[index].param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grad, self._param[index] = p.grad, p
                        break
                if grad is not None:
                    break
        seen = self._seen[index]
        again = grad is not None and seen is not None and seen() is grad
        self._seen[index] = weakref.ref(grad) if grad is not None else None
        return again

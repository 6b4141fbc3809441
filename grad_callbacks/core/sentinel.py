"""Always-on sentinels: next to free signs that something went wrong, to open an exact look.

Pure torch (no Lightning). Watch windows (:class:`~grad_callbacks.core.budget.WatchWindows`)
keep the exact per-step checks cheap by watching some batches only; the sentinels here run at
every batch at a cost of a few host operations, so that a bug that starts between two windows
is noticed within a few steps and a window can be opened at once.

* :class:`FiniteSentinel`: whether the losses and the gradients stayed finite, and the first
  step and batch where they did not; and which parameters had no gradient (None, or all zeros)
  at its latest look. Losses are kept as references to their (detached) scalar tensors, with no
  device work at all; every ``every`` optimizer steps the gradients of the stepping optimizer
  are reduced to their norms on the device (one ``torch._foreach_norm``), stacked with the
  losses since the last look, and that one small tensor goes to the host (without waiting on
  CUDA: see :class:`~grad_callbacks.core.grad_stats.HostCopy`), where a sum tells finite from
  not and a membership test finds the zeros.
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
    ...         sentinel.check([w], step, batch_idx=step)
    >>> sentinel.poll()
    NonFinite(step=2, batch_idx=2, source='loss')
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from grad_callbacks.core.grad_stats import HostCopy
from grad_callbacks.core.norms import grad_norms


@dataclass(frozen=True)
class NonFinite:
    """Where a sentinel first saw a NaN/Inf: the optimizer step, the batch, and in what
    (``"loss"`` or ``"gradients"``)."""

    step: int
    batch_idx: int
    source: str


@dataclass(frozen=True)
class WithoutGrad:
    """The parameters (by ``id``) a look found without a gradient (None, or all zeros), and the
    optimizer step and batch of that look."""

    step: int
    batch_idx: int
    params: frozenset[int]


@dataclass
class _Look:
    copy: HostCopy | None  # the losses' values, then the gradient norms
    where: list[tuple[int, int]]  # (step, batch_idx) per loss
    at: tuple[int, int]  # the look's step and batch_idx
    present: list[int]  # ids of the parameters whose norms follow the losses
    absent: list[int]  # ids of the parameters whose .grad was None


class FiniteSentinel:
    """Notices a non-finite loss or gradient within ``every`` optimizer steps, and parameters
    without a gradient at its looks.

    Args:
        every: look (one device reduction, one small transfer) every this many optimizer steps.
        count_nonfinite: False where NaN/Inf values are expected and handled elsewhere (a
            GradScaler skips those steps): the looks then only find parameters without a
            gradient.
    """

    def __init__(self, every: int = 5, count_nonfinite: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.count_nonfinite = count_nonfinite
        self._losses: list[Tensor] = []
        self._where: list[tuple[int, int]] = []  # (step, batch_idx) per loss kept
        self._steps = 0
        self._looked_at: dict[int, int] = {}  # per optimizer, the step count at its last look
        self._reads: list[_Look] = []
        #: The first non-finite value seen (None while everything is finite).
        self.found: NonFinite | None = None
        #: What the latest look that landed found without a gradient (None before any look,
        #: and where it found every parameter with one).
        self.without_grad: WithoutGrad | None = None
        #: Looks taken (for tests and the report).
        self.looks = 0

    def add_loss(self, loss: Tensor, step: int, batch_idx: int) -> None:
        """Keep ``loss`` (a scalar about to be backpropagated) for the next look; no device work."""
        if self.count_nonfinite and self.found is None and isinstance(loss, Tensor):
            if loss.numel() == 1:  # shaped () at the look
                self._losses.append(loss.detach() if loss.requires_grad else loss)
                self._where.append((step, batch_idx))

    def add_detached_loss(self, loss: Tensor, step: int, batch_idx: int) -> None:
        """:meth:`add_loss` for a scalar that holds no graph (Lightning's copy of the loss)."""
        if self.count_nonfinite and self.found is None:
            self._losses.append(loss)
            self._where.append((step, batch_idx))

    def due(self, optimizer: int = 0) -> bool:
        """Call once per optimizer step, with the stepping optimizer's index: whether this step
        is one to look at. Each optimizer is looked at once ``every`` optimizer steps (of all
        optimizers: several optimizers stepping in turn are each looked at as often)."""
        self._steps += 1
        if self.found is not None:
            return False
        last = self._looked_at.get(optimizer, 0)
        if self._steps - last < self.every:
            return False
        self._looked_at[optimizer] = self._steps
        return True

    def check(
        self,
        params: Sequence[Tensor],
        step: int,
        batch_idx: int,
        norm_fn: Callable[[Sequence[Tensor]], Sequence[Tensor]] | None = None,
    ) -> None:
        """Look: the losses kept since the last look and the gradients of ``params`` (the
        stepping optimizer's; those that do not require a gradient now are left out) are
        reduced on the device and start their way to the host (see :meth:`poll`).

        ``norm_fn`` gives the gradients' L2 norms (default :func:`~grad_callbacks.core.norms.
        grad_norms`; a :class:`~grad_callbacks.core.norms.NormCache` shares one pass with other
        checks); NaN/Inf in a gradient makes its norm non-finite, and only a gradient of zeros
        has norm 0.
        """
        grads: list[Tensor] = []
        present: list[int] = []
        absent: list[int] = []
        for p in params:
            if not p.requires_grad:  # frozen, or switched off by toggle_optimizer
                continue
            grad = p.grad
            if grad is None:
                absent.append(id(p))
            elif grad.numel():
                # A gradient built with create_graph=True has a graph of its own: not kept.
                grads.append(grad.detach() if grad.requires_grad else grad)
                present.append(id(p))
        values: list[Tensor] = list(self._losses)
        if grads:
            values.extend((norm_fn or grad_norms)(grads))
        copy = None
        if values:
            try:  # 0-d tensors on one device, as usual (mixed dtypes are promoted)
                stacked = torch.stack(values)
            except RuntimeError:  # a loss of shape (1,), or values on several devices
                device = values[0].device
                stacked = torch.stack([v.reshape(()).to(device, torch.float32) for v in values])
            copy = HostCopy(stacked)
        self._reads.append(_Look(copy, list(self._where), (step, batch_idx), present, absent))
        self.looks += 1
        self._losses.clear()
        self._where.clear()

    def poll(self, wait: bool = False) -> NonFinite | None:
        """The first non-finite value among the looks whose values have landed (in order;
        waits for them if ``wait``); None while all is finite. Updates :attr:`without_grad`."""
        reads = self._reads
        while self.found is None and reads:
            look = reads[0]
            if look.copy is not None and not (wait or look.copy.ready()):
                break
            reads.pop(0)
            values: list[float] = look.copy.result().tolist() if look.copy is not None else []
            n = len(look.where)
            norms = values[n:]
            if self.count_nonfinite and not math.isfinite(sum(values)):
                self.found = self._first_nonfinite(values, look)
                break
            if look.absent or 0.0 in norms:
                zero = [i for i, v in zip(look.present, norms, strict=True) if v == 0.0]
                params = frozenset(look.absent + zero)
                self.without_grad = WithoutGrad(look.at[0], look.at[1], params)
            else:
                self.without_grad = None
        if self.found is not None:
            reads.clear()
        return self.found

    @staticmethod
    def _first_nonfinite(values: list[float], look: _Look) -> NonFinite:
        for value, (step, batch_idx) in zip(values, look.where, strict=False):
            if not math.isfinite(value):
                return NonFinite(step, batch_idx, "loss")
        return NonFinite(look.at[0], look.at[1], "gradients")


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

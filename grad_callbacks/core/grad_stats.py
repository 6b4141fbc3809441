"""Device-side gradient sanity statistics: missing and non-finite gradients, per parameter.

Pure torch (no Lightning). :class:`GradSanityMonitor` watches groups of parameters (one group
per optimizer). At each step of a group, :meth:`GradSanityMonitor.observe` computes every
gradient's L2 norm with one ``torch._foreach_norm`` call (:func:`~grad_callbacks.core.norms.
grad_norms`) and stacks them into a row of per-parameter values that stays on the device (two
device operations per step, no host synchronisation): the norm is 0 when the gradient is all
zeros, NaN when it holds a NaN, and Inf when it holds an Inf (within float32's range: a norm
above about 1.8e19 reads as Inf, entries all below about 3.7e-23 read as 0; 16-bit gradients are
reduced in float32). A parameter whose ``.grad`` is None counts as 0, one that does not require
gradients (frozen, or switched off by ``toggle_optimizer``) as 1.

:meth:`GradSanityMonitor.collect` concatenates the rows gathered since the last call into one
tensor: reading it is a single host transfer (:class:`HostCopy`, a non-blocking copy into pinned
memory on CUDA). :meth:`GradSanityMonitor.decode` then folds the rows, in order, on the host:

* ``streak``: consecutive steps of the group at which a trainable parameter got no gradient
  (``.grad`` None, or exactly zero, as ``zero_grad(set_to_none=False)`` leaves parameters the
  loss does not reach); reaching ``patience`` makes it *missing*. Steps are consecutive among
  those observed: after :meth:`GradSanityMonitor.mark_gap` (the owner skipped some steps) every
  streak starts again from 0, so a parameter used every few steps never looks missing because
  the steps that used it were not observed;
* the first step of the window with a NaN/Inf gradient, per parameter.

:class:`LocalGradProbe` records each parameter's *local* gradient norm during the backward pass,
before DDP averages gradients over processes, so that a non-finite gradient is attributed to
the process whose data produced it.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> monitor = GradSanityMonitor([list(model.named_parameters())], patience=2)
    >>> for step in range(2):
    ...     model[1](torch.ones(1, 2)).sum().backward()   # model[0] gets no gradient
    ...     monitor.observe(0, step)
    >>> tensor, layout = monitor.collect()
    >>> (summary,) = monitor.decode(HostCopy(tensor).result(), layout)
    >>> summary.missing, summary.missing_step
    (('0.weight', '0.bias'), 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from grad_callbacks.core.norms import LOW_PRECISION, NormFn, grad_norms

_NO_STEP = -1
_NONE = -2  # below every row index, and below "the row before the first"


@dataclass(frozen=True)
class GroupSummary:
    """What a window of steps of one group (optimizer) showed.

    Attributes:
        group: the group's index.
        missing: parameters whose no-gradient streak reached ``patience`` in the window.
        missing_step: the first step at which one of them did (-1 if none).
        nonfinite: parameters with a NaN/Inf gradient at some step of the window.
        nonfinite_step: the first such step (-1 if none).
        without_grad: trainable parameters that got no gradient at the group's latest step.
        streak: the longest no-gradient streak among ``missing`` (0 if none).
        per_step: ``(step, without_grad, nonfinite)`` for every step of the window, in order:
            how many trainable parameters got no gradient, and how many had a NaN/Inf one
            (counted only where ``count_nonfinite``), at that step.
    """

    group: int
    missing: tuple[str, ...] = ()
    missing_step: int = _NO_STEP
    nonfinite: tuple[str, ...] = ()
    nonfinite_step: int = _NO_STEP
    without_grad: int = 0
    streak: int = 0
    per_step: tuple[tuple[int, int, int], ...] = ()


class _Group:
    def __init__(self, named: Sequence[tuple[str, Tensor]]) -> None:
        self.names = tuple(n for n, _ in named)
        self.params = [p for _, p in named]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        # 0-d stand-ins for parameters without a norm: "no gradient", and "not looked at"
        self.absent = torch.zeros((), device=self.device)
        self.skipped = torch.ones((), device=self.device)
        # host side, advanced by decode()
        self.streak = torch.zeros(len(self.params), dtype=torch.int64)
        self.gap = False  # steps were skipped before the next observed one


@dataclass(frozen=True)
class _Row:
    group: int
    step: int
    count_nonfinite: bool
    local: bool  # a second row of local norms follows for the NaN/Inf test
    after_gap: bool = False  # the group's streaks start again at this row


class GradSanityMonitor:
    """Per-step gradient norms of groups of parameters, kept on the device until read.

    Args:
        groups: one list of ``(name, parameter)`` pairs per group (an optimizer's parameters).
        patience: how many consecutive steps of a group without a gradient make a parameter
            *missing*.
    """

    def __init__(self, groups: Sequence[Sequence[tuple[str, Tensor]]], patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.groups = [_Group(list(named)) for named in groups]
        self._rows: list[tuple[_Row, list[Tensor]]] = []

    def mark_gap(self) -> None:
        """Steps of every group will go unobserved before the next :meth:`observe`: streaks of
        steps without a gradient start again from 0 there."""
        for g in self.groups:
            g.gap = True

    @property
    def pending_steps(self) -> int:
        """Steps observed since the last :meth:`collect`."""
        return len(self._rows)

    def observe(
        self,
        group: int,
        step: int,
        *,
        count_nonfinite: bool = True,
        local_norms: Tensor | None = None,
        norm_fn: NormFn = grad_norms,
    ) -> None:
        """Record the current gradients of ``group`` (device operations only).

        Only parameters with ``requires_grad=True`` at this moment are looked at.

        Args:
            group: the group's index.
            step: the step number to record for what is seen now.
            count_nonfinite: False where non-finite gradients are expected and handled
                elsewhere (a GradScaler skips the step).
            local_norms: per-parameter norms to test for NaN/Inf instead of those of the
                current ``.grad`` (e.g. from a :class:`LocalGradProbe`, before DDP's averaging).
            norm_fn: per-tensor gradient L2 norms (``NormCache.norms`` shares them with other
                checks).
        """
        g = self.groups[group]
        if not g.params:
            return
        slots: list[Tensor | None] = []
        present: list[Tensor] = []
        where: list[int] = []
        for i, p in enumerate(g.params):
            grad = p.grad
            if not p.requires_grad:
                slots.append(g.skipped)
            elif grad is None:
                slots.append(g.absent)
            elif grad.numel() == 0:
                slots.append(g.skipped)
            else:
                slots.append(None)
                present.append(grad)
                where.append(i)
        for i, norm in zip(where, norm_fn(present), strict=True):
            slots[i] = norm if norm.device == g.device else norm.to(g.device, non_blocking=True)
        tensors = [torch.stack([s for s in slots if s is not None])]
        if local_norms is not None and count_nonfinite:
            tensors.append(local_norms)
        row = _Row(group, int(step), count_nonfinite, len(tensors) == 2, after_gap=g.gap)
        g.gap = False
        self._rows.append((row, tensors))

    def streaks(self) -> list[tuple[int, str, int]]:
        """``(group, parameter name, streak)`` for every parameter on a no-gradient streak, as
        of the rows decoded so far (for a checkpoint)."""
        return [
            (gi, name, int(streak))
            for gi, g in enumerate(self.groups)
            for name, streak in zip(g.names, g.streak.tolist(), strict=True)
            if streak
        ]

    def restore_streaks(self, streaks: Sequence[Sequence[Any]]) -> None:
        """Continue the streaks :meth:`streaks` returned (entries whose group and parameter name
        are no longer there are ignored)."""
        for group, name, streak in streaks:
            if 0 <= int(group) < len(self.groups):
                g = self.groups[int(group)]
                if name in g.names:
                    g.streak[g.names.index(name)] = int(streak)

    def collect(self) -> tuple[Tensor, list[_Row]] | None:
        """The rows observed since the last call, concatenated into one float32 device tensor,
        with their layout for :meth:`decode`; None when there are none.

        Reading the tensor is the caller's single host transfer.
        """
        if not self._rows:
            return None
        device = self.groups[self._rows[0][0].group].device
        parts = [t.to(device, torch.float32) for _, tensors in self._rows for t in tensors]
        layout = [row for row, _ in self._rows]
        self._rows = []
        return torch.cat(parts), layout

    def decode(self, host: Tensor, layout: Sequence[_Row]) -> list[GroupSummary]:
        """Fold collected rows (on the host, in the order collected) into one summary per group
        seen in them. Calls must follow the order of :meth:`collect`."""
        if bool(torch.isfinite(host).all()) and bool((host != 0).all()):
            # Every parameter had a finite, non-zero gradient at every row (the usual case): no
            # streak, nothing missing or non-finite; the fold below would say the same.
            steps: dict[int, list[tuple[int, int, int]]] = {}
            for row in layout:
                steps.setdefault(row.group, []).append((row.step, 0, 0))
            for index in steps:
                self.groups[index].streak = torch.zeros(
                    len(self.groups[index].params), dtype=torch.int64
                )
            return [
                GroupSummary(group=index, per_step=tuple(steps[index])) for index in sorted(steps)
            ]
        return self._fold(host, layout)

    def _fold(self, host: Tensor, layout: Sequence[_Row]) -> list[GroupSummary]:
        """:meth:`decode`, row by row (what it does unless every value is finite and not 0)."""
        rows: dict[int, tuple[list[Tensor], list[Tensor], list[int], list[bool], list[bool]]] = {}
        offset = 0
        for row in layout:
            n = len(self.groups[row.group].params)
            values = host[offset : offset + n]
            offset += n
            tested = values
            if row.local:
                tested = host[offset : offset + n]
                offset += n
            vs, ts, steps, counted, gaps = rows.setdefault(row.group, ([], [], [], [], []))
            vs.append(values)
            ts.append(tested)
            steps.append(row.step)
            counted.append(row.count_nonfinite)
            gaps.append(row.after_gap)
        first_missing: dict[int, Tensor] = {}
        first_nonfinite: dict[int, Tensor] = {}
        per_step: dict[int, tuple[tuple[int, int, int], ...]] = {}
        for index, (vs, ts, steps, counted, gaps) in rows.items():
            g = self.groups[index]
            step_of = torch.tensor(steps)
            # The streak after each row, for all rows at once: rows since the last row with a
            # gradient (a row after a gap counts as if the row before it had one), or the
            # streak carried in plus every row so far when there was neither.
            order = torch.arange(len(vs)).unsqueeze(1)
            got = torch.stack(vs) != 0
            reset = torch.where(got, order, _NONE)
            after_gap = torch.tensor(gaps).unsqueeze(1)
            reset = torch.maximum(reset, torch.where(after_gap, order - 1, _NONE))
            last = torch.cummax(reset, dim=0).values
            streaks = torch.where(last > _NONE, order - last, g.streak + order + 1)
            g.streak = streaks[-1].clone()
            first_missing[index] = _first_step(streaks >= self.patience, step_of)
            bad = ~torch.isfinite(torch.stack(ts)) & torch.tensor(counted).unsqueeze(1)
            first_nonfinite[index] = _first_step(bad, step_of)
            per_step[index] = tuple(
                zip(steps, (~got).sum(dim=1).tolist(), bad.sum(dim=1).tolist(), strict=True)
            )
        out = []
        for index in sorted(first_missing):
            g = self.groups[index]
            fm, fn = first_missing[index].tolist(), first_nonfinite[index].tolist()
            streak = g.streak.tolist()
            hit = [i for i, s in enumerate(fm) if s != _NO_STEP]
            bad = [i for i, s in enumerate(fn) if s != _NO_STEP]
            out.append(
                GroupSummary(
                    group=index,
                    missing=tuple(g.names[i] for i in hit),
                    missing_step=min((fm[i] for i in hit), default=_NO_STEP),
                    nonfinite=tuple(g.names[i] for i in bad),
                    nonfinite_step=min((fn[i] for i in bad), default=_NO_STEP),
                    without_grad=sum(1 for s in streak if s > 0),
                    streak=max((streak[i] for i in hit), default=0),
                    per_step=per_step[index],
                )
            )
        return out


def _first_step(hit: Tensor, steps: Tensor) -> Tensor:
    """Per column of ``hit`` (rows x parameters), the step of its first True row, or -1."""
    first = hit.int().argmax(dim=0)  # the first maximum: the first True row, 0 if none
    return torch.where(hit.any(dim=0), steps[first], _NO_STEP)


class HostCopy:
    """A device tensor on its way to the host, without blocking where the device allows it.

    On CUDA the copy goes into pinned memory with ``non_blocking=True`` and a CUDA event marks
    its completion: :meth:`ready` asks the event without waiting, :meth:`result` waits. On the
    CPU the tensor is already on the host. Other devices copy synchronously.

    Example:
        >>> HostCopy(torch.tensor([1, 2])).result().tolist()
        [1, 2]
    """

    def __init__(self, tensor: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.is_cpu:
            self._host = tensor
        elif tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.cpu()

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        return self._event is None or bool(self._event.query())

    def result(self) -> Tensor:
        """The host tensor, waiting for the copy if needed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


class LocalGradProbe:
    """Records each parameter's local gradient L2 norm during backward passes.

    A tensor hook (``Tensor.register_hook``) sees the gradient a backward pass computed for a
    parameter before it is accumulated into ``.grad``, and so before DDP averages it over
    processes. Its L2 norm is added up over the backward passes since the last :meth:`take`
    (NaN and Inf stay).
    One small device kernel per parameter and backward pass, so use it only where it matters
    (DDP).

    Args:
        params: the parameters to watch (those that do not require gradients are skipped).
        untraced: run the hooks under ``torch.compiler.disable``, for backward passes called
            from ``torch.compile``d code (a compiled manual-optimization ``training_step``),
            where dynamo would otherwise trace them.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> probe = LocalGradProbe([w])
        >>> (w * float("nan")).sum().backward()
        >>> probe.take([w])
        tensor([nan])
        >>> probe.remove()
    """

    def __init__(self, params: Sequence[Tensor], untraced: bool = False) -> None:
        self._norms: dict[int, Tensor] = {}
        self._handles: dict[int, RemovableHandle] = {}
        self._untraced = untraced
        #: Seconds spent in the hooks (autograd calls them inside backward passes).
        self.hook_seconds = 0.0
        self.add(params)

    def add(self, params: Sequence[Tensor]) -> None:
        """Watch those of ``params`` that require gradients now and are not watched yet (a
        parameter unfrozen since)."""
        for p in params:
            if p.requires_grad and id(p) not in self._handles:
                self._handles[id(p)] = p.register_hook(self._make_hook(id(p)))

    def _make_hook(self, key: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._record(key, grad)

        return torch.compiler.disable(hook) if self._untraced else hook

    def _record(self, key: int, grad: Tensor) -> None:
        if not grad.numel():
            return
        start = perf_counter()
        with torch.no_grad():
            dtype = torch.float32 if grad.dtype in LOW_PRECISION else None
            norm = torch.linalg.vector_norm(grad.detach(), 2, dtype=dtype)
        prev = self._norms.get(key)
        self._norms[key] = norm if prev is None else prev + norm
        self.hook_seconds += perf_counter() - start

    def take(self, params: Sequence[Tensor]) -> Tensor | None:
        """The recorded norms of ``params`` (0 for those without one), and forget them.

        None when no parameter of ``params`` has a recorded norm.
        """
        found = [self._norms.pop(id(p), None) for p in params]
        if all(n is None for n in found):
            return None
        ref = next(n for n in found if n is not None)
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return torch.stack([zero if n is None else n.to(ref.device) for n in found])

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        self._norms.clear()

"""The gradient ledger: which backward passes each parameter's ``.grad`` holds, per optimizer step.

Pure torch (no Lightning). Three kinds of hooks feed it:

* a leaf pre-hook (``Tensor.register_hook``), which runs before a backward pass accumulates into
  ``.grad`` and so sees whether the gradient was cleared since the ledger last looked;
* ``Tensor.register_post_accumulate_grad_hook``, which records that the running backward pass
  (identified by autograd's graph-task id) contributed to the parameter;
* ``Optimizer.register_step_post_hook``, which fires on real optimizer steps only (a step skipped
  by a GradScaler on overflow fires nothing) and audits the gradients that step consumed, unless
  :meth:`GradientLedger.audit_step` already audited that step as it was attempted. torch runs
  the step hooks in a wrapper it puts around ``step`` of every optimizer class it instantiates,
  so the ``step`` of a subclass that calls ``super().step()`` fires them twice per step (outer
  and inner wrapper) once an instance of the base class exists; a step pre-hook arms each
  optimizer, and only the first post-hook after it counts: one step per step.

Cleared means ``.grad`` set to None, replaced by another tensor, or zeroed in place. The first two
are seen on the host for free. An in-place change (``zero_grad(set_to_none=False)``, but also
clipping, unscaling or DDP's all-reduce) is seen through the tensor's version counter, and only
then does the ledger test on the device whether the gradient is all zeros; that result is read
(one host-device synchronisation) only when the step would otherwise be reported. With the
default ``set_to_none=True`` nothing is ever read from the device.

What a gradient held before the ledger started watching (at :meth:`GradientLedger.attach`, or at
:meth:`GradientLedger.resume` after a :meth:`GradientLedger.pause`) counts as one contribution
older than anything watched: the first step of each optimizer after that is not judged (its
previous step was not seen), and from the second on the rules below apply as usual.

Rules, for a step of optimizer O and a parameter p of O whose ``.grad`` is not None:

* ``uncleared``: p holds a contribution older than O's previous step and a new one
  (``missing-zero-grad``);
* ``stale``: p holds only contributions older than O's previous step (``stale-grad``);
* ``leaked``: p holds a contribution from a backward pass that another optimizer already stepped
  on, with another backward pass after that step (``gradient-leak``).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> ledger = GradientLedger(model.named_parameters(), [opt])
    >>> ledger.attach()
    >>> for _ in range(2):  # forgets opt.zero_grad()
    ...     model(torch.ones(1, 2)).sum().backward()
    ...     opt.step()
    >>> ledger.step_audits[-1].uncleared
    ('weight', 'bias')
    >>> ledger.detach()
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

_MAX_TRACKED_BACKWARDS = 512
# The contribution standing for whatever .grad held before the ledger started watching: older
# than every backward pass and step it numbers (those count from 0).
_BEFORE = -1


@dataclass(frozen=True)
class StepAudit:
    """What one real optimizer step consumed.

    Attributes:
        optimizer_index: position of the optimizer in the list given to the ledger.
        step_index: how many steps of this optimizer the ledger saw before this one (steps
            taken while it was paused are not seen).
        microbatches: backward passes since this optimizer's previous step that reached its
            parameters (the accumulation window's size; at a step whose previous step the
            ledger did not see, those it saw).
        uncleared: parameters holding contributions from before the previous step and new ones.
        stale: parameters holding only contributions from before the previous step.
        leaked: parameters holding a backward pass another optimizer already stepped on.
        leaked_from: indices of those other optimizers.
        params_with_grad: parameters of the optimizer whose ``.grad`` was not None.
        previous_seen: whether the ledger saw this optimizer's previous step (False at the
            first step after :meth:`GradientLedger.attach` or :meth:`GradientLedger.resume`,
            where nothing can be stale or uncleared yet).
    """

    optimizer_index: int
    step_index: int
    microbatches: int
    uncleared: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()
    leaked: tuple[str, ...] = ()
    leaked_from: tuple[int, ...] = ()
    params_with_grad: int = 0
    previous_seen: bool = True

    @property
    def clean(self) -> bool:
        """True when the step consumed only fresh, unshared contributions."""
        return not (self.uncleared or self.stale or self.leaked)


@dataclass
class _Verdict:
    uncleared: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    leaked_from: set[int] = field(default_factory=set)
    fresh_backwards: set[int] = field(default_factory=set)

    @property
    def flagged(self) -> set[str]:
        return {*self.uncleared, *self.stale, *self.leaked}


@torch.no_grad()
def _all_zero(grad: Tensor) -> Tensor:
    """A device bool: is ``grad`` all zeros (no host synchronisation)."""
    return (grad == 0).all()


@dataclass
class _ParamState:
    name: str
    # Backward passes (ledger sequence numbers) held in .grad since it was last cleared; after a
    # step of the owning optimizer only the oldest is kept, which is all the rules need.
    contributions: list[int] = field(default_factory=list)
    grad_ref: weakref.ref[Tensor] | None = None
    grad_version: int = -1
    # In-place changes seen before a contribution: (device bool "was all zeros", how many of the
    # contributions it would clear).
    pending_zero_tests: list[tuple[Tensor, int]] = field(default_factory=list)


class GradientLedger:
    """Per-parameter record of the backward passes each gradient holds, audited at every step.

    Args:
        named_parameters: ``(name, parameter)`` pairs used to name parameters in audits.
        optimizers: the optimizers whose steps are audited.
        on_step: called with each :class:`StepAudit` as the step happens (inside the optimizer's
            step post-hook).
        keep_audits: how many recent audits :attr:`step_audits` keeps (for tests and debugging).
        untraced_hooks: wrap the tensor and optimizer hooks in ``torch.compiler.disable``, for
            backward passes and optimizer steps called from ``torch.compile``d code (a compiled
            ``training_step`` in manual optimization), where dynamo would otherwise trace the
            hooks into graphs of their own; about 1 us more per hook call.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, Tensor]],
        optimizers: Sequence[torch.optim.Optimizer],
        on_step: Callable[[StepAudit], Any] | None = None,
        keep_audits: int = 16,
        untraced_hooks: bool = False,
    ) -> None:
        self._names: dict[int, str] = {}
        for name, p in named_parameters:
            self._names.setdefault(id(p), name)
        self.optimizers = list(optimizers)
        self._on_step = on_step
        self._keep_audits = keep_audits
        self._untraced_hooks = untraced_hooks
        self.step_audits: list[StepAudit] = []
        self._seq = itertools.count()
        self._states: dict[int, _ParamState] = {}
        self._hooked: dict[int, list[RemovableHandle]] = {}
        self._opt_handles: list[RemovableHandle] = []
        self._opt_params: list[list[Tensor]] = []
        self._last_step_seq: list[int | None] = [None] * len(self.optimizers)
        self.steps_taken: list[int] = [0] * len(self.optimizers)
        self._audited_ahead: list[bool] = [False] * len(self.optimizers)
        # Whether a step pre-hook fired since the last post-hook that counted (see above).
        self._armed: list[bool] = [True] * len(self.optimizers)
        self._task_seq: OrderedDict[int, int] = OrderedDict()
        self._last_backward_seq = -1
        # backward seq -> [(optimizer index, step seq)] for the steps that consumed it
        self._consumed_by: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()
        #: Seconds spent in the tensor and optimizer hooks the ledger registers (autograd and
        #: the optimizers call them, outside any hook of the caller's).
        self.hook_seconds = 0.0
        self._paused = False

    # ------------------------------------------------------------------ wiring
    def attach(self) -> None:
        """Register the hooks on every trainable parameter and on the optimizers."""
        self._opt_params = []
        for i, opt in enumerate(self.optimizers):
            params = [p for group in opt.param_groups for p in group["params"]]
            self._opt_params.append(params)
            for j, p in enumerate(params):
                self._names.setdefault(id(p), f"optimizer{i}.param{j}")
            self._armed[i] = True
            arm = self._untraced(self._make_step_pre_hook(i))
            hook = self._untraced(self._make_step_hook(i))
            self._opt_handles.append(opt.register_step_pre_hook(arm))
            self._opt_handles.append(opt.register_step_post_hook(hook))
        self._hook_new(held_is_old=True)

    def refresh(self) -> None:
        """Hook parameters that became trainable since :meth:`attach` (e.g. an unfrozen layer)."""
        if not self._paused:
            # Unfrozen while watched: what .grad holds may be this very batch's gradient (a
            # layer unfrozen inside training_step), so it is not taken for an old one.
            self._hook_new(held_is_old=False)

    def _hook_new(self, held_is_old: bool) -> None:
        for params in self._opt_params:
            for p in params:
                if p.requires_grad and id(p) not in self._hooked:
                    self._hook_param(p, held_is_old)

    def detach(self) -> None:
        """Remove every hook; the ledger stops recording."""
        for handles in self._hooked.values():
            for h in handles:
                h.remove()
        for h in self._opt_handles:
            h.remove()
        self._hooked.clear()
        self._opt_handles.clear()

    def pause(self) -> None:
        """Stop watching (no hook is called, nothing costs) until :meth:`resume`."""
        self.detach()
        self._paused = True

    def resume(self) -> None:
        """Watch again after :meth:`pause`, knowing nothing of what happened in between.

        What the gradients hold now counts as older than anything watched from here on, and
        each optimizer's next step is its first seen one (see the module docstring): a gap
        never makes a step look stale or uncleared, and a missing ``zero_grad`` is caught from
        the second step after resuming.
        """
        self.detach()
        self._paused = False
        self._states.clear()
        self._last_step_seq = [None] * len(self.optimizers)
        self._audited_ahead = [False] * len(self.optimizers)
        self.attach()

    def _hook_param(self, p: Tensor, held_is_old: bool) -> None:
        state = _ParamState(self._names.get(id(p), f"param@{id(p):x}"))
        self._states[id(p)] = state
        if p.grad is not None:
            if held_is_old:
                state.contributions.append(_BEFORE)
            self._remember_grad(state, p.grad)
        ref = weakref.ref(p)

        def before_accumulate(grad: Tensor) -> None:
            start = perf_counter()
            param = ref()
            if param is not None:
                self._observe_clear(state, param)
            self.hook_seconds += perf_counter() - start

        def after_accumulate(param: Tensor) -> None:
            start = perf_counter()
            seq = self._backward_seq()
            if not state.contributions or state.contributions[-1] != seq:
                state.contributions.append(seq)
            if param.grad is not None:
                self._remember_grad(state, param.grad)
            self.hook_seconds += perf_counter() - start

        self._hooked[id(p)] = [
            p.register_hook(self._untraced(before_accumulate)),
            p.register_post_accumulate_grad_hook(self._untraced(after_accumulate)),
        ]

    def _untraced(self, hook: Callable[..., None]) -> Callable[..., None]:
        return torch.compiler.disable(hook) if self._untraced_hooks else hook

    # ------------------------------------------------------------------ observation
    def _backward_seq(self) -> int:
        task = torch._C._current_graph_task_id()
        seq = self._task_seq.get(task)
        if seq is None:
            seq = next(self._seq)
            self._task_seq[task] = seq
            if len(self._task_seq) > _MAX_TRACKED_BACKWARDS:
                self._task_seq.popitem(last=False)
            self._last_backward_seq = seq
        return seq

    @staticmethod
    def _remember_grad(state: _ParamState, grad: Tensor) -> None:
        state.grad_ref = weakref.ref(grad)
        state.grad_version = grad._version

    def _observe_clear(self, state: _ParamState, p: Tensor) -> None:
        """Update ``state`` with what happened to ``p.grad`` since the ledger last saw it."""
        grad = p.grad
        if grad is None:
            state.contributions.clear()
            state.pending_zero_tests.clear()
            state.grad_ref = None
            return
        if state.grad_ref is None or state.grad_ref() is not grad:
            # Assigned from outside a backward pass: whatever it held before is gone.
            state.contributions.clear()
            state.pending_zero_tests.clear()
            self._remember_grad(state, grad)
            return
        if grad._version != state.grad_version and state.contributions:
            state.pending_zero_tests.append((_all_zero(grad), len(state.contributions)))
            state.grad_version = grad._version

    @staticmethod
    def _resolve_zero_tests(states: Sequence[_ParamState]) -> None:
        """Apply pending in-place-zeroing tests (one device read for all of them)."""
        tests = [(s, n, t) for s in states for t, n in s.pending_zero_tests]
        if not tests:
            return
        zeroed = torch.stack([t.reshape(()).cpu() for _, _, t in tests]).tolist()
        for (state, n, _), was_zero in reversed(list(zip(tests, zeroed, strict=True))):
            if was_zero:
                del state.contributions[:n]
        for state in states:
            state.pending_zero_tests.clear()

    # ------------------------------------------------------------------ audit
    def _make_step_pre_hook(self, index: int) -> Callable[..., None]:
        def arm(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._armed[index] = True

        return arm

    def _make_step_hook(self, index: int) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not self._armed[index]:
                return  # the outer call of a step whose inner call was counted
            self._armed[index] = False
            if self._audited_ahead[index]:
                self._audited_ahead[index] = False
            else:
                start = perf_counter()
                self._audit_step(index)
                self.hook_seconds += perf_counter() - start

        return hook

    def audit_step(self, index: int) -> None:
        """Audit the gradients optimizer ``index`` is about to step on.

        Call it right before an attempted step (Lightning's ``on_before_optimizer_step``): a step
        that a GradScaler then skips still counts as a step boundary, so a missing ``zero_grad``
        is caught even when every step overflows. The step's own post-hook then does nothing;
        steps taken without this call are audited by the post-hook.
        """
        self._audit_step(index)
        self._audited_ahead[index] = True

    def _classify(self, index: int, states: Sequence[_ParamState], prev: int | None) -> _Verdict:
        verdict = _Verdict()
        for state in states:
            if not state.contributions:
                continue
            old = prev is not None and state.contributions[0] < prev
            fresh = [b for b in state.contributions if b != _BEFORE and (prev is None or b > prev)]
            verdict.fresh_backwards.update(fresh)
            if old and fresh:
                verdict.uncleared.append(state.name)
            elif old:
                verdict.stale.append(state.name)
            for b in fresh:
                # Another optimizer stepped on b, and a backward pass ran after that step.
                others = [
                    j
                    for j, at in self._consumed_by.get(b, ())
                    if j != index and at < self._last_backward_seq
                ]
                if others:
                    verdict.leaked.append(state.name)
                    verdict.leaked_from.update(others)
                    break
        return verdict

    def _audit_step(self, index: int) -> None:
        self.refresh()
        now = next(self._seq)
        prev = self._last_step_seq[index]
        live: list[tuple[_ParamState, Tensor]] = []
        for p in self._opt_params[index]:
            state = self._states.get(id(p))
            if state is None:
                continue
            if p.grad is None or state.grad_ref is None or state.grad_ref() is not p.grad:
                self._observe_clear(state, p)
            if p.grad is not None:
                live.append((state, p))
        states = [s for s, _ in live]
        verdict = self._classify(index, states, prev)
        flagged = verdict.flagged
        if flagged:
            # Only now is it worth asking the device whether an in-place change zeroed a grad.
            for state, p in live:
                assert p.grad is not None
                if state.name in flagged and p.grad._version != state.grad_version:
                    if state.contributions:
                        state.pending_zero_tests.append(
                            (_all_zero(p.grad), len(state.contributions))
                        )
            self._resolve_zero_tests([s for s in states if s.name in flagged])
            verdict = self._classify(index, states, prev)
        for state in states:
            state.pending_zero_tests.clear()
            for b in state.contributions:
                self._consumed_by.setdefault(b, []).append((index, now))
            del state.contributions[1:]
        while len(self._consumed_by) > _MAX_TRACKED_BACKWARDS:
            self._consumed_by.popitem(last=False)
        self._remember_versions(index)

        audit = StepAudit(
            optimizer_index=index,
            step_index=self.steps_taken[index],
            microbatches=len(verdict.fresh_backwards),
            uncleared=tuple(verdict.uncleared),
            stale=tuple(verdict.stale),
            leaked=tuple(verdict.leaked),
            leaked_from=tuple(sorted(verdict.leaked_from)),
            params_with_grad=len(states),
            previous_seen=prev is not None,
        )
        self._last_step_seq[index] = now
        self.steps_taken[index] += 1
        self.step_audits.append(audit)
        del self.step_audits[: -self._keep_audits]
        if self._on_step is not None:
            self._on_step(audit)

    def _remember_versions(self, index: int) -> None:
        # After the step, later in-place changes (zero_grad(set_to_none=False)) are measured
        # against the gradient as the step left it.
        for p in self._opt_params[index]:
            state = self._states.get(id(p))
            if state is not None and p.grad is not None and state.grad_ref is not None:
                if state.grad_ref() is p.grad:
                    state.grad_version = p.grad._version

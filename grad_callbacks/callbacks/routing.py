"""Which of GradientAudit's checks it calls in each Lightning hook, and which are asleep.

Lightning calls every hook of a callback at every batch; most checks have nothing to do in most
of them (a periodic check between its steps, a check that ran once, a per-step check between
its watch windows). :class:`Router` keeps, per hook, the checks that do something in it, and
puts a check to sleep when it says (:meth:`~grad_callbacks.callbacks.base.AuditCallback.
next_busy_step`) that its per-batch hooks have nothing to do before some later step: a
sleeping check costs nothing per batch, not even a call. The audit wakes it at that step, when
it starts watching, or when the check asks (:meth:`~grad_callbacks.callbacks.base.
AuditCallback.wake`).

Example:
    >>> from grad_callbacks.callbacks.monitor import GradientMonitor
    >>> monitor = GradientMonitor(every_n_steps=50)
    >>> monitor._previous = [0]  # as after a monitored step 0
    >>> router = Router([monitor])
    >>> [c.check_name for c, _ in router.batch["on_before_optimizer_step"]]
    ['GradientMonitor']
    >>> router.settle(step=1), router.next_wake
    (True, 50)
    >>> router.batch["on_before_optimizer_step"]
    []
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from grad_callbacks.callbacks.base import AuditCallback
from grad_callbacks.callbacks.hooks import BATCH_HOOKS, CALLBACK_HOOKS

#: Per-batch hooks not called on a check while it is not watching (see ``watches_steps``).
WATCHED_HOOKS = frozenset(
    {
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
    }
)

Route = list[tuple[AuditCallback, Callable[..., None]]]


class Router:
    """Per hook, the checks to call; per-batch hooks skip the checks that sleep.

    Args:
        checks: the audit's checks, in the order their hooks are called.
    """

    def __init__(self, checks: Sequence[AuditCallback]) -> None:
        self.checks = list(checks)
        self._index = {id(c): i for i, c in enumerate(self.checks)}
        #: Every hook -> the checks that implement it, with the hook's body (the check's hook
        #: without its wrapper: GradientAudit's own wrapper did what it would).
        self.targets: dict[str, Route] = {
            name: [(c, body(c, name)) for c in self.checks if implements(c, name)]
            for name in CALLBACK_HOOKS
        }
        # Checks whose on_train_batch_end is the base class's: it only flushes their scalars.
        base_end = AuditCallback.on_train_batch_end.__wrapped__  # type: ignore[attr-defined]
        self.flushed_only = [c for c in self.checks if body(c, "on_train_batch_end") is base_end]
        self.targets["on_train_batch_end"] = [
            (c, b) for c, b in self.targets["on_train_batch_end"] if b is not base_end
        ]
        self.awake = [True] * len(self.checks)
        #: Called after every rebuild of the routes (the owner follows them).
        self.listener: Callable[[], None] | None = None
        #: The indices of the awake checks.
        self.awake_indices = list(range(len(self.checks)))
        self.wake_at: list[int | None] = [None] * len(self.checks)
        #: The earliest step at which a sleeping check wakes (None: none is due to).
        self.next_wake: int | None = None
        #: Per-batch hook -> the awake checks to call in it (watching ones only, for the
        #: hooks of WATCHED_HOOKS).
        self.batch: dict[str, Route] = {}
        self.rebuild()

    def index(self, check: AuditCallback) -> int:
        return self._index[id(check)]

    def rebuild(self) -> None:
        """Recompute the per-batch routes (after a check woke, slept, or started or stopped
        watching)."""
        awake, index = self.awake, self._index
        self.batch = {
            name: [
                (c, b)
                for c, b in self.targets[name]
                if awake[index[id(c)]] and (c.watching or name not in WATCHED_HOOKS)
            ]
            for name in BATCH_HOOKS
        }
        if self.listener is not None:
            self.listener()

    def settle(self, step: int) -> bool:
        """At the end of a batch: put to sleep every awake check whose per-batch hooks have
        nothing to do at ``step`` (the next batch's global step). Whether any fell asleep."""
        slept = False
        for i in self.awake_indices:
            check = self.checks[i]
            try:
                wake = check.next_busy_step(step)
            except Exception:  # a check's own error must not stop training: keep it awake
                wake = step
            if wake is None or wake > step:
                self.awake[i], self.wake_at[i] = False, wake
                slept = True
        if slept:
            self._update()
        return slept

    def wake_due(self, step: int) -> list[int]:
        """Wake the checks due at ``step``; their indices."""
        woken = [
            i
            for i, w in enumerate(self.wake_at)
            if not self.awake[i] and w is not None and w <= step
        ]
        for i in woken:
            self.awake[i], self.wake_at[i] = True, None
        if woken:
            self._update()
        return woken

    def wake(self, check: AuditCallback) -> bool:
        """Wake ``check`` now; whether it was asleep."""
        i = self._index.get(id(check))
        if i is None or self.awake[i]:
            return False
        self.awake[i], self.wake_at[i] = True, None
        self._update()
        return True

    def wake_all(self) -> None:
        self.awake = [True] * len(self.checks)
        self.wake_at = [None] * len(self.checks)
        self._update()

    def _update(self) -> None:
        due = [w for a, w in zip(self.awake, self.wake_at, strict=True) if not a and w is not None]
        self.next_wake = min(due, default=None)
        self.awake_indices = [i for i, a in enumerate(self.awake) if a]
        self.rebuild()


def implements(check: AuditCallback, name: str) -> bool:
    """Whether the check's hook ``name`` does anything (Lightning's default does nothing)."""
    return getattr(type(check), name) is not getattr(pl.Callback, name)


def body(check: AuditCallback, name: str) -> Callable[..., Any]:
    """The check's hook ``name`` without its :func:`~grad_callbacks.callbacks.hooks.audit_hook`
    wrapper."""
    hook = getattr(type(check), name)
    return getattr(hook, "__wrapped__", hook)

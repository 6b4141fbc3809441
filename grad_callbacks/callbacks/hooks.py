"""The wrapper around every Lightning hook a check defines, and the hook tables it uses.

:func:`audit_hook` wraps each hook method of an
:class:`~grad_callbacks.callbacks.base.AuditCallback` subclass as the class is created
(:func:`wrap_hooks`): the outermost call skips the check's own work while it is inactive
(running only the base class's part, :data:`BASE_HOOK_BODIES`), ends the hooks of
:data:`_AGREE_HOOKS` with the DDP agreement on ``on_finding="raise"``, and runs eagerly when
dynamo traces the caller. A check's own hook methods stay plain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

if TYPE_CHECKING:
    from grad_callbacks.callbacks.base import AuditCallback

#: Every hook Lightning calls on a callback (checkpoint hooks aside).
CALLBACK_HOOKS: tuple[str, ...] = tuple(
    sorted(
        name
        for name in vars(pl.Callback)
        if (name.startswith("on_") or name in ("setup", "teardown"))
        and name not in ("on_save_checkpoint", "on_load_checkpoint")
        and callable(getattr(pl.Callback, name))
    )
)
# Hooks at whose end, under DDP and on_finding="raise", every rank learns whether one holds an
# error: before the optimizer applies a gradient, and where findings are read or gathered.
_AGREE_HOOKS = frozenset(
    {"on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end", "on_train_end"}
)
#: The hooks Lightning calls at every training batch. GradientAudit does not call those of a
#: check before the step :meth:`AuditCallback.next_busy_step` names.
BATCH_HOOKS = frozenset(
    {
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
    }
)
_COMPILING_FLAG = hasattr(torch.compiler, "_is_compiling_flag")
#: The base class's own hook bodies (filled in by :mod:`grad_callbacks.callbacks.base` once
#: ``AuditCallback`` exists): what an inactive check's hook still runs.
BASE_HOOK_BODIES: dict[str, Callable[..., None]] = {}


def audit_hook(name: str, body: Callable[..., None]) -> Callable[..., None]:
    """Wrap the Lightning hook ``name`` of a check (see the module docstring).

    The outermost call of a hook (not the ``super()`` calls inside it) skips the check's own
    work while the check is inactive (running only the base class's part: outputs, gathering),
    and ends, for hooks in :data:`_AGREE_HOOKS`, with :meth:`AuditCallback._agree_to_raise`.
    Called from code that dynamo is tracing (a compiled manual-optimization ``training_step``
    calls ``on_before_backward`` and ``on_before_optimizer_step``), the hook runs eagerly
    through ``torch.compiler.disable``; elsewhere that costs one ``is_compiling()`` test.
    """

    agree = name in _AGREE_HOOKS

    def run(self: AuditCallback, *args: Any, **kwargs: Any) -> None:
        if self._in_hook:
            body(self, *args, **kwargs)
            return
        work: Callable[..., None] | None = body
        if self._inactive:
            work = BASE_HOOK_BODIES.get(name)
        if work is not None:
            self._in_hook = True
            try:
                work(self, *args, **kwargs)
            finally:
                self._in_hook = False
        if agree and self._distributed_fit:
            self._agree_to_raise()

    eager = torch.compiler.disable(run)

    # Lightning calls a bundle's hooks several times per batch: the usual case (an active
    # check, outside dynamo, with nothing to agree on) calls the body and nothing else. A call
    # nested in the body runs the body too, as ``run`` would.
    @functools.wraps(body)
    def hook(self: AuditCallback, *args: Any, **kwargs: Any) -> None:
        # What torch.compiler.is_compiling() answers outside TorchScript, read without its two
        # calls where torch has the flag (dynamo holds it for the whole of a compilation).
        if (
            torch.compiler._is_compiling_flag  # type: ignore[attr-defined]
            if _COMPILING_FLAG
            else torch.compiler.is_compiling()
        ):
            eager(self, *args, **kwargs)
        elif self._inactive or self._in_hook or (agree and self._distributed_fit):
            run(self, *args, **kwargs)
        else:
            body(self, *args, **kwargs)

    hook.__audit_hook__ = True  # type: ignore[attr-defined]
    return hook


def wrap_hooks(cls: type[AuditCallback]) -> None:
    """Wrap every Lightning hook ``cls`` defines itself (once)."""
    for name in CALLBACK_HOOKS:
        body = cls.__dict__.get(name)
        if body is not None and not getattr(body, "__audit_hook__", False):
            setattr(cls, name, audit_hook(name, body))

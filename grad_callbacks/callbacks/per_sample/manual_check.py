"""PerSampleGradientCheck in manual optimization: the batch, each optimizer step of it, and the
accumulation window each optimizer stepped on.

A checked batch is recorded at its start (the random state and the module's Python state, the
gradients held then), at each ``on_before_optimizer_step`` (the optimizer, its gradients and
every stepped parameter's value), and checked at its end: ``training_step`` is replayed with the
optimizers inert and recording, and the losses handed to ``manual_backward`` before each
optimizer step are that step's loss, checked per sample and against the gradient the optimizer
stepped on (:mod:`~grad_callbacks.callbacks.per_sample.manual`). That gradient is read after
the step's own clipping: one that is the loss gradient scaled by a single factor below 1 is taken
as clipped by norm (``clip_grad_norm_``, ``self.clip_gradients``) and compared as such.

Hand-written accumulation (``manual_backward`` on every batch, ``opt.step()`` every k batches)
leaves batches that step nothing: the batches of a due step are kept (a reference each, numbered
by the trainer's batch count across epochs), and the batch that steps is checked with them as
its window. An optimizer's window is that batch alone when its ``zero_grad`` ran before the step
or its parameters held no gradient as the batch began; else the kept batches back to the one
that began it: one at whose start its parameters held no gradient, one right after a batch in
which the check saw it step, or, with a single optimizer, the first batch of the due step (the
optimizer stepped just before it: that is what made the step due). The micro-batches' counts
are then compared (``accumulation-weighting``). A window whose beginning the check did not see
(possible with several optimizers stepping at different rates) is not judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from grad_callbacks.callbacks.per_sample.comparison import _MicroBatch
from grad_callbacks.callbacks.per_sample.losses import manual_record, manual_step_losses
from grad_callbacks.callbacks.per_sample.manual import manual_step_grads
from grad_callbacks.callbacks.per_sample.replay import params_of
from grad_callbacks.callbacks.stand_ins import ManualSteps
from grad_callbacks.core.per_sample.loss import dense

#: Batches that stepped nothing kept at most, for the accumulation windows of manual steps.
MAX_KEPT_BATCHES = 64


def optimized_params(trainer: pl.Trainer, clone: bool) -> dict[int, Tensor]:
    """The values of every parameter the trainer's optimizers step, by parameter id."""
    return {
        id(p): (p.detach().clone() if clone else p.detach())
        for opt in trainer.optimizers
        for group in opt.param_groups
        for p in group["params"]
    }


@dataclass
class _ManualBatch:
    """A manual-optimization batch being checked.

    Attributes:
        step: the global step at its start (findings are stamped with it).
        micro: the batch, its index, the random and Python state before ``training_step``.
        number: the batch's number in the run (the trainer's count across epochs).
        first: whether it is the first batch of its due step the check saw.
        held: the gradients the parameters held at the start (by name).
        stepped: per optimizer step of the batch, the torch optimizer and the gradients it
            stepped on.
        segments: the stepped parameters' values before each optimizer step, and after the last.
    """

    step: int
    micro: _MicroBatch
    number: int
    first: bool
    held: dict[str, Tensor]
    stepped: list[tuple[Any, dict[str, Tensor]]] = field(default_factory=list)
    segments: list[dict[int, Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class _Kept:
    """A batch of a due step, kept for the accumulation windows of later steps."""

    number: int
    batch: Any
    first: bool
    #: The optimizers (``id`` of the torch optimizer) whose parameters held no gradient at its
    #: start: their window cannot begin earlier.
    clear: frozenset[int]


class _ManualChecks:
    """The manual-optimization hooks of :class:`PerSampleGradientCheck` (a mixin)."""

    _manual: _ManualBatch | None
    _manual_step: int | None
    _compared: bool
    _reduction_now: Any
    _done_steps: set[int]

    def _manual_init(self) -> None:
        self._manual = None
        self._manual_step = None  # the checked manual batch's first step
        self._batch_number = -1  # the trainer's batch count of the batch being checked
        # id(torch optimizer) -> the number of the batch the check last saw it step in
        self._last_stepped: dict[int, int] = {}
        # the batches of due steps, oldest first, contiguous
        self._kept: list[_Kept] = []

    def _manual_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, micro: _MicroBatch
    ) -> None:
        held = {
            k: dense(p.grad.detach().clone())
            for k, p in pl_module.named_parameters()
            if p.grad is not None
        }
        number = _batch_number(trainer, self._batch_number)
        first = not self._kept or self._kept[-1].number != number - 1
        self._batch_number = number
        self._manual = _ManualBatch(step, micro, number, first, held)

    def _manual_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """At every manual optimizer step: when it ran, and, in a checked batch, what it
        stepped on."""
        raw = getattr(optimizer, "_optimizer", optimizer)
        record = self._manual
        if record is None:
            return
        self._last_stepped[id(raw)] = record.number
        live = {
            k: dense(p.grad.detach().clone())
            for k, p in params_of(pl_module, raw).items()
            if p.grad is not None
        }
        record.stepped.append((raw, live))
        record.segments.append(optimized_params(trainer, clone=True))

    def _manual_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the batch if an optimizer stepped in it; else keep it for the window."""
        record, self._manual = self._manual, None
        if record is None:
            return
        self._keep(trainer, pl_module, record)
        if not record.stepped:
            return
        self._done_steps = {record.step}
        spent_before = self.seconds_spent
        with self.timed():
            self._compared = False
            record.segments.append(optimized_params(trainer, clone=False))
            self._manual_step = record.step
            try:
                with self.guarded("the manual-optimization comparison"):
                    self._check_manual(trainer, pl_module, record)
            finally:
                self._manual_step = None
                # batches no later window can hold (every optimizer stepped since)
                oldest = min(self._last_stepped.get(id(o), -1) for o in _raw_optimizers(trainer))
                self._kept = [k for k in self._kept if k.number > oldest]
            if self._compared:
                self.steps_checked += 1
            self._may_recompute()
        self._plan_next_run(
            trainer, record.step, self.seconds_spent - spent_before
        )

    def _check_manual(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: _ManualBatch
    ) -> None:
        """Each optimizer's loss (what ``training_step`` hands to ``manual_backward`` before
        its step) per sample, its window's weighting, and against the gradient the optimizer
        stepped on."""
        micro, stepped = record.micro, record.stepped
        with micro.isolated(pl_module, self._record):
            replay = manual_record(trainer, pl_module, micro.batch, micro.batch_idx)
        steps, cleared = replay.steps(), replay.cleared()
        manual = ManualSteps(trainer.optimizers)
        replayed = [i for i, _ in steps]
        real = [manual.index(raw) for raw, _ in stepped]
        if replayed != real:
            self.skip(
                f"training_step run again stepped the optimizers {replayed}, not "
                f"{real} as in the real step (control flow outside the batch), so the "
                "losses cannot be matched with the optimizer steps"
            )
            return
        compared: set[int | None] = set()
        wanted = [
            {n: p for n, p in params_of(pl_module, raw).items() if n in live}
            for raw, live in stepped
        ]
        for k, params in enumerate(wanted):
            if not params or real[k] in compared:
                continue
            compared.add(real[k])
            loss_fn = manual_step_losses(trainer, micro.batch_idx, k)
            self._reduction_now = None
            with self.guarded("the per-sample comparison"):
                self._compare_per_sample(pl_module, micro, params, manual_fn=loss_fn)
            window = self._window_of(trainer, record, stepped[k][0], cleared[k])
            if window is not None and len(window) > 1:
                with self.guarded("the accumulation-weighting check"):
                    self._check_accumulation(window, manual=True)
        if not self.check_optimizer_grad:
            return
        with self.guarded("the optimizer-gradient comparison"):
            replayed_grads = manual_step_grads(
                trainer, pl_module, micro, record.segments, wanted, self._record, record.held
            )
            if isinstance(replayed_grads, str):
                self.skip(f"{replayed_grads}; the optimizer gradients are not compared")
                return
            for (_, live), recomputed in zip(stepped, replayed_grads, strict=True):
                if not recomputed:
                    continue
                live = {k: live[k] for k in recomputed}
                if bool(torch.stack([torch.isfinite(g).all() for g in live.values()]).all()):
                    self._judge_mismatch(
                        trainer, live, recomputed, microbatches=1, clipped_by_hand=True
                    )

    def _keep(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: _ManualBatch
    ) -> None:
        """Keep the batch for the windows of later steps (the kept batches stay contiguous)."""
        if self._kept and self._kept[-1].number != record.number - 1:
            self._kept = []
        clear = frozenset(
            id(raw)
            for raw in _raw_optimizers(trainer)
            if not _holds_gradients(record.held, params_of(pl_module, raw))
        )
        self._kept.append(_Kept(record.number, record.micro.batch, record.first, clear))
        del self._kept[:-MAX_KEPT_BATCHES]

    def _window_of(
        self, trainer: pl.Trainer, record: _ManualBatch, raw: Any, cleared: bool
    ) -> list[Any] | None:
        """The batches whose gradients an optimizer step of ``record``'s batch applied, in
        order, that batch last; None when the check did not see where the window began."""
        kept = self._kept
        if not kept or kept[-1].number != record.number:  # _keep ran for this batch
            return None
        if cleared or id(raw) in kept[-1].clear:
            return [record.micro.batch]  # zero_grad before the step, or nothing accumulated
        single = len(trainer.optimizers) == 1
        for j in range(len(kept) - 2, -1, -1):
            entry = kept[j]
            if (
                id(raw) in entry.clear
                or self._last_stepped.get(id(raw)) == entry.number - 1
                or (entry.first and single)
            ):
                return [k.batch for k in kept[j:]]
        return None


def _holds_gradients(held: dict[str, Tensor], params: dict[str, Tensor]) -> bool:
    grads = [held[n] for n in params if n in held]
    return bool(grads) and bool(torch.stack([g.ne(0).any() for g in grads]).any())


def _batch_number(trainer: pl.Trainer, previous: int) -> int:
    """The trainer's count of training batches across epochs (the previous number plus one
    where the loop does not say)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    number = getattr(loop, "total_batch_idx", None)
    return number if isinstance(number, int) else previous + 1


def _raw_optimizers(trainer: pl.Trainer) -> list[Any]:
    return [getattr(o, "_optimizer", o) for o in trainer.optimizers]

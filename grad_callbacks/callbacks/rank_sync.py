"""RankSyncCheck: under data parallelism, every rank steps on the same gradients and holds the
same parameters.

A thin adapter over :mod:`grad_callbacks.core.rank_sync`: at scheduled optimizer steps, an
optimizer step post-hook fingerprints the gradients each optimizer stepped on and its
parameters after the step; at the end of the batch every rank enters one ``all_gather`` of
those rows, compares them with rank 0's on the device and reads one small tensor. Only when
something differs is more read, to name the parameters, the ranks and the likely cause.

Example:
    >>> import lightning as L
    >>> check = RankSyncCheck(every_n_steps=25)
    >>> trainer = L.Trainer(callbacks=[check], strategy="ddp", devices=2)  # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any

import lightning.pytorch as pl
import torch

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.distributed import is_distributed
from grad_callbacks.core.rank_sync import (
    Comparison,
    RowDifference,
    all_gather_rows,
    compare,
    next_check,
    not_stepped_rows,
    pack,
    step_rows,
    summary,
)
from grad_callbacks.findings import make_finding, name_list

#: Likely causes of a desync, by kind: (what happened, the fix).
CAUSES: dict[str, tuple[str, str]] = {
    "unfrozen-after-wrapping": (
        "these parameters did not require grad when DDP wrapped the model and were unfrozen "
        "later (Lightning's BackboneFinetuning or BaseFinetuning under DDP, or "
        "requires_grad_(True) after fit started): DDP registers only the parameters that "
        "require grad at wrapping, so it never averages their gradients and each rank trains "
        "its own copy",
        "keep every parameter trainable from the start and freeze with a zero learning rate "
        "instead (a param group with lr=0 until the milestone, raised by an LR scheduler), or "
        "set the freezing before fit and never change it; BackboneFinetuning cannot be used "
        "under DDP (Lightning-AI/pytorch-lightning#20340)",
    ),
    "created-after-wrapping": (
        "these parameters were created (or added to the optimizer from outside the model) "
        "after DDP wrapped the model: DDP neither broadcast their initial values nor averages "
        "their gradients",
        "create every parameter in __init__ or configure_model, before fit, so that DDP "
        "registers it",
    ),
    "no-sync": (
        "no_sync() was still active for the backward pass of the micro-batch that stepped: "
        "DDP skipped the gradient all-reduce, so each rank stepped on its own gradients",
        "leave no_sync() for the last micro-batch of each accumulation window: run its "
        "backward pass outside the no_sync() block (or use accumulate_grad_batches in "
        "automatic optimization)",
    ),
    "no-reduction": (
        "none of the gradients DDP reduces agree between ranks: no all-reduce happened for "
        "this step (no_sync() left on, or the forward pass called the unwrapped module "
        "instead of the DDP wrapper)",
        "call the model through the DDP wrapper and leave no_sync() for the micro-batch that steps",
    ),
    "edited-after-reduction": (
        "DDP reduced these gradients, and they differ afterwards: a per-rank edit of the "
        "gradients after the reduction (a hook, callback or on_before_optimizer_step that "
        "changes .grad on some ranks only, rank-dependent clipping or scaling), or a faulty "
        "interconnect that corrupted them in transfer",
        "make every gradient edit after backward identical on every rank (or do it before "
        "the reduction, in the loss); if no code edits them, test the interconnect (NCCL "
        "tests, TORCH_DISTRIBUTED_DEBUG=DETAIL) and the hardware of the ranks named",
    ),
    "params-only": (
        "the gradients agree but the parameters after the step do not: they differed "
        "before this step (loaded, initialised or edited per rank after DDP wrapped the "
        "model, so never broadcast), or the optimizer state or hyperparameters differ between "
        "ranks",
        "load checkpoints and change parameters, optimizer state and learning rates the same "
        "way on every rank, before fit or in hooks every rank runs",
    ),
    "step-skipped": (
        "the optimizer stepped on some ranks only (a GradScaler that skipped the step on "
        "ranks whose gradients were not finite, or a step taken in a rank-dependent branch)",
        "make the decision to step identical on every rank",
    ),
}

# Rows kept above the parameters counted at the start (a few parameters added later).
_SPARE_ROWS = 8
# Checked steps listed in the report (the count is exact beyond it).
_MAX_LISTED_STEPS = 1000


class RankSyncCheck(AuditCallback):
    """Checks that data-parallel ranks step on the same gradients and hold the same parameters.

    Active only when the run has more than one process (DDP); on a single process it installs
    nothing and costs one attribute test per Lightning hook. Under a strategy that shards
    parameters (FSDP, DeepSpeed) it reports ``check-skipped`` once.

    At each scheduled optimizer step (the first ``first_steps`` steps, then every multiple of
    ``every_n_steps``, a function of ``global_step`` only, so that every rank enters the
    collective at the same batches), for every optimizer that steps:

    * (a) the gradient the optimizer stepped on, after the DDP reduction, AMP unscaling and
      clipping, and (b) the parameter right after the step are fingerprinted on the device
      (:func:`~grad_callbacks.core.fingerprint.fingerprints`: any single differing element
      changes it), in an optimizer step post-hook;
    * at the end of the batch, one ``all_gather`` of those rows, a comparison with rank 0's on
      the device, and one read of two numbers. Exact comparison is right for DDP: the reduced
      gradients are bitwise identical on every rank, and so are parameters after identical
      steps.

    Micro-batches that do not step (accumulation) are not compared: the check stays armed
    until the step. Buffers (BatchNorm running statistics, which differ legitimately with
    ``broadcast_buffers=False``) are not compared.

    ``rank-desync`` (error) names the parameters, the ranks that disagree with rank 0, the
    first step, whether the gradients or only the parameters differ, and the likely cause
    with its fix: parameters unfrozen after DDP wrapped the model (``BackboneFinetuning`` under
    DDP), parameters created after wrapping, ``no_sync()`` left on for the micro-batch that
    steps, per-rank gradient edits after the reduction or a faulty interconnect. Each
    parameter is named once, in the first finding that shows it out of sync.

    Cost: nothing on unscheduled steps (one Python call in the step post-hook, no
    synchronisation); on a checked step, the fingerprints of the stepping optimizers'
    gradients and parameters (about 20 element-wise int32 kernels per element, see
    ``benchmarks/rank_sync.py``), one ``all_gather`` of 48 bytes per parameter tensor and rank,
    and one host read. Found within ``every_n_steps`` optimizer steps of its onset (a desync
    that persists: parameters that drifted apart stay apart).

    Scalars at checked steps: ``grad_audit/rank_sync/differing_params`` and
    ``grad_audit/rank_sync/max_norm_gap`` (the largest difference between a rank's and rank
    0's L2 norm of a differing gradient or parameter: a lower bound of how far apart they are;
    0 where all agree). The report lists the steps checked.

    Args:
        every_n_steps: check every this many optimizer steps (default 16).
        first_steps: also check each of the first this many steps (default 2).
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.

    Example:
        >>> RankSyncCheck(every_n_steps=25).settings()["first_steps"]
        2
    """

    check_name = "RankSyncCheck"
    metric_prefix = "rank_sync"
    live_attributes = (
        "_optimizers",
        "_handles",
        "_taken",
        "_module",
        "_ddp",
        "_wrapped",
        "_reduced",
        "_layout_key",
        "_layout",
    )

    def __init__(
        self, *, every_n_steps: int = 16, first_steps: int = 2, on_finding: OnFinding = "warn"
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, on_finding=on_finding)
        if not isinstance(first_steps, int) or first_steps < 0:
            raise ValueError(f"first_steps must be a non-negative int, got {first_steps!r}")
        self.first_steps = first_steps
        self._active = False
        self._armed = False
        self._start_step = 0
        self._next_due = 0
        self._capacity = 0
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._taken: dict[int, tuple[int, torch.Tensor, bool | None]] = {}
        self._error = False
        self._module: torch.nn.Module | None = None
        self._wrapped: set[int] | None = None  # parameters of the model when DDP wrapped it
        self._reduced: set[int] | None = None  # those DDP's reducer averages
        self._ddp: Any = None
        self._synced_backward: bool | None = None
        self._layout_key: tuple[int, ...] = ()
        self._layout: tuple[int, list[torch.Tensor], list[str]] | None = None
        self._reported: set[str] = set()
        self._checked: list[int] = []
        self._hook_seconds = 0.0

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "first_steps": self.first_steps}

    def extra_state(self) -> dict[str, Any]:
        return {"reported": sorted(self._reported), "checked": self._checked[-_MAX_LISTED_STEPS:]}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._reported = set(state.get("reported", []))
        self._checked = [int(s) for s in state.get("checked", [])]

    def report_entry(self) -> dict[str, Any]:
        entry = super().report_entry()
        entry["checked_steps"] = self._checked[:_MAX_LISTED_STEPS]
        entry["schedule"] = {
            "first_steps": self.first_steps,
            "every_n_steps": self.every_n_steps,
            "active": self._active,
        }
        return entry

    def scalar_charts(self) -> dict[str, list[str]]:
        """The check's chart, only where it compares ranks (no empty chart on one process)."""
        if not self._active:
            return {}
        return {"Rank sync": ["grad_audit/rank_sync/.*"]}

    @property
    def outside_seconds(self) -> float:
        # The fingerprints are taken in the optimizers' step post-hooks.
        return self._hook_seconds

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._active = not self._inactive and is_distributed(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        # What DDP registered when it wrapped the model (just before this hook): which
        # parameters it broadcast, and which its reducer averages.
        wrapper = trainer.strategy.model
        module = getattr(wrapper, "module", None)
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and module is not None:
            ignored = set(getattr(wrapper, "parameters_to_ignore", ()))
            named = list(module.named_parameters())
            self._ddp = wrapper
            self._wrapped = {id(p) for _, p in named}
            self._reduced = {id(p) for n, p in named if p.requires_grad and n not in ignored}
        else:
            self._ddp = self._wrapped = self._reduced = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._active:
            return
        self._module = pl_module
        self._optimizers = list(trainer.optimizers)
        self._armed = False
        self._taken = {}
        self._next_due = next_check(trainer.global_step, self.every_n_steps, self.first_steps)
        rows = len({id(p) for p in pl_module.parameters()} | {id(p) for p in self._params()})
        # Every rank must send the same number of rows: agree on the largest (once per fit).
        size = torch.tensor([rows + _SPARE_ROWS], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        self._capacity = int(size.item())
        self.release()
        for index, optimizer in enumerate(self._optimizers):
            self._handles.append(optimizer.register_step_post_hook(self._post_hook(index)))

    def next_busy_step(self, step: int) -> int | None:
        # Under DDP every rank calls it at every batch (its collectives need the same batches).
        return step if self._active or self._pending_scalars else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._active:
            self._start_step = trainer.global_step
            if not self._armed and self._start_step >= self._next_due:
                self._armed = True
                self._synced_backward = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._armed and self._ddp is not None:
            # DDP decides at backward time (Lightning's pre_backward) whether to all-reduce.
            self._synced_backward = bool(getattr(self._ddp, "require_backward_grad_sync", True))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Entered by every rank at the same batches: the end of the first batch that stepped
        # since the scheduled step came due (global_step is the same on every rank).
        if self._active and self._armed and trainer.global_step > self._start_step:
            with self.timed():
                self._check(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._module = None
        self._ddp = None
        self._layout_key, self._layout = (), None

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ internals
    def _params(self, index: int | None = None) -> list[torch.Tensor]:
        optimizers = self._optimizers if index is None else [self._optimizers[index]]
        return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]

    def _post_hook(self, index: int) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not self._armed:
                return
            started = perf_counter()
            try:
                with self.guarded("fingerprinting the step"):
                    step = self._trainer.global_step if self._trainer is not None else 0
                    rows = step_rows(self._params(index))
                    if index not in self._taken:
                        self._taken[index] = (step, rows, self._synced_backward)
                    else:  # a second step of this optimizer in the batch: compare the last
                        self._taken[index] = (self._taken[index][0], rows, self._synced_backward)
                    return
                self._error = True
            finally:
                self._hook_seconds += perf_counter() - started

        return hook

    def _describe_layout(self) -> tuple[int, list[torch.Tensor], list[str]]:
        params = self._params()
        key = tuple(id(p) for p in params)
        if key != self._layout_key or self._layout is None:
            # Named when the layout changes: parameters may be added after the start.
            known: dict[int, str] = {}
            for name, p in self._module.named_parameters() if self._module is not None else ():
                known.setdefault(id(p), name)
            names = [
                known.get(id(p), f"optimizer{i}.param{j}")
                for i in range(len(self._optimizers))
                for j, p in enumerate(self._params(i))
            ]
            text = ";".join(
                f"{n}|{tuple(p.shape)}|{p.dtype}" for n, p in zip(names, params, strict=True)
            )
            self._layout_key = key
            self._layout = (zlib.crc32(text.encode()), params, names)
        return self._layout

    def _send_buffer(self, trainer: pl.Trainer) -> tuple[torch.Tensor, int]:
        layout = self._describe_layout()[0]
        device = trainer.strategy.root_device
        parts = []
        for index in range(len(self._optimizers)):
            taken = self._taken.get(index)
            if taken is None:
                parts.append(not_stepped_rows(len(self._params(index)), device))
            else:
                parts.append(taken[1].to(device))
        steps = [taken[0] for taken in self._taken.values()]
        step = min(steps) if steps else self._start_step
        rows = torch.cat(parts) if parts else not_stepped_rows(0, device)
        return pack(rows, layout=layout, step=step, capacity=self._capacity), step

    def _check(self, trainer: pl.Trainer) -> None:
        step = self._start_step
        mine: torch.Tensor | None = None
        if not self._error:
            with self.guarded("describing the step"):
                mine, step = self._send_buffer(trainer)
        if mine is None:  # still enter the collective, flagged: the others must not wait
            mine = pack(
                not_stepped_rows(0, trainer.strategy.root_device),
                layout=0,
                step=step,
                capacity=self._capacity,
                error=True,
            )
        taken = dict(self._taken)
        self._armed, self._taken, self._error = False, {}, False
        self._next_due = next_check(trainer.global_step, self.every_n_steps, self.first_steps)
        gathered = all_gather_rows(mine, trainer.world_size)
        with self.guarded("comparing the ranks"):
            differs, most_rows = summary(gathered).tolist()  # the one read of a checked step
            capacity = self._capacity
            if most_rows > capacity:  # some rank has more rows: every rank grows alike
                self._capacity = int(most_rows) + _SPARE_ROWS
            if not taken and not differs:
                return  # no optimizer stepped here (a skipped AMP step) on any rank
            self.steps_checked += 1
            self._checked.append(step)
            result = compare(gathered, capacity) if differs else Comparison()
            self.queue_scalars(
                {"differing_params": len(result.rows), "max_norm_gap": result.max_gap},
                step=step,
            )
            if differs:
                self._report_comparison(result, step, taken)

    def _report_comparison(
        self,
        result: Comparison,
        step: int,
        taken: Mapping[int, tuple[int, torch.Tensor, bool | None]],
    ) -> None:
        if result.error_ranks:
            return  # those ranks reported check-skipped with their error
        if result.layout_ranks:
            self._report(
                step,
                (),
                result.layout_ranks,
                "layout",
                "the optimizers hold different parameter lists (names, shapes, dtypes or "
                "count) on these ranks than on rank 0: the ranks train different models",
                "build the model and its optimizers the same way on every rank",
                {},
            )
            return
        _, params, names = self._describe_layout()
        by_cause: dict[str, list[RowDifference]] = {}
        for row in result.rows:
            if row.index >= len(params) or names[row.index] in self._reported:
                continue
            cause = self._cause(row, params, result, taken)
            by_cause.setdefault(cause, []).append(row)
        for cause, rows in by_cause.items():
            what, fix = CAUSES[cause]
            self._report(
                step,
                tuple(names[r.index] for r in rows),
                tuple(sorted({rank for r in rows for rank in (*r.grad_ranks, *r.param_ranks)})),
                cause,
                what,
                fix,
                {
                    "grad_params": [names[r.index] for r in rows if r.grad_ranks],
                    "max_norm_gap": max(max(r.grad_gap, r.param_gap) for r in rows),
                    "stepped_ranks": sorted({k for r in rows for k in r.stepped_ranks}),
                },
            )

    def _cause(
        self,
        row: RowDifference,
        params: list[torch.Tensor],
        result: Comparison,
        taken: Mapping[int, tuple[int, torch.Tensor, bool | None]],
    ) -> str:
        p = params[row.index]
        if row.stepped_ranks:
            return "step-skipped"
        if self._wrapped and id(p) not in self._wrapped:
            return "created-after-wrapping"
        if self._reduced and id(p) not in self._reduced:
            return "unfrozen-after-wrapping"
        if not row.grad_ranks:
            return "params-only"
        if any(synced is False for _, _, synced in taken.values()):
            return "no-sync"
        if self._reduced:
            # Every gradient DDP reduces differs: no all-reduce happened at all.
            reduced = {i for i in result.with_grad if id(params[i]) in self._reduced}
            if reduced and reduced <= {r.index for r in result.rows if r.grad_ranks}:
                return "no-reduction"
        return "edited-after-reduction"

    def _report(
        self,
        step: int,
        params: tuple[str, ...],
        ranks: tuple[int, ...],
        cause: str,
        what: str,
        fix: str,
        data: dict[str, Any],
    ) -> None:
        self._reported.update(params)
        grads = data.get("grad_params", [])
        if not params:
            differ = "the parameter lists"
        elif grads:
            differ = (
                "the gradients the optimizer stepped on and the parameters after the step"
                if len(grads) == len(params)
                else f"the gradients of {len(grads)} of them and the parameters after the step"
            )
        else:
            differ = "the parameters after the step (the gradients agree)"
        named = f" for {len(params)} parameter(s): {name_list(list(params))}" if params else ""
        self.report(
            make_finding(
                "rank-desync",
                check=self.check_name,
                step=step,
                params=params,
                message=(
                    f"Replicas out of sync at step {step}: {differ} differ between rank 0 and "
                    f"rank(s) {', '.join(map(str, ranks))}{named}. The ranks train different "
                    f"models. Likely cause: {what}. Fix: {fix}."
                ),
                data={"desynced_ranks": list(ranks), "cause": cause, **data},
            )
        )

"""What the checks need to know about the training strategy.

* :func:`sharded_strategy`: whether the strategy shards parameters or gradients across
  processes (FSDP, DeepSpeed, tensor parallelism), where checks that read whole gradients cannot
  run;
* :func:`is_distributed`, :func:`any_rank` and :func:`gather_objects`: small collectives that
  every rank must enter together (never from a branch only some ranks take).

Example:
    >>> import lightning as L
    >>> sharded_strategy(L.Trainer(accelerator="cpu", logger=False)) is None
    True
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


def _sharded_strategy_types() -> dict[type, str]:
    """Strategy classes that shard the model, with how to name them in a message."""
    from lightning.pytorch import strategies

    found: dict[type, str] = {}
    for attr, label in (
        ("FSDPStrategy", "FSDP"),
        ("DeepSpeedStrategy", "DeepSpeed"),
        ("ModelParallelStrategy", "ModelParallelStrategy (DTensor sharding)"),
    ):
        cls = getattr(strategies, attr, None)
        if isinstance(cls, type):
            found[cls] = label
    return found


#: Strategy class -> name used in messages; extendable for custom sharding strategies.
SHARDED_STRATEGIES: dict[type, str] = _sharded_strategy_types()


def sharded_strategy(trainer: pl.Trainer) -> str | None:
    """The name of the trainer's strategy when it shards parameters or gradients, else None.

    Under FSDP and DeepSpeed each process holds a shard of the gradients (or, with DeepSpeed,
    gradients live in the engine's own buffers, not in ``.grad``), so a check that reads whole
    gradients would see partial ones and raise false alarms.
    """
    strategy = getattr(trainer, "strategy", None)
    for cls, label in SHARDED_STRATEGIES.items():
        if isinstance(strategy, cls):
            return label
    return None


def is_distributed(trainer: pl.Trainer | None) -> bool:
    """Whether ``trainer`` runs several processes with an initialised process group."""
    return (
        trainer is not None
        and trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def any_rank(flag: bool, trainer: pl.Trainer) -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce every rank must enter)."""
    tensor = torch.tensor([int(flag)], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any, trainer: pl.Trainer) -> list[Any]:
    """Every rank's ``obj``, in rank order (an all-gather every rank must enter)."""
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered

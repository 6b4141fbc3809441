"""Per-sample gradients through ``torch.func.vmap(torch.func.grad(f))``, chunk by chunk.

``f`` runs the user's loss on one sample through ``functional_call`` with detached parameters and
*copies* of the buffers, so in-place buffer updates never reach the live module.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from grad_callbacks.core.batch import FlatBatch
from grad_callbacks.core.per_sample.loss import GradChunks, LossFn, _LossModule
from grad_callbacks.core.per_sample.types import Randomness

_NO_BATCH_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def _vmap_chunks(
    module: nn.Module,
    loss_fn: LossFn,
    flat: FlatBatch,
    params: dict[str, Tensor],
    module_names: dict[str, str],
    chunk_size: int,
    randomness: Randomness,
) -> GradChunks:
    from torch.func import functional_call, grad, vmap

    if flat.has_sample_lists:
        raise TypeError(
            "the batch holds per-sample Python values (a list of batch-size length), which "
            "vmap cannot split"
        )
    wrapper = _LossModule(module, loss_fn)
    diff_ids = {id(p) for p in params.values()}
    # Every other tensor of the module is passed too, detached (parameters) or cloned (buffers),
    # so nothing inside the call can build a graph on, or write to, the live module. Buffers are
    # inputs of the transformed function, not captured tensors, so in-place updates are allowed;
    # the running stats of train-mode norm layers get one copy per sample (vmapped), since each
    # sample updates them with its own statistics.
    frozen = {
        f"inner.{n}": p.detach() for n, p in module.named_parameters() if id(p) not in diff_ids
    }
    per_sample_bufs = _running_stat_names(module)
    shared_bufs: dict[str, Tensor] = {}
    sample_bufs: dict[str, Tensor] = {}
    for n, b in module.named_buffers():
        (sample_bufs if n in per_sample_bufs else shared_bufs)[f"inner.{n}"] = b.detach().clone()
    keys = list(params)

    def sample_loss(
        diff: dict[str, Tensor],
        sample: list[Tensor],
        shared: dict[str, Tensor],
        own: dict[str, Tensor],
    ) -> Tensor:
        tensors = {f"inner.{module_names[k]}": diff[k] for k in keys}
        tensors.update(frozen)
        tensors.update(shared)
        tensors.update(own)
        batch_of_one = flat.rebuild([t.unsqueeze(0) for t in sample])
        return functional_call(wrapper, tensors, (batch_of_one,))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, None, 0), randomness=randomness)
    detached = {k: p.detach() for k, p in params.items()}
    for start in range(0, flat.size, chunk_size):
        chunk = [t[start : start + chunk_size] for t in flat.tensors]
        c = min(chunk_size, flat.size - start)
        own = {k: b.unsqueeze(0).expand(c, *b.shape).clone() for k, b in sample_bufs.items()}
        with warnings.catch_warnings():
            # Ops without a batching rule (LSTM, CPU flash attention, ...) run through vmap's
            # per-sample fallback: correct, only slower; not worth a warning in a training run.
            warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
            grads = per_sample(detached, chunk, shared_bufs, own)
        yield start, grads


def _running_stat_names(module: nn.Module) -> set[str]:
    """Names of the running-stat buffers that train-mode norm layers update in place."""
    names = set()
    for prefix, m in module.named_modules():
        if isinstance(m, _NormBase) and m.training and m.track_running_stats:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, b, None) is not None:
                    names.add(f"{prefix}.{b}" if prefix else b)
    return names

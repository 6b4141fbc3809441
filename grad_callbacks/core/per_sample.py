"""Per-sample gradients of a module, reduced to streaming statistics.

Pure torch (no Lightning). :func:`per_sample_grad_stats` computes the gradient of the loss of every
sample of a batch with respect to a module's parameters and keeps only what the gradient checks
need: the sum over samples, per-sample squared norms, a per-sample non-finite mask and
per-parameter sums of squared norms. Extra memory is bounded by ``chunk_size`` per-sample
gradients, never by the batch size.

Two ways to get there:

* ``"vmap"``: ``torch.func.vmap(torch.func.grad(f))`` over chunks of the batch, where ``f`` runs the
  user's loss on one sample through ``torch.func.functional_call`` with detached parameters and
  *copies* of the buffers, so in-place buffer updates never reach the live module. Ops without a
  batching rule (``nn.LSTM``, CPU flash attention in torch 2.13) still work through vmap's own
  per-sample fallback, only slower; its "performance drop" warning is silenced.
* ``"loop"``: one ``torch.autograd.grad`` call per sample on the live module (never
  ``.backward()``, so no ``.grad`` is written), with every buffer snapshotted before and restored
  after. It runs what vmap cannot: data-dependent control flow (``if x.sum() > 0``), ``.item()``,
  in-place writes into tensors captured from outside, random ops under ``randomness="error"``,
  batches holding per-sample Python values (a list of B strings).

``"auto"`` tries vmap and falls back to the loop on any exception, recording why.

Random ops: under vmap, ``randomness="same"`` draws once per chunk (so dropout masks, and results,
depend on ``chunk_size``), ``"different"`` once per sample; the loop draws once per sample.

``torch.compile``: a compiled module (or one holding compiled submodules) is run eagerly here
(:func:`run_eagerly`): called with swapped, detached parameters, under vmap or with one sample at a
time, compiled code would fail its guards and recompile at every call, for nothing. The compiled
training graph is left as it was.

Non-invasive: no ``.grad``, ``requires_grad``, buffer or train/eval flag of the module is changed.
Random number streams are NOT protected here: dropout and other random ops consume the global RNG
(a failed vmap attempt too). Callers that need bitwise-identical training fork the RNG around the
call (``torch.random.fork_rng``).

BatchNorm in train mode: each sample is normalised with its own statistics (a batch of one), so
per-sample gradients differ from the batch gradient's decomposition by design (samples interact
through the batch statistics). Under vmap every sample updates its own copy of the running
statistics, so ``BatchNorm2d`` on ``(1, C, H, W)`` samples works. ``BatchNorm1d`` on ``(1, C)``
samples cannot work (one value per channel: "Expected more than 1 value per channel when
training", in vmap and in the loop alike). With ``eval_batchnorm=True`` (or inside
:func:`batchnorm_eval`) BatchNorm layers use their running statistics instead; the gradients are
then those of the eval-mode network. ``torch.func.replace_all_batch_norm_modules_`` is never used:
it mutates the module.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])
    >>> stats = per_sample_grad_stats(model, loss_fn, (x, y))
    >>> stats.method, stats.n, stats.n_finite, tuple(stats.sq_norms.shape)
    ('vmap', 8, 8, (8,))
    >>> batch_grad = torch.autograd.grad(loss_fn(model, (x, y)), model.weight)[0]
    >>> torch.allclose(stats.mean_grad["weight"], batch_grad, atol=1e-6)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from grad_callbacks.core.batch import FlatBatch, flatten_batch, slice_batch
from grad_callbacks.core.state import restored_state

LossFn = Callable[[nn.Module, Any], Tensor]
Method = Literal["auto", "vmap", "loop"]
Randomness = Literal["error", "same", "different"]

__all__ = [
    "PerSampleGradError",
    "PerSampleStats",
    "ScaleFit",
    "batchnorm_eval",
    "fit_scale",
    "gradient_noise_scale",
    "loss_grad",
    "per_sample_grad_stats",
    "per_sample_grads",
    "run_eagerly",
]


class PerSampleGradError(RuntimeError):
    """Per-sample gradients could not be computed by any method (the reasons are in the message)."""


@dataclass
class PerSampleStats:
    """Streaming statistics of the per-sample gradients of one batch.

    Every tensor stays on the module's device; reading :attr:`n_finite` synchronises with it.

    Attributes:
        method: how the gradients were computed, ``"vmap"`` or ``"loop"``.
        fallback_reason: why ``"auto"`` fell back to the loop (``"ExcType: first line"``), or
            None.
        n: number of samples in the batch.
        finite_count: 0-dim integer tensor, the number of samples whose gradient is finite.
        grad_sum: per parameter, the sum of the finite samples' gradients (accumulated in at least
            float32).
        sq_norms: ``[n]``, each sample's squared gradient norm over all parameters (NaN or inf for
            non-finite samples).
        nonfinite: ``[n]`` bool, whether a sample's gradient holds a NaN or inf.
        param_sq_norm_sum: per parameter, the sum over finite samples of ``||g_i[p]||^2``.
    """

    method: str
    fallback_reason: str | None
    n: int
    finite_count: Tensor
    grad_sum: dict[str, Tensor]
    sq_norms: Tensor
    nonfinite: Tensor
    param_sq_norm_sum: dict[str, Tensor]

    @property
    def n_finite(self) -> int:
        """Number of samples with a finite gradient (one host-device synchronisation)."""
        return int(self.finite_count)

    @property
    def mean_grad(self) -> dict[str, Tensor]:
        """Per parameter, the mean gradient over the finite samples (NaN if there are none)."""
        return {k: v / self.finite_count for k, v in self.grad_sum.items()}


@dataclass
class ScaleFit:
    """Least-squares fit ``batch_grad ~ scale * mean_grad`` over all parameters jointly.

    All fields are tensors on the gradients' device.

    Attributes:
        scale: ``c = <g, m> / <m, m>``.
        residual: ``||g - c m|| / ||g||`` over all parameters (0 when g is an exact multiple of m).
        param_residual: per parameter, ``||g_p - c m_p|| / ||g||``; their squares sum to
            ``residual ** 2``, so they say which parameters carry the misfit.
        cosine: cosine similarity of ``g`` and ``m``.
        batch_norm: ``||g||``.
        mean_norm: ``||m||``.
    """

    scale: Tensor
    residual: Tensor
    param_residual: dict[str, Tensor]
    cosine: Tensor
    batch_norm: Tensor
    mean_norm: Tensor


@contextmanager
def batchnorm_eval(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every BatchNorm submodule of ``module`` in eval mode.

    Only the ``training`` flag of ``_BatchNorm`` modules (BatchNorm1d/2d/3d, SyncBatchNorm, lazy
    variants) is touched, and each is restored to its own previous value on exit, even on error.
    In eval mode they normalise with their running statistics and do not update them, which makes
    per-sample gradients well defined and vmap-able.

    Args:
        module: the module to act on; it is yielded back.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> with batchnorm_eval(net):
        ...     net[1].training, net[0].training
        (False, True)
        >>> net[1].training
        True
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    flags = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield module
    finally:
        for m, flag in zip(norms, flags, strict=True):
            m.training = flag


@contextmanager
def run_eagerly() -> Iterator[None]:
    """Run ``torch.compile``d code called inside the block as plain eager code.

    Recomputations call the user's compiled modules in ways the compiled graph was not built
    for (parameters swapped by ``functional_call``, under ``vmap``, inputs that require grad,
    float64 copies, ``no_grad``): compiled, every call would fail a guard and recompile, slowly,
    until the recompile limit, for graphs never used again. Under
    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) they run eagerly and the
    compiled training graph is neither recompiled nor replaced. A no-op on older torch, and
    while dynamo is tracing the caller (the stance cannot change inside a compiled region).

    Example:
        >>> net = torch.compile(torch.nn.Linear(2, 1))
        >>> with run_eagerly():  # no compilation happens here
        ...     out = net(torch.ones(3, 2))
        >>> out.shape
        torch.Size([3, 1])
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield


# ---------------------------------------------------------------------------------- helpers
def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _resolve_params(
    module: nn.Module, params: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The parameters to differentiate, and for each its name in ``module``."""
    if params is None:
        chosen = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not chosen:
            raise ValueError("the module has no parameter with requires_grad=True")
        return chosen, {n: n for n in chosen}
    names = {id(p): n for n, p in module.named_parameters()}
    module_names = {}
    for key, p in params.items():
        if id(p) not in names:
            raise ValueError(f"params[{key!r}] is not a parameter of the module")
        module_names[key] = names[id(p)]
    if not params:
        raise ValueError("params is empty")
    return dict(params), module_names


class _LossModule(nn.Module):
    """``loss_fn(inner, batch)`` as a module, so ``functional_call`` can swap the inner
    module's tensors for the duration of any user code (not just ``inner.forward``)."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return _scalar(self._loss_fn(self.inner, batch))


# ---------------------------------------------------------------------------------- sources
GradChunks = Iterator[tuple[int, dict[str, Tensor]]]
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


def _loop_chunks(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    n: int,
    params: dict[str, Tensor],
    module_names: dict[str, str],
    chunk_size: int,
) -> GradChunks:
    named = (params, module_names)
    with restored_state(module):
        for start in range(0, n, chunk_size):
            rows = [
                _hook_free_grad(module, loss_fn, slice_batch(batch, i, size=n), *named)
                for i in range(start, min(start + chunk_size, n))
            ]
            yield start, {k: torch.stack([r[k] for r in rows]) for k in params}


def _hook_free_grad(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: dict[str, Tensor],
    module_names: dict[str, str],
) -> dict[str, Tensor]:
    """The gradient of ``loss_fn(module, batch)`` w.r.t. detached copies of ``params``.

    Hooks on the live parameters do not apply to the copies, so the vmap path, the loop and the
    batch gradient all see the loss's own gradient (a rescaling hook is the optimizer gradient's
    business, not the per-sample comparison's).
    """
    from torch.func import functional_call

    detached = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    tensors = {f"inner.{module_names[k]}": v for k, v in detached.items()}
    with torch.enable_grad():
        loss = functional_call(_LossModule(module, loss_fn), tensors, (batch,))
        grads = torch.autograd.grad(loss, list(detached.values()), allow_unused=True)
    return {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(detached.items(), grads, strict=True)
    }


# ---------------------------------------------------------------------------------- sinks
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _StatsSink:
    def __init__(self, params: dict[str, Tensor], n: int) -> None:
        self.n = n
        dtypes = [_acc_dtype(p.dtype) for p in params.values()]
        dtype = dtypes[0]
        for d in dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        device = next(iter(params.values())).device
        self.shapes = {k: p.shape for k, p in params.items()}
        # Row 1 accumulates the finite samples' gradients and row 0 the others (discarded): one
        # index_add_ pass, where a masked sum would first copy every per-sample gradient.
        self.sums = {
            k: torch.zeros(2, p.numel(), dtype=_acc_dtype(p.dtype), device=p.device)
            for k, p in params.items()
        }
        self.param_sq = {k: torch.zeros((), dtype=dtype, device=device) for k in params}
        self.sq_norms = torch.zeros(n, dtype=dtype, device=device)
        self.nonfinite = torch.zeros(n, dtype=torch.bool, device=device)

    def add(self, start: int, grads: dict[str, Tensor]) -> None:
        c = next(iter(grads.values())).shape[0]
        dtype = self.sq_norms.dtype
        flats = {k: g.reshape(c, -1) for k, g in grads.items()}
        total = torch.zeros(c, dtype=dtype, device=self.sq_norms.device)
        bad = torch.zeros(c, dtype=torch.bool, device=self.sq_norms.device)
        sq: dict[str, Tensor] = {}
        for k, f in flats.items():
            sq[k] = torch.linalg.vector_norm(f, dim=1, dtype=dtype).square()
            total += sq[k]
            # A row holding a NaN or inf has a NaN or inf sum (cheaper than isfinite().all()).
            bad |= ~torch.isfinite(f.sum(1, dtype=dtype))
        ok = ~bad
        slot = ok.long()
        for k, f in flats.items():
            self.sums[k].index_add_(0, slot, f.to(self.sums[k].dtype))
            self.param_sq[k] += torch.where(ok, sq[k], 0).sum()
        self.sq_norms[start : start + c] = total
        self.nonfinite[start : start + c] = bad

    def result(self, method: str, reason: str | None) -> PerSampleStats:
        return PerSampleStats(
            method=method,
            fallback_reason=reason,
            n=self.n,
            finite_count=self.n - self.nonfinite.sum(),
            grad_sum={k: s[1].reshape(self.shapes[k]).clone() for k, s in self.sums.items()},
            sq_norms=self.sq_norms,
            nonfinite=self.nonfinite,
            param_sq_norm_sum=self.param_sq,
        )


class _GradsSink:
    def __init__(self, params: dict[str, Tensor], n: int) -> None:
        self.grads = {k: p.new_zeros((n, *p.shape)) for k, p in params.items()}

    def add(self, start: int, grads: dict[str, Tensor]) -> None:
        for k, g in grads.items():
            self.grads[k][start : start + g.shape[0]] = g

    def result(self, method: str, reason: str | None) -> dict[str, Tensor]:
        return self.grads


# ---------------------------------------------------------------------------------- driver
def _run(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None,
    chunk_size: int,
    randomness: Randomness,
    method: Method,
    eval_batchnorm: bool,
    size: int | None,
    make_sink: Callable[[dict[str, Tensor], int], Any],
) -> Any:
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    chosen, module_names = _resolve_params(module, params)
    flat = flatten_batch(batch, size=size)
    reason: str | None = None
    with (
        run_eagerly(),
        batchnorm_eval(module) if eval_batchnorm else nullcontext(),
        torch.enable_grad(),
    ):
        if method in ("auto", "vmap"):
            sink = make_sink(chosen, flat.size)
            try:
                chunks = _vmap_chunks(
                    module, loss_fn, flat, chosen, module_names, chunk_size, randomness
                )
                for start, grads in chunks:
                    sink.add(start, grads)
                return sink.result("vmap", None)
            except Exception as exc:
                if method == "vmap":
                    raise
                reason = _describe(exc)
        sink = make_sink(chosen, flat.size)
        try:
            chunks = _loop_chunks(
                module, loss_fn, batch, flat.size, chosen, module_names, chunk_size
            )
            for start, grads in chunks:
                sink.add(start, grads)
        except Exception as exc:
            if method == "loop":
                raise
            raise PerSampleGradError(
                f"per-sample gradients failed with vmap ({reason}) and with the loop "
                f"({_describe(exc)})"
            ) from exc
        return sink.result("loop", reason)


def per_sample_grad_stats(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 32,
    randomness: Randomness = "same",
    method: Method = "auto",
    eval_batchnorm: bool = False,
    size: int | None = None,
) -> PerSampleStats:
    """Statistics of the per-sample gradients of ``loss_fn`` over ``batch``.

    Args:
        module: the model; none of its ``.grad``, ``requires_grad``, buffers or train/eval flags
            is changed.
        loss_fn: ``loss_fn(module, batch_of_one) -> scalar``, the loss of one sample given a batch
            of size 1 as :func:`~grad_callbacks.core.batch.slice_batch` makes it.
        batch: the batch (any nesting understood by :mod:`grad_callbacks.core.batch`).
        params: name -> parameter of ``module`` to differentiate; by default every parameter with
            ``requires_grad=True``. Results are keyed by these names.
        chunk_size: per-sample gradients held at once; bounds the extra memory.
        randomness: ``torch.func.vmap`` randomness for random ops such as dropout: ``"same"`` (one
            draw shared by the samples of a chunk), ``"different"`` or ``"error"``. The loop
            draws independently for every sample.
        method: ``"vmap"``, ``"loop"``, or ``"auto"`` (vmap, falling back to the loop on any
            exception; the reason is recorded in :attr:`PerSampleStats.fallback_reason`).
        eval_batchnorm: run with BatchNorm layers in eval mode (see :func:`batchnorm_eval`).
        size: the batch size, when the batch's tensors disagree about their leading dimension.

    Returns:
        A :class:`PerSampleStats` on the module's device (no host-device synchronisation).

    Raises:
        PerSampleGradError: with ``method="auto"``, when both vmap and the loop fail.
        ValueError: for bad arguments, or a batch whose size cannot be told.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, x: m(x).sum()
        >>> stats = per_sample_grad_stats(model, loss_fn, torch.ones(4, 2), method="loop")
        >>> stats.method, stats.mean_grad["weight"]
        ('loop', tensor([[1., 1.]]))
    """
    return _run(
        module,
        loss_fn,
        batch,
        params=params,
        chunk_size=chunk_size,
        randomness=randomness,
        method=method,
        eval_batchnorm=eval_batchnorm,
        size=size,
        make_sink=_StatsSink,
    )


def per_sample_grads(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 32,
    randomness: Randomness = "same",
    method: Method = "auto",
    eval_batchnorm: bool = False,
    size: int | None = None,
) -> dict[str, Tensor]:
    """Every per-sample gradient, materialised: name -> ``[B, *param.shape]``.

    Same arguments and guarantees as :func:`per_sample_grad_stats`, but memory grows with
    ``B x parameters``: meant for small models, debugging and tests.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> per_sample_grads(model, lambda m, b: m(b).sum(), x)["weight"]
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[3., 4.]]])
    """
    return _run(
        module,
        loss_fn,
        batch,
        params=params,
        chunk_size=chunk_size,
        randomness=randomness,
        method=method,
        eval_batchnorm=eval_batchnorm,
        size=size,
        make_sink=_GradsSink,
    )


# ---------------------------------------------------------------------------------- analysis
def fit_scale(batch_grad: Mapping[str, Tensor], mean_grad: Mapping[str, Tensor]) -> ScaleFit:
    """Fit ``batch_grad ~ c * mean_grad`` by least squares over all parameters jointly.

    ``c = <g, m> / <m, m>``. For a loss averaged over the batch and no coupling between samples,
    c = 1 and the residual is 0; for a summed loss c = B. A residual well above float noise means
    the batch gradient is not a multiple of the mean per-sample gradient (samples interact, e.g.
    through train-mode BatchNorm).

    Args:
        batch_grad: name -> gradient of the batch-reduced loss.
        mean_grad: name -> mean per-sample gradient; its keys must all be in ``batch_grad``.

    Returns:
        A :class:`ScaleFit` of tensors (no host-device synchronisation). ``scale`` is NaN when
        ``mean_grad`` is all zeros.

    Example:
        >>> import torch
        >>> m = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0])}
        >>> fit = fit_scale({k: 3 * v for k, v in m.items()}, m)
        >>> float(fit.scale), float(fit.residual), float(fit.cosine)
        (3.0, 0.0, 1.0)
    """
    missing = [k for k in mean_grad if k not in batch_grad]
    if missing:
        raise KeyError(f"batch_grad lacks {missing}")
    if not mean_grad:
        raise ValueError("no gradients to fit")
    keys = list(mean_grad)
    g = {k: batch_grad[k].detach().to(_acc_dtype(batch_grad[k].dtype)).flatten() for k in keys}
    m = {k: mean_grad[k].detach().to(g[k].dtype).flatten() for k in keys}
    gm = torch.stack([torch.dot(g[k], m[k]) for k in keys]).sum()
    mm = torch.stack([torch.dot(m[k], m[k]) for k in keys]).sum()
    gg = torch.stack([torch.dot(g[k], g[k]) for k in keys]).sum()
    c = gm / mm
    g_norm, m_norm = gg.sqrt(), mm.sqrt()
    param_res = {k: torch.linalg.vector_norm(g[k] - c * m[k]) / g_norm for k in keys}
    residual = torch.stack(list(param_res.values())).square().sum().sqrt()
    return ScaleFit(
        scale=c,
        residual=residual,
        param_residual=param_res,
        cosine=gm / (g_norm * m_norm),
        batch_norm=g_norm,
        mean_norm=m_norm,
    )


def gradient_noise_scale(stats: PerSampleStats) -> Tensor:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of one batch.

    ``G`` is the mean per-sample gradient and ``tr(Sigma)`` the unbiased estimate of the trace of
    the per-sample gradient covariance, ``(sum_i |g_i|^2 - n |G|^2) / (n - 1)``, over the finite
    samples (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). It estimates
    the batch size above which larger batches stop paying off.

    Args:
        stats: from :func:`per_sample_grad_stats`.

    Returns:
        A 0-dim tensor on the stats' device; NaN when fewer than 2 samples are finite.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> stats = per_sample_grad_stats(model, lambda m, b: m(b).sum(), x)
        >>> float(gradient_noise_scale(stats))  # grads 1 and 3: var 2, mean^2 4
        0.5
    """
    n = stats.finite_count
    sum_sq = torch.stack(list(stats.param_sq_norm_sum.values())).sum()
    mean_sq = torch.stack([g.square().sum() for g in stats.mean_grad.values()]).sum()
    n_f = n.to(sum_sq.dtype)
    trace = ((sum_sq - n_f * mean_sq) / (n_f - 1).clamp_min(1)).clamp_min(0)
    return torch.where(n >= 2, trace / mean_sq, torch.full_like(trace, math.nan))


def loss_grad(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The gradient of ``loss_fn(module, batch)`` with respect to ``params``, computed aside.

    The parameters are swapped for detached copies through ``functional_call``, so hooks
    registered on the live parameters (``Tensor.register_hook``) do not apply: this is the
    gradient of the loss itself, not of whatever the hooks make of it. No ``.grad`` is written
    and every buffer is restored.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = model.weight.register_hook(lambda g: 2 * g)  # a hook that rescales
        >>> g = loss_grad(model, lambda m, x: m(x).sum(), torch.ones(3, 2))
        >>> g["weight"]
        tensor([[3., 3.]])
    """
    chosen, module_names = _resolve_params(module, params)
    with run_eagerly(), restored_state(module):
        return _hook_free_grad(module, loss_fn, batch, chosen, module_names)

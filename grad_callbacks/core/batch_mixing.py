"""Batch mixing: does a sample's output depend on another sample's input?

Pure torch (no Lightning). :func:`find_batch_mixing` runs a forward pass on inputs that require
gradients and, for a few chosen samples ``i``, takes the vector-Jacobian product of
``output[i].sum()`` with respect to the inputs (``torch.autograd.grad`` with explicit ``inputs=``,
never ``.backward()``, so no ``.grad`` is written). A correct model gives an input gradient that is
exactly zero on every other sample ``j != i``; a non-zero gradient there means the model mixes
samples (a ``view``/``reshape``/``transpose`` across the batch axis, a reduction over dim 0,
attention run over the batch axis, ...). This is the test of Lightning Bolts'
``BatchGradientVerification``, extended to several inputs and outputs, integer token inputs and
per-module localisation.

* **Inputs** may be any nesting of tuples, lists, dicts, namedtuples and dataclasses. Every
  floating tensor whose dimension ``input_dim`` has the batch size (the size of the first tensor
  with that dimension) is replaced by a detached clone that requires grad: the caller's tensors are
  never modified.
* **Integer inputs** (token ids) cannot be differentiated. When ``module`` is given, a forward hook
  on every ``nn.Embedding`` replaces the output of a lookup of such an input (the index tensor
  shares the input's storage, e.g. a slice of it, or has its shape) by a leaf that requires grad,
  and gradients are taken with respect to those outputs. A lookup of anything else (positional
  ids from ``torch.arange``) is left alone.
* **Outputs** may be nested the same way; every floating tensor whose dimension ``output_dim`` has
  the batch size is tested and named by its path (``output``, ``output[1]``, ``output['logits']``).
* **Localisation**: for each mixing output, the first module (in the order modules finish their
  forward) whose output holds an element that depends on both sample ``i`` and sample ``j`` and
  that feeds ``output[i]``. Element dependencies are measured by perturbing the input of sample
  ``i`` (then ``j``) and comparing every module output with the unperturbed run, which needs no
  knowledge of where an intermediate tensor keeps its batch axis. It runs only when mixing is found.

Non-invasive when ``module`` is given: BatchNorm layers (``_BatchNorm``) run in eval mode (their
batch statistics mix samples by design; train-mode BatchNorm is not reported; one without running
statistics normalises with detached statistics of its first input instead), every buffer is
restored afterwards, the global RNG is forked (dropout consumes it), ``torch.compile``d code runs
eagerly (inputs that require grad, eval-mode BatchNorm and the localisation hooks would each
recompile it), and no ``requires_grad`` or ``.grad`` of a parameter is touched. Dropout keeps
the module's mode: it acts per element and cannot mix samples.

Gradients that are NaN are not evidence (``0 * inf`` from a sample that does not feed the output
gives NaN), so they count as zero.

Example:
    >>> import torch
    >>> class Folds(torch.nn.Module):  # folds pairs of samples into one row: mixes 0 with 1
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.mixer = torch.nn.Linear(4, 4)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.mixer(x.reshape(-1, 4)).reshape(x.shape)
    >>> model = Folds()
    >>> (m,) = find_batch_mixing(model, torch.randn(4, 2), sample_indices=[0], module=model)
    >>> m.output, m.sample, m.sources, m.module
    ('output', 0, (1,), 'mixer')
    >>> find_batch_mixing(torch.nn.Linear(2, 3), torch.randn(4, 2), sample_indices=[0, 3])
    []
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from grad_callbacks.core.per_sample import run_eagerly
from grad_callbacks.core.state import restored_state

#: Relative size of a change in a module's output, against its largest value, below which the
#: localisation pass treats the element as unchanged (deterministic CPU runs change nothing).
_LOCALISE_RTOL = 1e-5


class CannotCheckMixing(ValueError):
    """The inputs or outputs do not allow the test (no batch axis, one sample, nothing to
    differentiate); the message says why."""


@dataclass(frozen=True)
class Mixing:
    """Samples whose inputs reach the output of sample ``sample``.

    Attributes:
        output: the output's path (``"output"``, ``"output[1]"``, ``"output['logits']"``).
        sample: the sample ``i`` whose output was differentiated.
        sources: the other samples ``j`` whose inputs get a non-zero gradient.
        inputs: the inputs through which they do (paths, or ``"<embedding> output for <path>"``).
        magnitude: the largest absolute input gradient on those other samples.
        own_magnitude: the largest absolute input gradient on sample ``i`` itself.
        module: the qualified name of the first module whose output mixes (the top-level module
            is named by its class), or None when not localised.
        module_type: that module's class name.
        previous_module: the last module before it, on the data path, whose output does not mix.
    """

    output: str
    sample: int
    sources: tuple[int, ...]
    inputs: tuple[str, ...]
    magnitude: float
    own_magnitude: float
    module: str | None = None
    module_type: str | None = None
    previous_module: str | None = None

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(i, j)`` for every source ``j``."""
        return [(self.sample, j) for j in self.sources]


@dataclass
class _Leaf:
    """A tensor the test differentiates with respect to, with its batch axis."""

    name: str
    tensor: Tensor
    dim: int


Forward = Callable[[Any], Any]


# ---------------------------------------------------------------------------------- structures
def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _map(obj: Any, fn: Callable[[str, Tensor], Any], path: str) -> Any:
    """Rebuild ``obj`` with ``fn(path, tensor)`` applied to its tensor leaves."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if _is_namedtuple(obj):
        return type(obj)._make(
            _map(v, fn, f"{path}.{f}") for f, v in zip(obj._fields, obj, strict=True)
        )
    if isinstance(obj, (list, tuple)):
        values = [_map(v, fn, f"{path}[{k}]") for k, v in enumerate(obj)]
        try:
            return type(obj)(values)
        except Exception:
            return values if isinstance(obj, list) else tuple(values)
    if isinstance(obj, Mapping):
        items = {k: _map(v, fn, f"{path}[{k!r}]") for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            return type(obj)(items)
        except Exception:
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _map(getattr(obj, f.name), fn, f"{path}.{f.name}")
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **changes)
    return obj


def _tensors(obj: Any, path: str) -> list[tuple[str, Tensor]]:
    found: list[tuple[str, Tensor]] = []

    def keep(name: str, t: Tensor) -> Tensor:
        found.append((name, t))
        return t

    _map(obj, keep, path)
    return found


def batch_size_of(inputs: Any, dim: int = 0) -> int | None:
    """The batch size of ``inputs``: the size of dimension ``dim`` of its first tensor that has it.

    Example:
        >>> batch_size_of({"x": torch.zeros(5, 2), "w": torch.zeros(3)})
        5
    """
    for _, t in _tensors(inputs, "input"):
        if t.dim() > dim:
            return int(t.shape[dim])
    return None


def default_sample_indices(size: int, count: int) -> list[int]:
    """``count`` sample indices spread over a batch of ``size``: first, last, then between.

    Example:
        >>> default_sample_indices(8, 3), default_sample_indices(2, 4)
        ([0, 4, 7], [0, 1])
    """
    count = max(1, min(count, size))
    if count == 1:
        return [0]
    return sorted({int(k * (size - 1) / (count - 1) + 0.5) for k in range(count)})


# ---------------------------------------------------------------------------------- isolation
def _freeze_batch_stats(m: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook for a BatchNorm without running statistics: give it, on its first call,
    detached statistics of that call's input, so that in eval mode it normalises with constants
    instead of the (mixing) batch statistics."""
    if m.running_mean is not None or not args or not isinstance(args[0], Tensor):
        return
    x = args[0]
    with torch.no_grad():
        dims = [d for d in range(x.dim()) if d != 1]
        m.running_mean = x.detach().mean(dim=dims)
        m.running_var = x.detach().var(dim=dims, unbiased=False)


@contextmanager
def _norms_in_eval(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    flags = [m.training for m in norms]
    untracked = [m for m in norms if m.running_mean is None and m.running_var is None]
    handles = [m.register_forward_pre_hook(_freeze_batch_stats) for m in untracked]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for h in handles:
            h.remove()
        for m in untracked:
            m.running_mean = None
            m.running_var = None
        for m, flag in zip(norms, flags, strict=True):
            m.training = flag


def _cuda_devices(*objs: Any) -> list[int]:
    devices: set[int] = set()
    for obj in objs:
        tensors = (
            list(obj.parameters()) + list(obj.buffers())
            if isinstance(obj, nn.Module)
            else [t for _, t in _tensors(obj, "")]
        )
        devices.update(t.device.index or 0 for t in tensors if t.is_cuda)
    return sorted(devices)


@contextmanager
def isolated(module: nn.Module | None, inputs: Any = None) -> Iterator[None]:
    """Run extra forward passes of ``module`` without a trace on training.

    BatchNorm layers run in eval mode, buffers are restored on exit, the CPU and CUDA random
    number generators are forked and ``torch.compile``d code runs eagerly.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> before = net[1].running_mean.clone()
        >>> with isolated(net):
        ...     _ = net(torch.randn(4, 2))
        >>> torch.equal(net[1].running_mean, before), net[1].training
        (True, True)
    """
    with ExitStack() as stack:
        stack.enter_context(run_eagerly())
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(module, inputs)))
        if module is not None:
            stack.enter_context(_norms_in_eval(module))
            stack.enter_context(restored_state(module))
        yield


# ---------------------------------------------------------------------------------- taps
class _EmbeddingTaps:
    """Forward hooks on ``nn.Embedding`` modules that turn lookups of the integer inputs into
    differentiable leaves (and, for localisation, perturb one sample's rows)."""

    def __init__(
        self, module: nn.Module, sources: list[_Leaf], size: int, perturb: _Perturb | None
    ) -> None:
        self.module = module
        self.sources = sources
        self.size = size
        self.perturb = perturb
        self.leaves: list[_Leaf] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _EmbeddingTaps:
        if self.sources:
            for name, m in self.module.named_modules():
                if isinstance(m, nn.Embedding):
                    # Prepended: hooks that record module outputs must see the tapped output.
                    hook = self._hook_for(name)
                    self._handles.append(m.register_forward_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _match(self, idx: Tensor) -> tuple[_Leaf, int] | None:
        for src in self.sources:
            t = src.tensor
            if idx.device != t.device or idx.dim() == 0:
                continue
            same_storage = idx.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            if same_storage:
                # A view (slice, transpose) of the input: its batch axis is the one that kept
                # the input's batch stride.
                for d in range(idx.dim()):
                    if idx.shape[d] == self.size and idx.stride(d) == t.stride(src.dim):
                        return src, d
            if idx.shape == t.shape:
                return src, src.dim
        return None

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            idx = args[0] if args else None
            if not isinstance(idx, Tensor) or not isinstance(out, Tensor):
                return None
            match = self._match(idx)
            if match is None:
                return None
            src, dim = match
            leaf = out.detach().requires_grad_(torch.is_grad_enabled())
            self.leaves.append(_Leaf(f"{name} output for {src.name}", leaf, dim))
            value = leaf.clone()  # not a leaf: the model may change it in place
            if self.perturb is not None:
                value = self.perturb(value, dim)
            return value

        return hook


class _Perturb:
    """Adds a fixed random bump to one sample's slice of a tensor."""

    def __init__(self, sample: int, seed: int) -> None:
        self.sample = sample
        self.seed = seed

    def __call__(self, t: Tensor, dim: int) -> Tensor:
        part = t.detach().narrow(dim, self.sample, 1)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(part.shape, generator=gen, dtype=torch.float32)
        scale = float(part.float().abs().mean()) + 0.1
        bump = torch.zeros_like(t)
        bump.narrow(dim, self.sample, 1).copy_((noise * scale).to(t.dtype))
        return t + bump


# ---------------------------------------------------------------------------------- forward
@dataclass
class _Run:
    outputs: list[tuple[str, Tensor]]
    leaves: list[_Leaf]


def _prepare(
    inputs: Any, size: int, dim: int, perturb: _Perturb | None
) -> tuple[Any, list[_Leaf], list[_Leaf]]:
    """The inputs with floating batch tensors replaced by leaves; and the integer ones."""
    leaves: list[_Leaf] = []
    integers: list[_Leaf] = []

    def swap(name: str, t: Tensor) -> Tensor:
        if t.dim() <= dim or t.shape[dim] != size:
            return t
        if not (t.is_floating_point() or t.is_complex()):
            integers.append(_Leaf(name, t, dim))
            return t
        leaf = t.detach().clone().requires_grad_(True)
        leaves.append(_Leaf(name, leaf, dim))
        # The model gets a non-leaf copy: it may change its input in place.
        return perturb(leaf, dim) if perturb is not None else leaf.clone()

    return _map(inputs, swap, "input"), leaves, integers


def _named_outputs(outputs: Any, size: int, dim: int) -> list[tuple[str, Tensor]]:
    return [
        (name, t)
        for name, t in _tensors(outputs, "output")
        if t.is_floating_point() and t.dim() > dim and t.shape[dim] == size
    ]


def _run(
    forward: Forward,
    inputs: Any,
    *,
    size: int,
    input_dim: int,
    output_dim: int,
    module: nn.Module | None,
    perturb: _Perturb | None = None,
) -> _Run:
    prepared, leaves, integers = _prepare(inputs, size, input_dim, perturb)
    taps = _EmbeddingTaps(module, integers, size, perturb) if module is not None else None
    with torch.enable_grad():
        if taps is not None:
            with taps:
                outputs = forward(prepared)
            leaves += taps.leaves
        else:
            outputs = forward(prepared)
    if not leaves:
        if integers:
            names = ", ".join(s.name for s in integers)
            raise CannotCheckMixing(
                f"the integer input(s) {names} reach no nn.Embedding of the module, and there is "
                f"no floating input to differentiate"
            )
        raise CannotCheckMixing(f"no input tensor has the batch size {size} on dim {input_dim}")
    named = _named_outputs(outputs, size, output_dim)
    if not named:
        shapes = [tuple(t.shape) for _, t in _tensors(outputs, "output")]
        raise CannotCheckMixing(
            f"no floating output has the batch size {size} on dim {output_dim} "
            f"(output shapes: {shapes})"
        )
    return _Run(named, leaves)


def _per_sample_magnitude(grad: Tensor, dim: int) -> Tensor:
    g = grad.detach().abs().nan_to_num(nan=0.0)
    g = g.movedim(dim, 0).reshape(g.shape[dim], -1)
    return g.amax(dim=1) if g.shape[1] > 0 else g.new_zeros(g.shape[0])


# ---------------------------------------------------------------------------------- public
def find_batch_mixing(
    forward: Forward,
    inputs: Any,
    *,
    sample_indices: Sequence[int] = (0,),
    input_dim: int = 0,
    output_dim: int = 0,
    module: nn.Module | None = None,
    atol: float = 0.0,
    localize: bool = True,
) -> list[Mixing]:
    """Which samples' inputs reach the outputs of the samples ``sample_indices``.

    Args:
        forward: called as ``forward(inputs)`` with ``inputs`` rebuilt around tensors that
            require grad (a module works).
        inputs: a tensor or any nesting of tuples, lists, dicts, namedtuples and dataclasses.
        sample_indices: the samples ``i`` whose output is differentiated (negative counts from
            the end).
        input_dim: the batch axis of the input tensors.
        output_dim: the batch axis of the output tensors.
        module: the module ``forward`` runs: enables integer inputs through ``nn.Embedding``,
            localisation, and the isolation of :func:`isolated` (eval-mode BatchNorm, restored
            buffers). Without it only the RNG is forked.
        atol: a cross-sample gradient must exceed this in absolute value to count.
        localize: name the first module whose output mixes (needs ``module``; extra forward
            passes, only when mixing is found).

    Returns:
        One :class:`Mixing` per output and sample ``i`` that mixes; empty for a correct model.

    Raises:
        CannotCheckMixing: fewer than two samples, no input to differentiate, or no output with
            the batch axis.

    Example:
        >>> mean_over_batch = lambda x: x - x.mean(dim=0)
        >>> [m.pairs for m in find_batch_mixing(mean_over_batch, torch.randn(3, 2))]
        [[(0, 1), (0, 2)]]
    """
    size = batch_size_of(inputs, input_dim)
    if size is None:
        raise CannotCheckMixing(f"the inputs hold no tensor with a dimension {input_dim}")
    if size < 2:
        raise CannotCheckMixing(f"the batch has {size} sample: mixing needs at least two samples")
    samples = sorted({range(size)[i] for i in sample_indices})
    with isolated(module, inputs):
        run = _run(
            forward, inputs, size=size, input_dim=input_dim, output_dim=output_dim, module=module
        )
        found = _vjp_test(run, samples, size, output_dim, atol)
        del run
        if found and localize and module is not None:
            found = _localise_all(
                found,
                forward,
                inputs,
                module,
                size=size,
                input_dim=input_dim,
                output_dim=output_dim,
            )
    return found


def _vjp_test(
    run: _Run, samples: list[int], size: int, output_dim: int, atol: float
) -> list[Mixing]:
    found: list[Mixing] = []
    tensors = [leaf.tensor for leaf in run.leaves]
    pending = [(name, out, i) for name, out in run.outputs if out.requires_grad for i in samples]
    for k, (name, out, i) in enumerate(pending):
        target = out.narrow(output_dim, i, 1).float().sum()
        grads = torch.autograd.grad(
            target, tensors, retain_graph=k < len(pending) - 1, allow_unused=True
        )
        cross = torch.zeros(size, device=target.device)
        own = torch.zeros((), device=target.device)
        via: list[str] = []
        for leaf, g in zip(run.leaves, grads, strict=True):
            if g is None:
                continue
            per = _per_sample_magnitude(g, leaf.dim).float().to(cross.device)
            own = torch.maximum(own, per[i])
            per[i] = 0.0
            if bool((per > atol).any()):
                via.append(leaf.name)
            cross = torch.maximum(cross, per)
        sources = tuple(int(j) for j in torch.nonzero(cross > atol).flatten().tolist())
        if sources:
            found.append(
                Mixing(
                    output=name,
                    sample=i,
                    sources=sources,
                    inputs=tuple(via),
                    magnitude=float(cross.max()),
                    own_magnitude=float(own),
                )
            )
    return found


# ---------------------------------------------------------------------------------- localise
@dataclass
class _Call:
    name: str
    kind: str
    values: list[Tensor]  # clones of the floating output tensors at the end of the call
    live: list[Tensor]  # the output tensors themselves (for the gradient filter)


@contextmanager
def _recording(module: nn.Module, calls: list[_Call], keep_live: bool) -> Iterator[None]:
    handles = []
    root_name = type(module).__name__

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            ts = [t for _, t in _tensors(out, "") if t.is_floating_point()]
            calls.append(
                _Call(
                    name or root_name,
                    type(m).__name__,
                    [t.detach().clone() for t in ts],
                    ts if keep_live else [],
                )
            )

        return hook

    try:
        for name, m in module.named_modules():
            handles.append(m.register_forward_hook(hook_for(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _localise_all(
    found: list[Mixing],
    forward: Forward,
    inputs: Any,
    module: nn.Module,
    *,
    size: int,
    input_dim: int,
    output_dim: int,
) -> list[Mixing]:
    located: dict[str, tuple[str, str, str | None] | None] = {}
    result = []
    for m in found:
        if m.output not in located:
            located[m.output] = _localise(
                m, forward, inputs, module, size=size, input_dim=input_dim, output_dim=output_dim
            )
        where = located[m.output]
        if where is not None:
            m = dataclasses.replace(
                m, module=where[0], module_type=where[1], previous_module=where[2]
            )
        result.append(m)
    return result


def _localise(
    mixing: Mixing,
    forward: Forward,
    inputs: Any,
    module: nn.Module,
    *,
    size: int,
    input_dim: int,
    output_dim: int,
) -> tuple[str, str, str | None] | None:
    """(module name, type, previous clean module) of the first module whose output mixes."""
    i, j = mixing.sample, mixing.sources[0]
    rng = torch.get_rng_state()
    cuda = _cuda_devices(module, inputs)
    cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda]

    def replay() -> None:
        # Every run draws the same dropout masks, so only the perturbation differs.
        torch.set_rng_state(rng)
        for d, state in zip(cuda, cuda_rng, strict=True):
            torch.cuda.set_rng_state(state, d)

    runs: list[list[_Call]] = []
    feeds: list[list[Tensor | None]] = []
    try:
        for perturb in (None, _Perturb(i, seed=1234 + i), _Perturb(j, seed=4321 + j)):
            calls: list[_Call] = []
            replay()
            with _recording(module, calls, keep_live=perturb is None):
                run = _run(
                    forward,
                    inputs,
                    size=size,
                    input_dim=input_dim,
                    output_dim=output_dim,
                    module=module,
                    perturb=perturb,
                )
            if perturb is None:
                feeds = _feeding(run, calls, mixing, output_dim)
            for c in calls:
                c.live = []
            del run
            runs.append(calls)
    except Exception:
        return None
    base, bumped_i, bumped_j = runs
    if not (len(base) == len(bumped_i) == len(bumped_j)):
        return None
    previous: str | None = None
    for k, call in enumerate(base):
        ci, cj = bumped_i[k], bumped_j[k]
        if not (len(call.values) == len(ci.values) == len(cj.values)):
            return None
        on_path = False
        for t, (b, vi, vj) in enumerate(zip(call.values, ci.values, cj.values, strict=True)):
            if b.shape != vi.shape or b.shape != vj.shape:
                return None
            tol = _LOCALISE_RTOL * float(b.detach().abs().nan_to_num(0.0).max()) if b.numel() else 0
            dep_i = (vi - b).abs() > tol
            dep_j = (vj - b).abs() > tol
            g = feeds[k][t] if k < len(feeds) and t < len(feeds[k]) else None
            feeds_output = g != 0 if g is not None else torch.ones_like(dep_i)
            on_path = on_path or bool(((dep_i | dep_j) & feeds_output).any())
            mixed = dep_i & dep_j & feeds_output
            if bool(mixed.any()):
                return call.name, call.kind, previous
        if on_path:
            previous = call.name
    return None


def _feeding(
    run: _Run, calls: list[_Call], mixing: Mixing, output_dim: int
) -> list[list[Tensor | None]]:
    """For every recorded module output, the gradient of ``output[i].sum()`` with respect to it
    (None where it does not feed that output)."""
    out = dict(run.outputs)[mixing.output]
    flat = [(k, t, x) for k, c in enumerate(calls) for t, x in enumerate(c.live) if x.requires_grad]
    feeds: list[list[Tensor | None]] = [[None] * len(c.live) for c in calls]
    if not flat:
        return feeds
    try:
        grads = torch.autograd.grad(
            out.narrow(output_dim, mixing.sample, 1).float().sum(),
            [x for _, _, x in flat],
            allow_unused=True,
        )
    except RuntimeError:
        return [[] for _ in calls]  # no filter
    for (k, t, _), g in zip(flat, grads, strict=True):
        feeds[k][t] = g.detach() if g is not None else None
    # A module output that does not feed output[i] at all cannot be where it mixes.
    for k, c in enumerate(calls):
        for t, x in enumerate(c.live):
            if not x.requires_grad:
                feeds[k][t] = torch.zeros_like(x)
            elif feeds[k][t] is None:
                feeds[k][t] = torch.zeros_like(x)
    return feeds

"""Finite differences against autograd, for custom ``torch.autograd.Function``s and modules.

Pure torch (no Lightning). Three parts:

* :func:`find_custom_functions` walks an autograd graph from a loss's ``grad_fn`` through
  ``next_functions`` and returns the custom Function classes in it (their nodes are
  ``BackwardCFunction`` instances whose ``_forward_cls`` is the class). :func:`scan_graph` also
  tells whether the graph goes through ``torch.compile``d code: the Functions called there are
  traced into one ``CompiledFunctionBackward`` node and cannot be seen from the graph.
* :class:`CallRecorder` records the inputs of the first calls of chosen Function classes and
  modules while some code runs. A Function is intercepted by temporarily replacing its
  ``forward`` staticmethod: ``Function.apply`` looks ``forward`` up on the class at every call,
  so this also catches aliases made at import time (``square = Square.apply``), and it works
  under ``torch.no_grad()``. (``torch.overrides.TorchFunctionMode`` does not see
  ``Function.apply``, only the operations inside ``forward``.) A module is intercepted with a
  forward pre-hook.
* :func:`check_function` and :func:`check_module` compare, on float64 copies of the recorded
  inputs, the Jacobian that autograd computes (one ``torch.autograd.grad`` per output entry:
  the custom ``backward()``) with central finite differences (two forward evaluations per input
  entry), entry by entry: an entry is off when ``|analytic - numerical| > atol + rtol *
  |numerical|`` (defaults ``atol=1e-5``, ``rtol=1e-3``, ``eps=1e-6``, as
  ``torch.autograd.gradcheck``). At most ``max_entries`` input entries and as many output
  entries are checked (a seeded random subset, spread over every input, when there are more).
  Where an entry is off, one-sided differences at ``eps`` and ``eps / 10`` tell a kink (ReLU at
  exactly 0: any derivative is right there) from a wrong derivative; kinks are left out.
  Every evaluation starts from the same RNG seed, so random operations (dropout) take the same
  values each time; the random streams are forked (``torch.random.fork_rng``) around the
  whole comparison and left as they were.

Example:
    >>> class Square(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return x * x
    ...     @staticmethod
    ...     def backward(ctx, grad):
    ...         (x,) = ctx.saved_tensors
    ...         return grad * x  # wrong: should be 2 * grad * x
    >>> x = torch.randn(3, requires_grad=True)
    >>> loss = Square.apply(x).sum()
    >>> find_custom_functions(loss.grad_fn) == [Square]
    True
    >>> with torch.no_grad(), CallRecorder(functions=[Square]) as rec:
    ...     _ = Square.apply(torch.tensor([1.0, 2.0]))
    >>> outcome = check_function(Square, rec.function_inputs[Square])
    >>> outcome.status, outcome.worst.analytic, round(outcome.worst.numerical, 6)
    ('mismatch', 2.0, 4.0)
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from grad_callbacks.core.isolation import cuda_devices, run_eagerly

FunctionClass = type[torch.autograd.Function]
Status = Literal["ok", "mismatch", "skipped"]

_MAX_GRAPH_NODES = 1_000_000
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# ---------------------------------------------------------------------- finding Functions
def is_user_function(cls: type) -> bool:
    """Whether ``cls`` is a custom Function defined outside torch (torch's own are trusted)."""
    module = getattr(cls, "__module__", "") or ""
    return module != "torch" and not module.startswith("torch.")


def is_compiled_region(cls: type) -> bool:
    """Whether ``cls`` is the autograd Function of a ``torch.compile``d graph (AOTAutograd's
    ``CompiledFunction``): the custom Functions traced into it are invisible from outside."""
    module = getattr(cls, "__module__", "") or ""
    return module.startswith("torch._functorch") and cls.__name__ == "CompiledFunction"


@dataclass(frozen=True)
class GraphScan:
    """What an autograd graph goes through.

    Attributes:
        functions: the custom Function classes, in order of discovery (torch's own excluded).
        compiled: whether the graph goes through ``torch.compile``d code, whose custom
            Functions are traced into the compiled graph and do not appear as nodes.
    """

    functions: list[FunctionClass]
    compiled: bool


def scan_graph(grad_fn: Any) -> GraphScan:
    """Walk the graph behind ``grad_fn`` breadth first from the loss (see :class:`GraphScan`).

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scan_graph(x.exp().sum().grad_fn)
        GraphScan(functions=[], compiled=False)
    """
    found: list[FunctionClass] = []
    compiled = False
    if grad_fn is None:
        return GraphScan(found, compiled)
    seen = {id(grad_fn)}
    frontier = [grad_fn]
    while frontier and len(seen) < _MAX_GRAPH_NODES:
        nxt = []
        for node in frontier:
            cls = getattr(node, "_forward_cls", None)
            if isinstance(node, torch.autograd.function.BackwardCFunction) and cls is not None:
                if is_user_function(cls) and cls not in found:
                    found.append(cls)
                compiled = compiled or is_compiled_region(cls)
            for child, _ in getattr(node, "next_functions", ()):
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    nxt.append(child)
        frontier = nxt
    return GraphScan(found, compiled)


def find_custom_functions(grad_fn: Any) -> list[FunctionClass]:
    """The custom ``autograd.Function`` classes in the graph behind ``grad_fn``, in order of
    discovery (breadth first from the loss), torch's own excluded.

    Example:
        >>> find_custom_functions(torch.ones(2, requires_grad=True).exp().sum().grad_fn)
        []
    """
    return scan_graph(grad_fn).functions


# ---------------------------------------------------------------------- recording inputs
def _snapshot(value: Any) -> Any:
    """A detached copy of every tensor in ``value`` (other leaves kept as they are)."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, Tensor) else v, value)


def _setup_context_defined(cls: FunctionClass) -> bool:
    base = torch.autograd.function._SingleLevelFunction.setup_context
    return cls.setup_context != base  # type: ignore[comparison-overlap]


@dataclass
class ModuleCall:
    """The recorded inputs of a module's first call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class CallRecorder:
    """Records the inputs of the first call of each given Function class and module.

    Use it as a context manager; the Functions' ``forward`` and the modules' hooks are restored
    on exit. The inputs are detached copies.

    Args:
        functions: custom Function classes to intercept.
        modules: ``name -> module`` to intercept.
    """

    def __init__(
        self,
        functions: Iterable[FunctionClass] = (),
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        self.functions = list(functions)
        self.modules = dict(modules or {})
        self.function_inputs: dict[FunctionClass, tuple[Any, ...]] = {}
        self.module_inputs: dict[str, ModuleCall] = {}
        self._restore: list[Callable[[], None]] = []

    def __enter__(self) -> CallRecorder:
        try:
            for cls in self.functions:
                self._patch(cls)
            for name, module in self.modules.items():
                self._hook(name, module)
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo()

    def _undo(self) -> None:
        while self._restore:
            self._restore.pop()()

    def _patch(self, cls: FunctionClass) -> None:
        own = "forward" in cls.__dict__
        original = cls.__dict__.get("forward")
        forward = cls.forward
        has_ctx = not _setup_context_defined(cls)

        @functools.wraps(forward)
        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            if cls not in self.function_inputs:
                self.function_inputs[cls] = _snapshot(tuple(args[1:] if has_ctx else args))
            return forward(*args, **kwargs)

        cls.forward = staticmethod(recording_forward)  # type: ignore[method-assign,assignment]

        def restore() -> None:
            if own:
                cls.forward = original  # type: ignore[method-assign]
            else:
                delattr(cls, "forward")

        self._restore.append(restore)

    def _hook(self, name: str, module: nn.Module) -> None:
        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.module_inputs:
                self.module_inputs[name] = ModuleCall(_snapshot(args), _snapshot(kwargs))

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._restore.append(handle.remove)


# ---------------------------------------------------------------------- comparing Jacobians
@dataclass(frozen=True)
class Entry:
    """One Jacobian entry: d ``output[output_index]`` / d ``input[input_index]``."""

    input: str
    input_index: tuple[int, ...]
    output: str
    output_index: tuple[int, ...]
    analytic: float
    numerical: float

    @property
    def error(self) -> float:
        return abs(self.analytic - self.numerical)


@dataclass(frozen=True)
class Outcome:
    """The result of a check.

    Attributes:
        status: ``"ok"``, ``"mismatch"`` or ``"skipped"``.
        reason: why it was skipped.
        worst: the entry furthest outside the tolerance (for ``"mismatch"``), or the one
            closest to it (for ``"ok"``).
        mismatched: how many checked entries are outside the tolerance.
        checked: how many entries were checked.
        nondifferentiable: entries left out because the function has a kink there.
        constant_inputs: floating inputs left out because the backward returns None for them
            (declared constant: masks, fixed weights; a backward that wrongly drops a needed
            gradient this way is not caught).
        settings: the tolerances used.
    """

    status: Status
    reason: str = ""
    worst: Entry | None = None
    mismatched: int = 0
    checked: int = 0
    nondifferentiable: int = 0
    constant_inputs: int = 0
    settings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """Tolerances of the comparison (float64)."""

    atol: float = 1e-5
    rtol: float = 1e-3
    eps: float = 1e-6
    max_entries: int = 256
    seed: int = 0


def _reseed(seed: int, devices: Sequence[int]) -> None:
    """Seed the CPU generator and those of ``devices`` only (``torch.manual_seed`` would seed
    every CUDA device, outside the fork)."""
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)


def _choose(sizes: Sequence[int], budget: int, generator: torch.Generator) -> list[list[int]]:
    """Flat indices to check in each tensor: all of them within ``budget``, else a random
    subset with each tensor's share proportional to its size (at least one entry each)."""
    total = sum(sizes)
    if total <= budget:
        return [list(range(n)) for n in sizes]
    chosen = []
    for n in sizes:
        k = min(n, max(1, math.floor(budget * n / total)))
        chosen.append(sorted(torch.randperm(n, generator=generator)[:k].tolist()))
    return chosen


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for dim in reversed(shape):
        out.append(flat % dim if dim else 0)
        flat = flat // dim if dim else 0
    return tuple(reversed(out))


def compare_jacobians(
    fn: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Tensor],
    input_names: Sequence[str],
    output_names: Callable[[int], str] = lambda k: f"output {k}",
    tol: Tolerance | None = None,
) -> Outcome:
    """Compare autograd's Jacobian of ``fn`` at ``inputs`` with central finite differences.

    Args:
        fn: takes the tensors of ``inputs`` and returns a sequence of output tensors (those
            that are not floating point or do not require gradients are ignored).
        inputs: float64 tensors (they are copied; they need not require gradients).
        input_names: a label per input, for reports.
        output_names: a label per output index, for reports.
        tol: tolerances and the entry budget.

    Example:
        >>> out = compare_jacobians(lambda x: (x.sin(),), [torch.rand(4, dtype=torch.float64)],
        ...                         ["x"])
        >>> out.status, out.checked
        ('ok', 16)
    """
    tol = tol or Tolerance()
    devices = cuda_devices(inputs)
    # float64 copies would recompile torch.compile'd code at every evaluation: run it eagerly
    with run_eagerly(), torch.random.fork_rng(devices=devices):
        return _compare(fn, inputs, input_names, output_names, tol, devices)


def _compare(
    fn: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Tensor],
    input_names: Sequence[str],
    output_names: Callable[[int], str],
    tol: Tolerance,
    devices: list[int],
) -> Outcome:
    settings = {"atol": tol.atol, "rtol": tol.rtol, "eps": tol.eps}
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        _reseed(tol.seed, devices)
        outputs = list(fn(*leaves))
    keep = [
        k
        for k, o in enumerate(outputs)
        if isinstance(o, Tensor) and o.is_floating_point() and o.requires_grad and o.numel()
    ]
    if not keep:
        return Outcome("skipped", reason="no floating-point output depends on the inputs")
    for k in keep:
        if outputs[k].dtype != torch.float64:
            return Outcome(
                "skipped",
                reason=f"not float64-compatible: output {k} is {outputs[k].dtype} for float64 "
                "inputs, too coarse for finite differences",
            )
    generator = torch.Generator().manual_seed(tol.seed)
    in_idx = _choose([x.numel() for x in leaves], tol.max_entries, generator)
    out_idx = _choose([outputs[k].numel() for k in keep], tol.max_entries, generator)
    rows = [
        (output_names(k), _unravel(i, outputs[k].shape))
        for k, chosen in zip(keep, out_idx, strict=True)
        for i in chosen
    ]
    cols = [
        (input_names[a], _unravel(j, leaves[a].shape))
        for a, chosen in enumerate(in_idx)
        for j in chosen
    ]
    if not rows or not cols:
        return Outcome("skipped", reason="nothing to differentiate (empty inputs)")

    # Analytic rows: one backward pass (the custom backward) per chosen output entry.
    analytic = []
    # Inputs whose backward gives None for every output entry are declared constant by the
    # Function (a mask, a weight it is not meant to train): their columns are not compared.
    declared_constant = [True] * len(leaves)
    for k, chosen in zip(keep, out_idx, strict=True):
        flat = outputs[k].reshape(-1)
        for i in chosen:
            grads = torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True)
            for a, g in enumerate(grads):
                declared_constant[a] = declared_constant[a] and g is None
            analytic.append(
                torch.cat(
                    [
                        torch.zeros(len(c), dtype=torch.float64)
                        if g is None
                        else g.detach().reshape(-1)[c].to("cpu", torch.float64)
                        for g, c in zip(grads, in_idx, strict=True)
                    ]
                )
            )
    del outputs
    a_mat = torch.stack(analytic)

    # Numerical columns: two forward evaluations per chosen input entry, on fresh copies.
    base = [x.detach().clone(memory_format=torch.contiguous_format) for x in inputs]

    def evaluate() -> Tensor:
        with torch.no_grad():
            _reseed(tol.seed, devices)
            outs = list(fn(*base))
        return torch.cat(
            [
                outs[k].detach().reshape(-1)[chosen].to("cpu", torch.float64)
                for k, chosen in zip(keep, out_idx, strict=True)
            ]
        )

    def shifted(a: int, j: int, step: float) -> Tensor:
        flat_in = base[a].view(-1)
        orig = flat_in[j].item()
        flat_in[j] = orig + step
        try:
            return evaluate()
        finally:
            flat_in[j] = orig

    coords = [(a, j) for a, chosen in enumerate(in_idx) for j in chosen]
    n_mat = torch.stack(
        [(shifted(a, j, tol.eps) - shifted(a, j, -tol.eps)) / (2 * tol.eps) for a, j in coords],
        dim=1,
    )
    if not torch.isfinite(n_mat).all():
        return Outcome(
            "skipped",
            reason="finite differences are not finite at the recorded inputs (outside the "
            "function's domain, or at a singularity)",
            settings=settings,
        )

    err = (a_mat - n_mat).abs()
    allowed = tol.atol + tol.rtol * n_mat.abs()
    bad = ~(err <= allowed)  # a NaN in the analytic Jacobian counts as a mismatch
    constant = torch.tensor([declared_constant[a] for a, _ in coords]).expand_as(bad)
    bad &= ~constant
    kinks = _kinks(bad, allowed, coords, shifted, evaluate, tol.eps)
    bad &= ~kinks
    ratio = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err / allowed)
    ratio = torch.where(kinks | constant, torch.zeros_like(ratio), ratio)
    r, c = divmod(int(torch.argmax(ratio)), ratio.shape[1])
    worst = Entry(
        input=cols[c][0],
        input_index=cols[c][1],
        output=rows[r][0],
        output_index=rows[r][1],
        analytic=float(a_mat[r, c]),
        numerical=float(n_mat[r, c]),
    )
    mismatched = int(bad.sum())
    return Outcome(
        "mismatch" if mismatched else "ok",
        worst=worst,
        mismatched=mismatched,
        checked=int(bad.numel()) - int(kinks.sum()) - int(constant.sum()),
        nondifferentiable=int(kinks.sum()),
        constant_inputs=sum(declared_constant),
        settings=settings,
    )


def _kinks(
    bad: Tensor,
    allowed: Tensor,
    coords: Sequence[tuple[int, int]],
    shifted: Callable[[int, int, float], Tensor],
    evaluate: Callable[[], Tensor],
    eps: float,
) -> Tensor:
    """Entries where the function is not differentiable (a kink, e.g. ReLU at exactly 0).

    Only for the columns with a mismatch: the one-sided differences there are compared at
    ``eps`` and ``eps / 10``. For a smooth function their gap shrinks with the step (it is
    about ``f'' * eps``); at a kink it stays (the jump of the derivative). Any derivative is
    right at a kink, so these entries are left out of the comparison.
    """
    kinks = torch.zeros_like(bad)
    columns = bad.any(dim=0).nonzero().flatten().tolist()
    if not columns:
        return kinks
    f0 = evaluate()
    for c in columns:
        a, j = coords[c]
        gaps = []
        for step in (eps, eps / 10):
            right = (shifted(a, j, step) - f0) / step
            left = (f0 - shifted(a, j, -step)) / step
            gaps.append((right - left).abs())
        kinks[:, c] = bad[:, c] & (gaps[0] > allowed[:, c]) & (gaps[1] > 0.5 * gaps[0])
    return kinks


# ---------------------------------------------------------------------- the two checks
def _float64_copy(value: Any) -> Any:
    return value.detach().to(torch.float64) if value.is_floating_point() else value


def check_function(
    cls: FunctionClass, args: Sequence[Any], tol: Tolerance | None = None
) -> Outcome:
    """Check a custom Function's ``backward()`` at (float64 copies of) recorded inputs.

    Floating-point tensor inputs are differentiated; integer and bool tensors and other
    arguments are passed as they are. A Function that fails in float64, or returns a lower
    precision for float64 inputs, is skipped with the reason.

    Args:
        cls: the Function class.
        args: its ``apply`` arguments (as :class:`CallRecorder` records them).
        tol: tolerances.
    """
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    if not positions:
        return Outcome("skipped", reason="no floating-point tensor input to differentiate")
    fixed = list(args)

    def fn(*xs: Tensor) -> Sequence[Tensor]:
        call = list(fixed)
        for pos, x in zip(positions, xs, strict=True):
            call[pos] = x.clone()  # an in-place Function must not change the inputs
        out = cls.apply(*call)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    inputs = [_float64_copy(args[i]) for i in positions]
    try:
        return compare_jacobians(fn, inputs, [f"input {i}" for i in positions], tol=tol)
    except Exception as exc:  # the Function's own code failed on float64 copies
        return Outcome(
            "skipped", reason=f"it failed on float64 inputs: {type(exc).__name__}: {exc}"
        )


def check_module(module: nn.Module, call: ModuleCall, tol: Tolerance | None = None) -> Outcome:
    """Check a module's gradients w.r.t. its floating inputs and trainable parameters.

    Works on a float64 deep copy of ``module`` (the live module is not touched), called like
    ``torch.func.functional_call``. The copy is put in eval mode when it contains dropout
    layers (they would otherwise drop different entries than in training; evaluations are
    seeded anyway), and otherwise keeps the live module's mode (BatchNorm in training mode
    normalises with the batch's statistics, as in training).

    Args:
        module: the module.
        call: its recorded inputs.
        tol: tolerances.
    """
    clone = copy.deepcopy(module).to(torch.float64)
    if any(isinstance(m, _DROPOUT) for m in clone.modules()):
        clone.eval()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = dict(clone.named_parameters())
    flat, spec = tree_flatten((call.args, call.kwargs))
    positions = [i for i, v in enumerate(flat) if isinstance(v, Tensor) and v.is_floating_point()]
    n_inputs = len(positions)
    fixed = [_float64_copy(v) if isinstance(v, Tensor) else v for v in flat]

    def fn(*xs: Tensor) -> Sequence[Tensor]:
        leaves = list(fixed)
        for pos, x in zip(positions, xs[:n_inputs], strict=True):
            leaves[pos] = x
        args, kwargs = tree_unflatten(leaves, spec)
        values = dict(zip(names, xs[n_inputs:], strict=True))
        out = torch.func.functional_call(clone, values, tuple(args), dict(kwargs))
        return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]

    arg_labels = _leaf_labels((call.args, call.kwargs))
    labels = [arg_labels[i] for i in positions] + [f"parameter {n}" for n in names]
    inputs = [fixed[i] for i in positions] + [params[n].detach() for n in names]
    if not inputs:
        return Outcome("skipped", reason="no floating-point input or trainable parameter")
    try:
        return compare_jacobians(fn, inputs, labels, tol=tol)
    except Exception as exc:
        return Outcome(
            "skipped", reason=f"it failed on float64 inputs: {type(exc).__name__}: {exc}"
        )


def _leaf_labels(value: tuple[tuple[Any, ...], dict[str, Any]]) -> list[str]:
    """Labels of the pytree leaves of ``(args, kwargs)``: "input 0", "input kw", ..."""
    args, kwargs = value
    labels: list[str] = []
    for i, a in enumerate(args):
        n = len(tree_flatten(a)[0])
        labels += [f"input {i}"] * n if n == 1 else [f"input {i}[{j}]" for j in range(n)]
    for key in kwargs:  # tree_flatten orders dict leaves by insertion
        n = len(tree_flatten(kwargs[key])[0])
        labels += [f"input {key}"] * n if n == 1 else [f"input {key}[{j}]" for j in range(n)]
    return labels

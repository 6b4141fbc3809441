"""Where samples first mix: the first module whose output, or the first module call whose inputs,
depend on two samples; the latter points at the code of the module that made that call (run only
after the test found mixing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.core.batch_mixing.forward import (
    Forward,
    _cuda_devices,
    _Run,
    _run,
    sample_part,
)
from grad_callbacks.core.batch_mixing.leaves import _Perturb, _tensors
from grad_callbacks.core.batch_mixing.result import Mixing

#: Relative size of a change in a module's output, against its largest value, below which the
#: localisation pass treats the element as unchanged (deterministic CPU runs change nothing).
_LOCALISE_RTOL = 1e-5


@dataclass
class _Call:
    """A module's inputs as its call starts (``event="input"``) or its outputs as it ends."""

    name: str
    kind: str
    event: str
    parent: tuple[str, str] | None  # the module running when it was called (name, type)
    values: list[Tensor]  # clones of the floating tensors
    live: list[Tensor]  # the tensors themselves (for the gradient filter)


@dataclass(frozen=True)
class _Where:
    module: str
    module_type: str
    previous: str | None
    next: str | None = None


def _floats(obj: Any) -> list[Tensor]:
    return [t for _, t in _tensors(obj, "") if t.is_floating_point()]


@contextmanager
def _recording(module: nn.Module, calls: list[_Call], keep_live: bool) -> Iterator[None]:
    handles = []
    root_name = type(module).__name__
    stack: list[tuple[str, str]] = []

    def add(name: str, kind: str, event: str, ts: list[Tensor]) -> None:
        parent = stack[-1] if stack else None
        values = [t.detach().clone() for t in ts]
        calls.append(_Call(name, kind, event, parent, values, ts if keep_live else []))

    def pre_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
            add(name or root_name, type(m).__name__, "input", _floats((args, kwargs)))
            stack.append((name or root_name, type(m).__name__))

        return hook

    def post_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if stack:
                stack.pop()
            add(name or root_name, type(m).__name__, "output", _floats(out))

        return hook

    try:
        for name, m in module.named_modules():
            handles.append(m.register_forward_pre_hook(pre_for(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post_for(name), always_call=True))
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
    located: dict[str, _Where | None] = {}
    result = []
    for m in found:
        if m.output not in located:
            located[m.output] = _localise(
                m, forward, inputs, module, size=size, input_dim=input_dim, output_dim=output_dim
            )
        where = located[m.output]
        if where is not None:
            m = dataclasses.replace(
                m,
                module=where.module,
                module_type=where.module_type,
                previous_module=where.previous,
                next_module=where.next,
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
) -> _Where | None:
    """Where samples first mix: the first module whose output mixes samples (its inputs do
    not), or the module in whose code they mix, between the last module on the data path whose
    output does not and the call whose inputs do."""
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
                feeds = _feeding(run, calls, mixing, size, output_dim)
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
                if call.event == "output" or call.parent is None:
                    return _Where(call.name, call.kind, previous)
                # The inputs of `call` mix and no output before did: the mixing is in the code
                # of the module that called it.
                return _Where(call.parent[0], call.parent[1], previous, call.name)
        if on_path and call.event == "output":
            previous = call.name
    return None


def _feeding(
    run: _Run, calls: list[_Call], mixing: Mixing, size: int, output_dim: int
) -> list[list[Tensor | None]]:
    """For every recorded module output, the gradient of ``output[i].sum()`` with respect to it
    (None where it does not feed that output)."""
    out = next(o.tensor for o in run.outputs if o.name == mixing.output)
    flat = [(k, t, x) for k, c in enumerate(calls) for t, x in enumerate(c.live) if x.requires_grad]
    feeds: list[list[Tensor | None]] = [[None] * len(c.live) for c in calls]
    if not flat:
        return feeds
    try:
        grads = torch.autograd.grad(
            sample_part(
                out, mixing.sample, size, output_dim, mixing.rows, mixing.interleaved
            ).float().sum(),
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

"""Where samples first mix: the first module whose output depends on two samples (run only after
the test found mixing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grad_callbacks.core.batch_mixing.forward import Forward, _cuda_devices, _Run, _run
from grad_callbacks.core.batch_mixing.leaves import _Perturb, _tensors
from grad_callbacks.core.batch_mixing.result import Mixing

#: Relative size of a change in a module's output, against its largest value, below which the
#: localisation pass treats the element as unchanged (deterministic CPU runs change nothing).
_LOCALISE_RTOL = 1e-5


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

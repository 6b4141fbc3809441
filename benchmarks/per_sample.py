"""Per-sample gradient cost: our engine against the usual alternatives, side by side in one process.

Usage: python benchmarks/per_sample.py [--quick] [--repeats R] [--device cpu|cuda] [--threads T]

Methods:

* ``engine``: :func:`grad_callbacks.core.per_sample.per_sample_grad_stats` (vmap path, default
  ``chunk_size=32``), which keeps streaming statistics only; ``engine chunk=B``: the same in one
  chunk (isolates the cost of chunking);
* ``naive loop``: one ``loss.backward()`` per sample, cloning ``.grad`` (the baseline of ratios);
* ``func recipe``: the torch.func tutorial recipe, ``vmap(grad(f))`` over the whole batch;
* ``opacus``: ``opacus.GradSampleModule`` (``p.grad_sample``), only if opacus is importable;
* ``backpack``: BackPACK's ``BatchGrad`` extension, only if backpack is importable.

For each method the table gives the median wall time over the repeats, its ratio to the naive
loop, the largest relative error of the mean per-sample gradient against the naive loop's, and
memory: on CUDA the peak allocated during the call; on CPU an estimate of the per-sample gradients
held at once (B x parameters for every method but the engine, chunk x parameters for it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grad_callbacks.core.per_sample import per_sample_grad_stats

warnings.filterwarnings("ignore")

Batch = tuple[Tensor, Tensor]
Grads = dict[str, Tensor]
CHUNK = 32


# ---------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.block(self.emb(tokens)).mean(1))


def make(kind: str, b: int, device: torch.device) -> tuple[nn.Module, Batch]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    y = torch.randint(0, 10, (b,), generator=g)
    if kind == "mlp":
        model, x = mlp(), torch.randn(b, 1, 28, 28, generator=g)
    elif kind == "cnn":
        model, x = cnn(), torch.randn(b, 1, 28, 28, generator=g)
    elif kind == "transformer":
        model, x = Transformer(), torch.randint(0, 1000, (b, 32), generator=g)
    else:
        raise ValueError(kind)
    return model.to(device).eval(), (x.to(device), y.to(device))


def ce(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------- methods
# Each returns the mean per-sample gradient (for the error column); per-sample gradients are
# computed in full by every method except the engine, which only keeps statistics.
def run_engine(model: nn.Module, batch: Batch) -> Grads:
    stats = per_sample_grad_stats(model, ce, batch, method="vmap", chunk_size=CHUNK)
    return stats.mean_grad


def run_engine_unchunked(model: nn.Module, batch: Batch) -> Grads:
    b = batch[0].shape[0]
    return per_sample_grad_stats(model, ce, batch, method="vmap", chunk_size=b).mean_grad


def run_naive(model: nn.Module, batch: Batch) -> Grads:
    x, y = batch
    params = dict(model.named_parameters())
    rows: dict[str, list[Tensor]] = {k: [] for k in params}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        ce(model, (x[i : i + 1], y[i : i + 1])).backward()
        for k, p in params.items():
            assert p.grad is not None
            rows[k].append(p.grad.clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v).mean(0) for k, v in rows.items()}


def run_func_recipe(model: nn.Module, batch: Batch) -> Grads:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: Grads, b: Grads, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, b), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, *batch)
    return {k: v.mean(0) for k, v in grads.items()}


def make_opacus() -> Callable[[nn.Module, Batch], Grads] | str:
    try:
        from opacus import GradSampleModule
    except ImportError:
        return "opacus not installed"

    def run(model: nn.Module, batch: Batch) -> Grads:
        # Opacus records activations in train mode only; the models here have no dropout or
        # BatchNorm, so train mode computes the same function.
        gsm = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
        F.cross_entropy(gsm(batch[0]), batch[1], reduction="sum").backward()
        out = {k: p.grad_sample.mean(0) for k, p in gsm.named_parameters()}  # type: ignore[union-attr]
        gsm._close()
        return {k.removeprefix("_module."): v for k, v in out.items()}

    return run


def make_backpack() -> Callable[[nn.Module, Batch], Grads] | str:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        return "backpack not installed"

    def run(model: nn.Module, batch: Batch) -> Grads:
        ext = extend(copy.deepcopy(model))
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
        with backpack(BatchGrad()):
            loss_fn(ext(batch[0]), batch[1]).backward()
        return {k: p.grad_batch.mean(0) for k, p in ext.named_parameters()}  # type: ignore[attr-defined]

    return run


# ---------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    methods: dict[str, Callable[[nn.Module, Batch], Grads]],
    model: nn.Module,
    batch: Batch,
    repeats: int,
    device: torch.device,
) -> dict[str, tuple[float, Grads, int | None] | Exception]:
    """Median time, last result and peak memory per method; repeats interleave the methods
    (A B C A B C ...) so that drift in machine load hits them alike."""
    results: dict[str, Grads | Exception] = {}
    for name, fn in methods.items():  # warm-up, and weed out methods that cannot run
        try:
            results[name] = fn(model, batch)
        except Exception as exc:  # an alternative that cannot handle the model
            results[name] = exc
    runnable = [name for name, r in results.items() if not isinstance(r, Exception)]
    times: dict[str, list[float]] = {name: [] for name in runnable}
    peaks: dict[str, int | None] = {name: None for name in runnable}
    for _ in range(repeats):
        for name in runnable:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            methods[name](model, batch)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - base
                peaks[name] = max(peaks[name] or 0, peak)
    out: dict[str, tuple[float, Grads, int | None] | Exception] = {}
    for name, r in results.items():
        if isinstance(r, Exception):
            out[name] = r
        else:
            out[name] = (statistics.median(times[name]), r, peaks[name])
    return out


def rel_err(a: Grads, b: Grads) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5 if den else float("nan")


def fmt_mem(peak: int | None, estimate: int) -> str:
    if peak is not None:
        return f"{peak / 2**20:8.1f} MiB"
    return f"~{estimate / 2**20:6.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    configs = (
        [("mlp", 16)]
        if args.quick
        else [(kind, b) for kind in ("mlp", "cnn", "transformer") for b in (16, 64, 256)]
    )

    methods: dict[str, Callable[[nn.Module, Batch], Grads]] = {
        "naive loop": run_naive,
        "engine": run_engine,
        "engine chunk=B": run_engine_unchunked,
        "func recipe": run_func_recipe,
    }
    notes = []
    for name, made in (("opacus", make_opacus()), ("backpack", make_backpack())):
        if isinstance(made, str):
            notes.append(f"{name}: skipped ({made})")
        else:
            methods[name] = made

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"repeats {repeats}, engine chunk_size {CHUNK}"
    )
    for note in notes:
        print(note)
    mem_kind = "peak alloc" if device.type == "cuda" else "grads held (est.)"
    header = f"{'model':<12}{'B':>5}  {'method':<16}{'ms':>10}{'x naive':>9}{'rel err':>10}"
    print(f"{header}  {mem_kind}")
    for kind, b in configs:
        model, batch = make(kind, b, device)
        n_params = sum(p.numel() for p in model.parameters())
        results = measure(methods, model, batch, repeats, device)
        first = results["naive loop"]
        assert not isinstance(first, Exception)
        base_time, ref, _ = first
        for name, res in results.items():
            if isinstance(res, Exception):
                print(f"{kind:<12}{b:>5}  {name:<16}failed: {type(res).__name__}: {res}"[:140])
                continue
            t, grads, peak = res
            held = min(b, CHUNK) if name == "engine" else b
            print(
                f"{kind:<12}{b:>5}  {name:<16}{t * 1e3:10.2f}{base_time / t:9.2f}"
                f"{rel_err(grads, ref):10.1e}  {fmt_mem(peak, held * n_params * 4)}"
            )
        print(f"{'':<12}{'':>5}  ({n_params} parameters)")


if __name__ == "__main__":
    main()

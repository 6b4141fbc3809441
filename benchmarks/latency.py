"""Detection latency and steady-state cost of the default ``GradientAudit()``.

Usage: python benchmarks/latency.py [--steps N] [--repeats R] [--onset K] [--models a,b]
       [--threads T] [--no-latency]

Per model (a millisecond MLP, a small CNN, a tiny-config ``transformers`` ViT from
tests/zoo_real.py, and a GAN in manual optimization for the leak):

* **latency**: each per-step bug is planted at batch ``--onset`` of a run with the default
  ``GradientAudit()`` (real timings, real budget): a NaN from that batch on (the output of the
  first layer), ``zero_grad`` no longer called, the first layer detached, and for the GAN the
  generator loss leaking into the discriminator's step. Printed: optimizer steps (``global_step``)
  from the start of the onset batch to the end of the batch at whose end the finding is in
  ``audit.findings``, against the bound the SPEC
  states (10 for NaN/Inf, 50 for the rest), and for the NaN whether the finding names the
  onset step and batch.
* **steady-state overhead**: the same model trained clean for ``--steps`` batches without
  the audit, with a callback that does nothing (what Lightning's dispatch of any callback's
  hooks costs), and with the audit, in turn (A N B, N B A, B A N, ...), timing the batches from the
  100th on in wall time and in this process's CPU time; printed are the ratios to the run
  without a callback of the fastest runs (the least disturbed by other load on a shared
  machine) and of the medians, the audit's own measure of its steady state
  (``overhead.steady_state.measured`` in the report), the time per batch in the hooks of the
  audit and of the callback that does nothing as Lightning calls them (timed around each call
  in Lightning's own dispatch, so the audit's hook wrappers are in it, its tensor hooks not), its
  one-time first-batch cost in seconds and in training steps, the share of batches its per-step
  checks watched, and the load average (1 min) before and after: wall-time figures taken under
  load are not a measure of the audit.

Not a test: the suite pins the latency bounds in steps (tests/callbacks/test_latency.py), which
do not depend on machine speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch.trainer.call as lightning_call
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.pacing import LATENCY_BOUNDS
from tests import zoo, zoo_real
from tests.zoo import FirstSeen

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

CODES = {
    "nan": "nonfinite-grad",
    "no_zero_grad": "missing-zero-grad",
    "detach": "missing-grad",
    "leak": "gradient-leak",
}


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def images(steps: int, batch_size: int, channels: int = 1, size: int = 28) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch_size, channels, size, size, generator=g)
    y = torch.randint(0, 3, (steps * batch_size,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# A model: (module, its data for `steps` batches, the layer bugs are planted on)
Model = tuple[L.LightningModule, DataLoader, nn.Module]


def mlp(steps: int) -> Model:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return Classifier(net), images(steps, 32), net[1]


def cnn(steps: int) -> Model:
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
    return Classifier(net), images(steps, 64), net[0]


def vit(steps: int) -> Model:
    module = zoo_real.HFModule("vit")
    data = zoo_real.image_loader(n=8 * steps, batch_size=8)
    return module, data, module.model.vit.embeddings


def gan(steps: int) -> Model:
    module = zoo.GAN("zero_first")
    return module, zoo.gan_data(n=4 * steps), module.discriminator


MODELS: dict[str, Callable[[int], Model]] = {"mlp": mlp, "cnn": cnn, "vit": vit, "gan": gan}
BUGS: dict[str, tuple[str, ...]] = {
    "mlp": ("nan", "no_zero_grad", "detach"),
    "cnn": ("nan", "no_zero_grad", "detach"),
    "vit": ("nan", "no_zero_grad", "detach"),
    "gan": ("leak",),
}


def _trainer(callbacks: list[L.Callback], steps: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=1, limit_train_batches=steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir="/tmp/grad_audit_bench",
    )


class SteadyClock(L.Callback):
    """Wall and CPU time from the start of batch ``start`` to the end of training."""

    def __init__(self, start: int = 100) -> None:
        self.start = start
        self.t0: tuple[float, float] | None = None
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.start:
            self.t0 = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        assert self.t0 is not None
        self.seconds = time.perf_counter() - self.t0[0]
        self.cpu_seconds = time.process_time() - self.t0[1]


class Nothing(L.Callback):
    """A callback that does nothing: Lightning still calls each of its hooks at every batch."""


class HookTimes:
    """Seconds each callback spent in the hooks Lightning called on it, from batch ``start`` on:
    Lightning's ``_call_callback_hooks``, with a timer around each callback's call (its
    profiler's context manager stays outside the timer, as for every callback)."""

    def __init__(self, start: int = 100) -> None:
        self.start = start
        self.seconds: dict[str, float] = {}
        self._original = lightning_call._call_callback_hooks

    def __enter__(self) -> HookTimes:
        original = self._original

        def timed(trainer: L.Trainer, hook_name: str, *args: Any, **kwargs: Any) -> None:
            if trainer.fit_loop.epoch_loop.total_batch_idx < self.start or kwargs:
                original(trainer, hook_name, *args, **kwargs)
                return
            pl_module = trainer.lightning_module
            if pl_module:
                previous = pl_module._current_fx_name
                pl_module._current_fx_name = hook_name
            for callback in trainer.callbacks:
                fn = getattr(callback, hook_name)
                if callable(fn):
                    with trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook_name}"):
                        t0 = time.perf_counter()
                        fn(trainer, trainer.lightning_module, *args)
                        spent = time.perf_counter() - t0
                    name = type(callback).__name__
                    self.seconds[name] = self.seconds.get(name, 0.0) + spent
            if pl_module:
                pl_module._current_fx_name = previous

        lightning_call._call_callback_hooks = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        lightning_call._call_callback_hooks = self._original


def latency(name: str, bug: str, onset: int, after: int) -> dict[str, Any]:
    torch.manual_seed(0)
    steps = onset + after
    if bug == "leak":
        module: L.LightningModule = zoo.LeakingGAN(onset)
        data = zoo.gan_data(n=4 * steps)
    else:
        module, data, layer = MODELS[name](steps)
        zoo.plant(module, bug, onset, layer)
    audit = GradientAudit(on_finding="log")
    seen = FirstSeen(audit)
    _trainer([audit, seen], steps).fit(module, data)
    code = CODES[bug]
    found = seen.at.get(code)
    # In optimizer steps, as the bounds are (the GAN takes two per batch).
    out: dict[str, Any] = {"steps": seen.steps_after(code, onset)}
    if bug == "nan" and found is not None:
        finding = next(f for f in audit.findings if f.code == code)
        per_batch = 2 if name == "gan" else 1
        out["named"] = (
            finding.step == onset * per_batch and finding.data.get("first_batch_idx") == onset
        )
    return out


def overhead(name: str, steps: int, repeats: int) -> dict[str, Any]:
    wall: dict[str, list[float]] = {"bare": [], "nothing": [], "audit": []}
    cpu: dict[str, list[float]] = {"bare": [], "nothing": [], "audit": []}
    hooks: dict[str, list[float]] = {"nothing": [], "audit": []}  # seconds per steady batch
    reports: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    arms = list(wall)
    for repeat in range(repeats):
        # The order turns at each repeat (A N B, N B A, B A N, ...): no arm always runs last.
        for arm in arms[repeat % 3 :] + arms[: repeat % 3]:
            torch.manual_seed(0)
            module, data, _ = MODELS[name](steps)
            clock = SteadyClock()
            callbacks: list[L.Callback] = [clock]
            audit = GradientAudit(on_finding="log") if arm == "audit" else None
            if audit is not None:
                callbacks.append(audit)
            elif arm == "nothing":
                callbacks.append(Nothing())
            with HookTimes() as timed:
                _trainer(callbacks, steps).fit(module, data)
            wall[arm].append(clock.seconds)
            cpu[arm].append(clock.cpu_seconds)
            if arm in hooks:
                timed_class = "GradientAudit" if arm == "audit" else "Nothing"
                hooks[arm].append(timed.seconds.get(timed_class, 0.0) / (steps - 100))
            if audit is not None:
                reports.append(audit.report_extras()["overhead"])
    last = reports[-1]

    def ratios(times: dict[str, list[float]], arm: str) -> tuple[float, float]:
        fastest = min(times[arm]) / min(times["bare"])
        return fastest, statistics.median(times[arm]) / statistics.median(times["bare"])

    audit_hooks, nothing_hooks = (statistics.median(hooks[arm]) for arm in ("audit", "nothing"))
    return {
        "ratio": ratios(wall, "audit"),
        "ratio_nothing": ratios(wall, "nothing"),
        "cpu_ratio": ratios(cpu, "audit"),
        "cpu_ratio_nothing": ratios(cpu, "nothing"),
        "steady_measured": statistics.median(r["steady_state"]["measured"] for r in reports),
        "step_ms": 1e3 * min(wall["bare"]) / (steps - 100),
        # The audit's hooks, less a do-nothing callback's, as a share of a step (medians).
        "hooks_us": (1e6 * audit_hooks, 1e6 * nothing_hooks),
        "hooks_share": (audit_hooks - nothing_hooks) / (min(wall["bare"]) / (steps - 100)),
        "one_time_s": last["one_time"]["seconds"],
        "one_time_steps": last["one_time"]["training_steps"],
        "watched": last["watched_share"],
        "load": (load_before, os.getloadavg()[0]),
    }


def _pair(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} / {pair[1]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="batches per overhead run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onset", type=int, default=150, help="batch where bugs start")
    parser.add_argument("--after", type=int, default=70, help="batches run after the onset")
    parser.add_argument("--models", default="mlp,cnn,vit,gan")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the quietest wall times)"
    )
    parser.add_argument("--no-latency", action="store_true", help="the cost only")
    parser.add_argument("--no-cost", action="store_true", help="the latency only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    costs: list[tuple[str, dict[str, Any]]] = []
    for name in args.models.split(","):
        cost = None if args.no_cost else overhead(name, args.steps, args.repeats)
        for bug in () if args.no_latency else BUGS[name]:
            found = latency(name, bug, args.onset, args.after)
            rows.append((name, bug, found, cost))
            steps = "not found" if found["steps"] is None else found["steps"]
            named = {True: " (first step named)", False: " (first step NOT named)"}.get(
                found.get("named"), ""
            )
            print(
                f"{name:4s} {bug:13s} steps to finding {steps!s:>9s} "
                f"(bound {LATENCY_BOUNDS[CODES[bug]]}){named}",
                flush=True,
            )
        if cost is None:
            continue
        costs.append((name, cost))
        print(
            f"{name:4s} step {cost['step_ms']:.2f} ms | steady ratios to no callback (fastest / "
            f"median): wall {_pair(cost['ratio'])}, cpu {_pair(cost['cpu_ratio'])}; a callback "
            f"doing nothing: wall {_pair(cost['ratio_nothing'])}, cpu "
            f"{_pair(cost['cpu_ratio_nothing'])} | audit's own steady measure "
            f"{cost['steady_measured']:.3f} | hooks per batch {cost['hooks_us'][0]:.0f} us "
            f"(nothing {cost['hooks_us'][1]:.0f} us): {cost['hooks_share']:.3f} of a step | "
            f"one-time {cost['one_time_s']:.3f} s = "
            f"{cost['one_time_steps']:.0f} steps | watched {cost['watched']:.2f} | load "
            f"{cost['load'][0]:.1f}-{cost['load'][1]:.1f}",
            flush=True,
        )
    if costs:
        print()
        _cost_table(costs)
    if not rows:
        return
    print()
    print("| model | bug | steps to finding (bound) |")
    print("|---|---|---|")
    for name, bug, found, _ in rows:
        steps = "not found" if found["steps"] is None else str(found["steps"])
        print(f"| {name} | {bug} | {steps} ({LATENCY_BOUNDS[CODES[bug]]}) |")


def _cost_table(costs: list[tuple[str, dict[str, Any]]]) -> None:
    print("| model | step (ms) | audit: wall / cpu ratio, fastest (median) | a callback doing "
          "nothing: wall / cpu | audit's steady measure | hooks per batch: audit / nothing (us) "
          "| audit less nothing, of a step | one-time (s / steps) | watched | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cost in costs:
        print(
            f"| {name} | {cost['step_ms']:.1f} | {cost['ratio'][0]:.3f} "
            f"({cost['ratio'][1]:.3f}) / {cost['cpu_ratio'][0]:.3f} ({cost['cpu_ratio'][1]:.3f})"
            f" | {cost['ratio_nothing'][0]:.3f} / {cost['cpu_ratio_nothing'][0]:.3f} | "
            f"{cost['steady_measured']:.3f} | {cost['hooks_us'][0]:.0f} / {cost['hooks_us'][1]:.0f}"
            f" | {cost['hooks_share']:.3f} | {cost['one_time_s']:.2f} / "
            f"{cost['one_time_steps']:.0f} | {cost['watched']:.2f} | {cost['load'][0]:.1f}-"
            f"{cost['load'][1]:.1f} |"
        )


if __name__ == "__main__":
    main()

"""Wall-time overhead of the audit on training, run side by side in one process.

Usage: python benchmarks/overhead.py [--steps N] [--repeats R] [--quick]

Each configuration trains the same model from the same seed with and without the callback,
alternating (A B A B ...) so that drift in machine load hits both. Printed: the ratio of the
fastest runs (the least disturbed by other load: the figure to quote on a shared machine) and of
the median runs, and for ``GradientAudit()`` what its report states: the overhead it measured
(its hooks and its tensor hooks against the training time; steady where wall-time ratios are
not) and the share of batches its per-step checks watched. Targets: ZeroGradCheck at most 1.01
on CPU; GradientAudit() defaults at most 1.03.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grad_callbacks import (
    AutogradCheck,
    BatchMixingCheck,
    GradientAudit,
    GradientSanityCheck,
    PerSampleGradientCheck,
    ZeroGradCheck,
)

warnings.filterwarnings("ignore")


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def data(steps: int, batch_size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (steps * batch_size,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def train_seconds(make_net: Callable[[], nn.Module], callbacks: list, steps: int) -> float:
    torch.manual_seed(0)
    module = Classifier(make_net())
    trainer = L.Trainer(
        max_epochs=1, accelerator="auto", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    loader = data(steps)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one short configuration")
    parser.add_argument("--only", default="", help="comma-separated callback names to run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 60, 2
    configs: dict[str, Callable[[], list]] = {
        "ZeroGradCheck": lambda: [ZeroGradCheck()],
        "PerSampleGradientCheck": lambda: [PerSampleGradientCheck()],
        "BatchMixingCheck": lambda: [BatchMixingCheck()],
        "GradientSanityCheck": lambda: [GradientSanityCheck()],
        "AutogradCheck": lambda: [AutogradCheck()],
        "GradientAudit()": lambda: [GradientAudit()],
    }
    parser_only = args.only.split(",") if args.only else None
    if parser_only:
        configs = {k: v for k, v in configs.items() if k in parser_only}
    models = {"mlp": mlp, "cnn": cnn}
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"torch threads: {torch.get_num_threads()}, steps: {args.steps}, "
          f"repeats: {args.repeats}")
    print(
        f"{'model':<6} {'callback':<24} {'base min s':>10} {'with min s':>10} "
        f"{'ratio min':>9} {'ratio median':>12}"
    )
    for model_name, make_net in models.items():
        train_seconds(make_net, [], 10)  # warm-up
        for config_name, make_callbacks in configs.items():
            base, with_cb, measured, watched = [], [], [], []
            for _ in range(args.repeats):
                base.append(train_seconds(make_net, [], args.steps))
                callbacks = make_callbacks()
                with_cb.append(train_seconds(make_net, callbacks, args.steps))
                for cb in callbacks:
                    if isinstance(cb, GradientAudit) and cb.budget is not None:
                        measured.append(cb.budget.overhead)
                        watched.append(cb.watch_windows.watched_share if cb.watch_windows else 1)
            b, w = min(base), min(with_cb)
            median = statistics.median(with_cb) / statistics.median(base)
            own = ""
            if measured:
                own = (
                    f"   measured by the audit: {statistics.median(measured):.2%}, "
                    f"batches watched: {statistics.median(watched):.0%}"
                )
            print(
                f"{model_name:<6} {config_name:<24} {b:>10.3f} {w:>10.3f} "
                f"{w / b:>9.3f} {median:>12.3f}{own}"
            )


if __name__ == "__main__":
    main()

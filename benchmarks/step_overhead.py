"""Per-step cost of the audit's always-on parts, measured on a bare training step.

Usage: python benchmarks/step_overhead.py [--repeats R] [--steps N] [--threads T]

Wall-time ratios of whole Lightning runs vary by +-30% on a shared machine, more than the few
percent to be measured. This script times a bare step (``zero_grad``, forward, backward, Adam)
in tight loops, with and without what ``GradientAudit()`` attaches to every step, interleaved
(A B C A B C ...), and prints the fastest loop of each (the least disturbed by other load):

* ``ledger``: ``ZeroGradCheck``'s gradient ledger (two Python tensor hooks per parameter and
  backward pass, called by autograd; not counted by the check's own timer);
* ``sanity``: ``GradientSanityCheck``'s per-step gradient norms (one ``_foreach_norm`` and a
  ``stack``; rows read every 50 steps);
* ``both``.

Models: the MLP and CNN of ``benchmarks/overhead.py``, batch 64, and a wider MLP
(784-2048-2048-10) whose step is long enough for per-parameter costs to fade.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cnn, mlp

from grad_callbacks.core.grad_stats import GradSanityMonitor
from grad_callbacks.core.ledger import GradientLedger


def wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
        nn.Linear(2048, 10),
    )


def measure(make_net: Callable[[], nn.Module], repeats: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    named = list(net.named_parameters())
    ledger = GradientLedger(named, [opt])
    sanity = GradSanityMonitor([named])

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    def with_sanity() -> None:
        step()
        sanity.observe(0, 0)
        if sanity.pending_steps >= 50:
            sanity.collect()

    def loop(body: Callable[[], None]) -> float:
        body()
        start = time.perf_counter()
        for _ in range(steps):
            body()
        return (time.perf_counter() - start) / steps

    best = {"bare": float("inf"), "ledger": float("inf"), "sanity": float("inf"),
            "both": float("inf")}
    for _ in range(repeats):
        best["bare"] = min(best["bare"], loop(step))
        ledger.attach()
        best["ledger"] = min(best["ledger"], loop(step))
        best["both"] = min(best["both"], loop(with_sanity))
        ledger.detach()
        best["sanity"] = min(best["sanity"], loop(with_sanity))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}, fastest of {args.repeats} loops of {args.steps} steps")
    print(f"{'model':<9} {'bare ms':>8} {'ledger':>14} {'sanity':>14} {'both':>14}")
    for name, make in (("mlp", mlp), ("cnn", cnn), ("wide mlp", wide_mlp)):
        t = measure(make, args.repeats, args.steps)
        cells = [
            f"+{(t[k] - t['bare']) * 1e3:.3f} ({t[k] / t['bare'] - 1:+.1%})"
            for k in ("ledger", "sanity", "both")
        ]
        print(f"{name:<9} {t['bare'] * 1e3:>8.2f} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()

"""Cost of one RankSyncCheck checked step, as a ratio to a training step.

Usage: python benchmarks/rank_sync.py [--device cpu|cuda] [--repeats R] [--threads T]

The model is a stack of 24 Transformer encoder layers (d_model 256): 290 parameter tensors,
19M parameters, trained with AdamW on a batch of 16 sequences of 64 tokens. Timed in
interleaved loops (the fastest of ``--repeats`` each, the least disturbed by other load):

* ``step``: a bare training step (``zero_grad``, forward, backward, AdamW);
* ``check``: what a checked step adds on one rank, without the collective: the rows of the
  stepping optimizer (fingerprints of every gradient and parameter, their norms), the packing,
  and the device-side comparison with one read (:func:`summary` on a gathered table of one
  rank, as every rank does after the ``all_gather``).

The ``all_gather`` itself moves 48 bytes per parameter tensor and rank (14 KB per rank here):
latency-bound, a few tens of microseconds on NVLink or InfiniBand, not measured here.

Printed: both times, the ratio check/step, and the overhead at the default schedule (a check
every 16 optimizer steps, after the first 2): ratio / 16.
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

from grad_callbacks.core.rank_sync import pack, step_rows, summary


def model() -> nn.Module:
    layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=24), nn.Linear(256, 256))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fastest(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = model().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(16, 64, 256, device=device)
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> None:
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()

    def check() -> None:
        mine = pack(step_rows(params), layout=1, step=0, capacity=len(params) + 8)
        summary(mine.unsqueeze(0)).tolist()  # the one read of a checked step

    step()
    check()
    times: dict[str, list[float]] = {"step": [], "check": []}
    for _ in range(args.repeats):
        times["step"].append(fastest(step, device, args.inner))
        times["check"].append(fastest(check, device, args.inner))
    step_s, check_s = min(times["step"]), min(times["check"])
    numel = sum(p.numel() for p in params)
    print(f"device {device}, {len(params)} parameter tensors, {numel / 1e6:.1f}M parameters")
    print(f"training step      {step_s * 1e3:9.2f} ms")
    print(f"checked step adds  {check_s * 1e3:9.2f} ms  (fingerprints of gradients and params)")
    print(f"ratio check / step {check_s / step_s:9.3f}")
    print(f"overhead at every_n_steps=16: {check_s / step_s / 16:.2%} of training time")


if __name__ == "__main__":
    main()

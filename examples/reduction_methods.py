"""Per-sample gradients vs reduction="sum" vs reduction="mean": they agree, when done right.

A classic confusion: compute per-sample gradients (``reduction="none"``, one backward pass per
sample), compare their mean with the gradient of ``reduction="mean"`` (or ``reduction="sum"``
divided by the batch size), and see a difference. With correct code there is none (barring layers
that couple samples, such as train-mode BatchNorm). The difference comes from saving
``param.grad`` (or a ``.view`` of it) without ``.clone()``: ``zero_grad(set_to_none=False)`` and
the next ``backward()`` write into that same tensor, so every saved "per-sample gradient" ends up
holding the last sample's.

Run it: ``python examples/reduction_methods.py``. It prints the largest difference of each method
from the ``reduction="mean"`` gradient, and checks them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from grad_callbacks.core.per_sample import per_sample_grad_stats


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def main() -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    b = len(x)

    # 1. reduction="mean": the reference.
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="mean").backward()
    mean_grad = flat_grad(model).clone()

    # 2. reduction="sum", divided by the batch size.
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    sum_grad = flat_grad(model).clone() / b

    # 3. reduction="none", one backward pass per sample, gradients cloned: correct.
    per_sample = []
    for i in range(b):
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y, reduction="none")[i].backward()
        per_sample.append(flat_grad(model).clone())
    cloned_mean = torch.stack(per_sample).mean(dim=0)

    # 4. The same loop saving views of .grad without .clone(): the pitfall.
    aliased = []
    for i in range(b):
        model.zero_grad(set_to_none=False)  # zeroes the SAME tensors in place
        F.cross_entropy(model(x), y, reduction="none")[i].backward()
        aliased.append([p.grad.view(-1) for p in model.parameters()])  # views, no copy
    aliased_mean = torch.stack([torch.cat(views) for views in aliased]).mean(dim=0)

    # 5. grad_callbacks' engine (torch.func vmap), which never touches .grad.
    stats = per_sample_grad_stats(model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
                                  (x, y))
    engine_mean = torch.cat([g.reshape(-1) for g in stats.mean_grad.values()])

    estimates = {
        'reduction="sum" / B': sum_grad,
        'reduction="none", one backward each, .clone()': cloned_mean,
        "torch.func engine (grad_callbacks)": engine_mean,
        ".grad.view(...) saved WITHOUT .clone()": aliased_mean,
    }
    results = {k: (v - mean_grad).abs().max().item() for k, v in estimates.items()}
    scale = mean_grad.abs().max().item()
    print(f"largest |difference| from the reduction='mean' gradient (largest entry {scale:.3g})")
    for name, diff in results.items():
        print(f"  {name:<48} {diff:.2e}")
    last = per_sample[-1]
    print("\nWithout .clone(), every saved 'per-sample gradient' is the last sample's:",
          all(torch.equal(torch.cat(views), last) for views in aliased))

    correct = [k for k in results if "WITHOUT" not in k]
    assert all(results[k] < 1e-5 * max(scale, 1.0) for k in correct), results
    assert results[".grad.view(...) saved WITHOUT .clone()"] > 1e-3 * scale, results
    return results


if __name__ == "__main__":
    main()

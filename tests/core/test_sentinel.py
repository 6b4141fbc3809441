"""The always-on sentinels, against hand-made losses and gradients."""

from __future__ import annotations

import torch

from grad_callbacks.core.sentinel import ClearSentinel, FiniteSentinel, NonFinite


def _drive(sentinel: FiniteSentinel, losses: list[float], grads: list[float]) -> NonFinite | None:
    for step, (loss, grad) in enumerate(zip(losses, grads, strict=True)):
        sentinel.add_loss(torch.tensor(loss), step, batch_idx=100 + step)
        if sentinel.due():
            sentinel.check([torch.full((3,), grad), torch.ones(2)], step, batch_idx=100 + step)
    return sentinel.poll()


def test_the_first_nonfinite_loss_is_named_whenever_the_look_comes() -> None:
    for first in range(12):
        losses = [1.0 if s < first else float("nan") for s in range(12)]
        found = _drive(FiniteSentinel(every=5), losses, [1.0] * 12)
        if first < 10:  # looks at steps 4 and 9 cover steps 0..9
            assert found == NonFinite(first, 100 + first, "loss")
        else:
            assert found is None


def test_a_nonfinite_gradient_under_a_finite_loss_is_seen_at_the_next_look() -> None:
    grads = [1.0] * 6 + [float("inf")] * 6
    assert _drive(FiniteSentinel(every=5), [1.0] * 12, grads) == NonFinite(9, 109, "gradients")
    assert _drive(FiniteSentinel(every=5), [1.0] * 12, [1.0] * 12) is None


def test_clear_sentinel_sees_the_same_gradient_tensor_again() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sentinel = ClearSentinel([opt])
    seen = []
    for step in range(6):
        if step < 3:
            opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        seen.append(sentinel.step(0))
        opt.step()
    # zero_grad() (set_to_none) gives a new tensor each step; from step 3 on it is the same
    assert seen == [False, False, False, True, True, True]

"""The always-on sentinels, against hand-made losses and gradients."""

from __future__ import annotations

import itertools

import torch

from grad_callbacks.core.sentinel import ClearSentinel, FiniteSentinel, NonFinite, WithoutGrad


def _param(grad: torch.Tensor | None) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(3 if grad is None else grad.shape))
    p.grad = grad
    return p


def _drive(sentinel: FiniteSentinel, losses: list[float], grads: list[float]) -> NonFinite | None:
    for step, (loss, grad) in enumerate(zip(losses, grads, strict=True)):
        sentinel.add_loss(torch.tensor(loss), step, batch_idx=100 + step)
        if sentinel.due():
            params = [_param(torch.full((3,), grad)), _param(torch.ones(2))]
            sentinel.check(params, step, batch_idx=100 + step)
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


def test_optimizers_stepping_in_turn_are_each_looked_at_every_few_steps() -> None:
    """Two optimizers in turn (a GAN): a look every 8 steps of either would always land on
    the same one."""
    sentinel = FiniteSentinel(every=8)
    looks = [(step, step % 2) for step in range(1, 41) if sentinel.due(step % 2)]
    assert {optimizer for _, optimizer in looks} == {0, 1}
    for optimizer in (0, 1):
        steps = [step for step, o in looks if o == optimizer]
        assert all(b - a <= 8 for a, b in itertools.pairwise(steps))
        assert steps[0] <= 9


def test_a_look_names_the_parameters_without_a_gradient() -> None:
    """None, or all zeros (``zero_grad(set_to_none=False)`` on a parameter the loss missed), at
    the latest look; a gradient with some zeros is not missing, nor a frozen parameter."""
    sentinel = FiniteSentinel(every=1)
    none, zeros, some = _param(None), _param(torch.zeros(4)), _param(torch.tensor([0.0, 1.0]))
    frozen = _param(None)
    frozen.requires_grad_(False)
    sentinel.due()
    sentinel.check([none, zeros, some, frozen], step=7, batch_idx=3)
    assert sentinel.poll() is None
    assert sentinel.without_grad == WithoutGrad(7, 3, frozenset({id(none), id(zeros)}))
    # the next look sees them all with gradients: nothing missing any more
    none.grad, zeros.grad = torch.ones(3), torch.ones(4)
    sentinel.due()
    sentinel.check([none, zeros, some, frozen], step=8, batch_idx=4)
    sentinel.poll()
    assert sentinel.without_grad is None


def test_under_a_scaler_only_missing_gradients_are_looked_for() -> None:
    sentinel = FiniteSentinel(every=1, count_nonfinite=False)
    sentinel.add_loss(torch.tensor(float("nan")), 0, 0)
    sentinel.due()
    sentinel.check([_param(torch.full((2,), float("inf"))), _param(None)], step=0, batch_idx=0)
    assert sentinel.poll() is None
    assert sentinel.without_grad is not None and len(sentinel.without_grad.params) == 1


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

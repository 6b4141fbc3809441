"""The gradient ledger on hand-written sequences of backward / step / zero_grad (no Lightning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grad_callbacks.core.ledger import GradientLedger, StepAudit


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _backward(model: nn.Module, scale: float = 1.0) -> None:
    (model(torch.randn(5, 3)).pow(2).mean() * scale).backward()


def _ledger(model: nn.Module, *opts: torch.optim.Optimizer) -> GradientLedger:
    ledger = GradientLedger(model.named_parameters(), opts, keep_audits=100)
    ledger.attach()
    return ledger


ALL = ("0.weight", "0.bias", "2.weight", "2.bias")


def test_clean_loop_is_clean_and_counts_one_microbatch() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(4):
        opt.zero_grad()
        _backward(model)
        opt.step()
    assert [a.clean for a in ledger.step_audits] == [True] * 4
    assert [a.microbatches for a in ledger.step_audits] == [1] * 4
    assert ledger.steps_taken == [4]


def test_missing_zero_grad_fires_from_the_second_step() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        _backward(model)
        opt.step()
    first, second, third = ledger.step_audits
    assert first.clean
    assert second.uncleared == ALL and third.uncleared == ALL
    assert not second.stale and not second.leaked


def test_accumulation_window_counts_microbatches() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for window in (3, 3, 1):
        opt.zero_grad()
        for _ in range(window):
            _backward(model, 1 / 3)
        opt.step()
    assert [a.microbatches for a in ledger.step_audits] == [3, 3, 1]
    assert all(a.clean for a in ledger.step_audits)


@pytest.mark.parametrize("zero", [True, False])
def test_set_to_none_false(zero: bool) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        if zero:
            opt.zero_grad(set_to_none=False)
        _backward(model)
        opt.step()
    assert all(a.clean for a in ledger.step_audits) is zero
    if not zero:
        assert ledger.step_audits[-1].uncleared == ALL


@pytest.mark.parametrize("clear", ["none", "zeros", "missing"])
def test_unused_parameter_is_stale_only_when_not_cleared(clear: str) -> None:
    torch.manual_seed(0)
    body, aux = nn.Linear(3, 1), nn.Linear(3, 1)
    model = nn.ModuleDict({"body": body, "aux": aux})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for step in range(4):
        if clear != "missing":
            opt.zero_grad(set_to_none=clear == "none")
        x = torch.randn(5, 3)
        loss = body(x).pow(2).mean()
        if step % 2 == 0:
            loss = loss + aux(x).pow(2).mean()
        loss.backward()
        opt.step()
    audits = ledger.step_audits
    if clear != "missing":
        assert all(a.clean for a in audits)
    else:
        # odd steps: aux got no new contribution but kept its old gradient
        assert audits[1].stale == ("aux.weight", "aux.bias")
        assert audits[1].uncleared == ("body.weight", "body.bias")
        # even steps: aux gets a new contribution on top of the old one
        assert set(audits[2].uncleared) == {"body.weight", "body.bias", "aux.weight", "aux.bias"}


def test_gan_leak_and_its_fix() -> None:
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 3), nn.Linear(3, 1)
    model = nn.ModuleDict({"gen": gen, "disc": disc})
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)

    def run(leak: bool) -> list[StepAudit]:
        ledger = _ledger(model, opt_g, opt_d)
        for _ in range(3):
            fake = gen(torch.randn(4, 2))
            real = torch.randn(4, 3)
            opt_g.zero_grad()
            (-disc(fake).mean()).backward()  # reaches the discriminator too
            opt_g.step()
            if not leak:
                opt_d.zero_grad()
            (disc(fake.detach()).mean() - disc(real).mean()).backward()
            opt_d.step()
            if leak:
                opt_d.zero_grad()
        ledger.detach()
        return ledger.step_audits

    leaky = run(leak=True)
    d_steps = [a for a in leaky if a.optimizer_index == 1]
    assert all(a.leaked == ("disc.weight", "disc.bias") for a in d_steps)
    assert all(a.leaked_from == (0,) for a in d_steps)
    assert not any(a.uncleared or a.stale for a in leaky)
    assert all(a.clean for a in run(leak=False))


def test_one_backward_two_optimizers_is_not_a_leak() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    model = nn.Sequential(a, b)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1)
    ledger = _ledger(model, opt_a, opt_b)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        _backward(model)
        opt_a.step()
        opt_b.step()
    assert all(x.clean for x in ledger.step_audits)


def test_clipping_between_steps_does_not_hide_missing_zero_grad() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        _backward(model)
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    assert ledger.step_audits[-1].uncleared == ALL


def test_clipping_with_zero_grad_is_clean() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        _backward(model)
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    assert all(a.clean for a in ledger.step_audits)


def test_autograd_grad_is_not_a_contribution() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        opt.zero_grad()
        _backward(model)
        loss = model(torch.randn(2, 3)).sum()
        torch.autograd.grad(loss, list(model.parameters()))  # e.g. a gradient penalty probe
        opt.step()
    assert all(a.clean and a.microbatches == 1 for a in ledger.step_audits)


def test_parameter_unfrozen_later_is_hooked_on_refresh() -> None:
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    model[0].requires_grad_(True)
    ledger.refresh()
    for _ in range(2):
        _backward(model)  # no zero_grad: the unfrozen layer must be caught too
        opt.step()
    assert "0.weight" in ledger.step_audits[-1].uncleared


def test_tied_parameters_are_tracked_once() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3)
    out = nn.Linear(3, 5, bias=False)
    out.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "out": out})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(2):
        opt.zero_grad()
        out(emb(torch.tensor([1, 2]))).sum().backward()
        opt.step()
    assert all(a.clean and a.params_with_grad == 1 for a in ledger.step_audits)


def test_detach_stops_recording() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    ledger.detach()
    _backward(model)
    opt.step()
    assert ledger.step_audits == []


def test_ledger_never_touches_gradients() -> None:
    model_a, model_b = _model(1), _model(1)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    _ledger(model_a, opt_a)
    for opt, model in ((opt_a, model_a), (opt_b, model_b)):
        torch.manual_seed(3)
        for i in range(4):
            if i != 2:  # one missing zero_grad: the ledger reads dirty state too
                opt.zero_grad(set_to_none=i % 2 == 0)
            _backward(model)
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_device_is_read_only_when_needed(set_to_none: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With set_to_none=True nothing is ever tested on the device; with False, tests are made."""
    import grad_callbacks.core.ledger as ledger_module

    calls: list[int] = []
    real = ledger_module._all_zero
    monkeypatch.setattr(ledger_module, "_all_zero", lambda g: calls.append(1) or real(g))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        for _ in range(2):
            _backward(model)
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    assert all(a.clean for a in ledger.step_audits)
    assert (len(calls) == 0) is set_to_none


@pytest.mark.parametrize("zero_grad", [True, False])
def test_after_a_pause_the_first_step_is_not_judged_and_the_second_is(zero_grad: bool) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    _backward(model)
    opt.step()
    ledger.pause()
    seconds = ledger.hook_seconds
    for _ in range(2):  # unwatched steps: no hook runs, nothing is audited
        if zero_grad:
            opt.zero_grad(set_to_none=False)
        _backward(model)
        opt.step()
    assert ledger.hook_seconds == seconds and len(ledger.step_audits) == 1
    ledger.resume()  # .grad holds what the last unwatched backward left
    for _ in range(2):
        if zero_grad:
            opt.zero_grad(set_to_none=False)
        _backward(model)
        opt.step()
    first, second = ledger.step_audits[1:]
    assert not first.previous_seen and first.clean
    assert first.microbatches == 1  # what .grad held before resuming is not a micro-batch
    assert second.previous_seen and second.microbatches == 1
    assert second.uncleared == (() if zero_grad else ALL)
    assert ledger.steps_taken == [3]  # the steps it saw


def test_held_gradients_of_two_optimizers_across_a_pause_are_not_a_leak() -> None:
    """Both optimizers' gradients hold zeros from before the pause (set_to_none=False): what
    was there before is nobody's backward pass, so no step leaks it to another."""
    g, d = _model(0), _model(1)
    opt_g = torch.optim.SGD(g.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1)
    named = [*(("g." + n, p) for n, p in g.named_parameters()), *d.named_parameters()]
    ledger = GradientLedger(named, [opt_g, opt_d], keep_audits=100)
    ledger.attach()
    for resumed in (False, True, True):
        if resumed:
            ledger.pause()
            ledger.resume()
        for _ in range(2):
            for model, opt in ((d, opt_d), (g, opt_g)):
                _backward(model)
                opt.step()
                opt.zero_grad(set_to_none=False)
    assert all(a.clean for a in ledger.step_audits)
    assert [a.microbatches for a in ledger.step_audits] == [1] * 12


class _StepCallsSuper(torch.optim.SGD):
    """A subclass whose ``step`` calls ``super().step()``: once a plain SGD exists, torch has
    wrapped both ``SGD.step`` and this ``step`` with its hook runner, so every step fires the
    step hooks twice (outer and inner call)."""

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().step(*args, **kwargs)


def test_optimizer_subclass_calling_super_step_counts_one_step_per_step() -> None:
    torch.optim.SGD(_model().parameters(), lr=0.1)  # wraps SGD.step for the whole process
    model = _model()
    opt = _StepCallsSuper(model.parameters(), lr=0.1)
    fired: list[int] = []
    opt.register_step_post_hook(lambda *_: fired.append(1))
    ledger = _ledger(model, opt)
    for _ in range(3):
        opt.zero_grad()
        _backward(model)
        opt.step()
    assert len(fired) == 6  # the premise: torch fires the post-hooks twice per step
    assert ledger.steps_taken == [3]
    assert [a.clean for a in ledger.step_audits] == [True] * 3


def test_step_that_raised_does_not_stop_the_counting() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = _ledger(model, opt)
    _backward(model)
    with pytest.raises(RuntimeError):
        opt.step(closure=lambda: (_ for _ in ()).throw(RuntimeError("closure failed")))
    for _ in range(2):
        opt.zero_grad()
        _backward(model)
        opt.step()
    assert ledger.steps_taken == [2]
    assert [a.clean for a in ledger.step_audits] == [True] * 2

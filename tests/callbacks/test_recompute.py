"""isolated(): a recomputed training_step leaves no trace on the module, metrics, RNG or logs."""

from __future__ import annotations

import copy
import functools
import types
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.autograd_check import AutogradCheck
from grad_callbacks.callbacks.per_sample import PerSampleGradientCheck
from grad_callbacks.callbacks.recompute import (
    Recomputations,
    capture_rng,
    capture_state,
    isolated,
)
from tests import zoo

_ORIGINAL_BACKWARD = torch.autograd.backward


class Busy(L.LightningModule):
    """Dropout, BatchNorm, a torchmetrics metric and self.log: every side effect at once."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                                 nn.Linear(16, 3))
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.cat = torchmetrics.CatMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.acc(logits.argmax(-1), y)
        self.cat.update(loss.detach())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_isolated_restores_buffers_metrics_rng_and_mutes_log() -> None:
    module = Busy().train()
    module.training_step(_batch(), 0)  # some real state to protect
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    acc_state = {k: getattr(module.acc, k).clone() for k in module.acc._defaults}
    cat_len = len(module.cat.value)
    rng = torch.get_rng_state()
    logged: list[str] = []
    module.log = lambda name, *a, **k: logged.append(name)  # type: ignore[method-assign]

    with isolated(module):
        assert module.log is not None
        module.training_step(_batch(), 0)
        module.training_step(_batch(), 1)
    assert logged == []  # muted inside
    del module.log

    for k, v in module.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, v in acc_state.items():
        assert torch.equal(getattr(module.acc, k), v), k
    assert module.acc._update_count == 1
    assert len(module.cat.value) == cat_len
    assert torch.equal(torch.get_rng_state(), rng)
    assert "log" not in module.__dict__


def test_rng_state_replays_the_same_dropout_mask() -> None:
    drop = nn.Dropout(0.5).train()
    x = torch.ones(100)
    state = capture_rng()
    first = drop(x)
    with isolated(drop, rng_state=state):
        replay = drop(x)
    assert torch.equal(first, replay)
    assert not torch.equal(drop(x), first)  # the live stream moved on as if nothing happened


def test_isolated_in_a_real_run_keeps_logged_metrics() -> None:
    class Recomputing(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, opt: Any) -> None:
            with isolated(pl_module):
                pl_module.training_step(_batch(), 0)

    results = []
    for callbacks in ([], [Recomputing()]):
        torch.manual_seed(0)
        module = Busy()
        data = zoo.DataLoader(zoo.TensorDataset(*_batch()), batch_size=3)
        trainer = zoo.fit(module, callbacks, data=data)
        results.append((zoo.params_of(module), dict(trainer.callback_metrics)))
    (p0, m0), (p1, m1) = results
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)


# ------------------------------------------------------------------ the optimizers' other doors
# A manual-optimization training_step may reach the optimizers and schedulers without
# self.optimizers() / self.lr_schedulers(), or call loss.backward() instead of
# self.manual_backward(loss). Recomputing it (AutogradCheck does, from on_train_batch_end, when
# the loss goes through a custom autograd.Function; PerSampleGradientCheck does in automatic
# optimization) must step nothing, clear nothing and write no .grad.
class _Manual(L.LightningModule):
    """Manual optimization that reaches the optimizer through ``route`` (see training_step)."""

    def __init__(self, route: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.route = route
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(zoo.Square.apply(self.net(x)), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.loss(batch)
        real = self.trainer.optimizers[0]
        if self.route == "trainer.optimizers zero_grad":
            # Accumulates two batches; clears at the first of each pair.
            if batch_idx % 2 == 0:
                real.zero_grad()
            self.manual_backward(loss)
            if batch_idx % 2 == 1:
                self.optimizers().step()
        elif self.route == "trainer.optimizers step":
            self.manual_backward(loss)
            real.step()
            real.zero_grad(set_to_none=False)  # Adam moves on zero gradients (momentum)
        elif self.route == "strategy._lightning_optimizers zero_grad":
            wrapper = self.trainer.strategy._lightning_optimizers[0]
            if batch_idx % 2 == 0:
                wrapper.zero_grad()
            self.manual_backward(loss)
            if batch_idx % 2 == 1:
                wrapper.step()
        elif self.route == "strategy._lightning_optimizers step":
            # Lightning's wrapper runs the callbacks' on_before_optimizer_step: none may re-run.
            wrapper = self.trainer.strategy._lightning_optimizers[0]
            self.manual_backward(loss)
            wrapper.step()
            wrapper.zero_grad()
        elif self.route == "module zero_grad":
            if batch_idx % 2 == 0:
                self.zero_grad()
            self.manual_backward(loss)
            if batch_idx % 2 == 1:
                self.optimizers().step()
        elif self.route == "trainer.lr_scheduler_configs step":
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.trainer.lr_scheduler_configs[0].scheduler.step()
        elif self.route == "param_groups written":
            if batch_idx == 0:
                for group in real.param_groups:
                    group["lr"] *= 0.5  # a hand-made schedule, written in place
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        elif self.route == "raw backward":
            if batch_idx % 2 == 0:
                real.zero_grad()
            loss.backward()
            if batch_idx % 2 == 1:
                real.step()
        else:  # pragma: no cover - a typo in a test
            raise ValueError(self.route)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class _AutomaticScheduler(L.LightningModule):
    """Automatic optimization whose training_step steps the scheduler itself (per batch)."""

    def __init__(self, via_trainer: bool) -> None:
        super().__init__()
        self.via_trainer = via_trainer
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx > 0:
            sched = self.trainer.lr_scheduler_configs[0].scheduler
            (sched if self.via_trainer else self.lr_schedulers()).step()
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class _StepHooks(L.Callback):
    """Records the global step of every on_before_optimizer_step call."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, opt: Any) -> None:
        self.steps.append(trainer.global_step)


def _outcome(make: Any, callbacks: list[L.Callback]) -> dict[str, Any]:
    """Train a fresh module for 4 steps and return everything that must not change."""
    torch.manual_seed(0)
    module = make()
    hooks = _StepHooks()
    trainer = zoo.fit(module, [*callbacks, hooks], data=zoo.regression_data(n=16), max_steps=4)
    return {
        "step hooks": hooks.steps,
        "params": zoo.params_of(module),
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
    }


def _assert_untouched(make: Any, callbacks: list[L.Callback]) -> list[L.Callback]:
    alone = _outcome(make, [])
    audited = _outcome(make, callbacks)
    for key, value in alone.items():
        assert _same(value, audited[key]), f"{key} differ with {callbacks}"
    return callbacks


_MANUAL_ROUTES = [
    "trainer.optimizers zero_grad",
    "trainer.optimizers step",
    "strategy._lightning_optimizers zero_grad",
    "strategy._lightning_optimizers step",
    "module zero_grad",
    "trainer.lr_scheduler_configs step",
    "param_groups written",
]


@pytest.mark.parametrize("route", _MANUAL_ROUTES)
def test_manual_training_step_recomputed_by_the_audit_changes_nothing(route: str) -> None:
    callbacks = _assert_untouched(lambda: _Manual(route), [GradientAudit(on_finding="log")])
    autograd = next(c for c in callbacks[0].checks if isinstance(c, AutogradCheck))
    assert autograd.recomputations >= 1  # the route was really taken again by the audit


def test_manual_training_step_with_raw_backward_recomputed_changes_nothing() -> None:
    # A raw backward hides the custom Function from on_before_backward: name a module instead.
    # The recomputation runs under no_grad, so the backward raises there; either way the
    # optimizer step after it must stay inert.
    check = AutogradCheck(modules=["net.0"], on_finding="log")
    _assert_untouched(lambda: _Manual("raw backward"), [check])
    assert check.recomputations >= 1


@pytest.mark.parametrize("via_trainer", [False, True])
def test_automatic_scheduler_step_in_training_step_is_not_replayed(via_trainer: bool) -> None:
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    _assert_untouched(lambda: _AutomaticScheduler(via_trainer), [check])
    assert check.steps_checked == 4
    assert not [f for f in check.findings if f.code == "check-skipped"]


def test_raw_backward_in_isolated_never_reaches_the_live_grad() -> None:
    module = _Manual("raw backward")
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    module.loss((x, y)).backward()
    live = {k: p.grad for k, p in module.named_parameters()}
    values = {k: g.clone() for k, g in live.items()}
    hooked: list[str] = []
    for name, p in module.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: hooked.append(name))
    leaf = torch.ones(4, 8, requires_grad=True)

    with isolated(module):
        module.loss((x, y)).backward()  # the live parameters are left out
        module.loss((leaf * x, y)).backward()  # ... but a leaf of the step's own gets its grad
        torch.autograd.backward([module.loss((x, y))])
        module.loss((x, y)).backward(inputs=[module.net[0].weight])

    assert hooked == []
    for name, p in module.named_parameters():
        assert p.grad is live[name] and torch.equal(p.grad, values[name]), name
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert torch.autograd.backward is _ORIGINAL_BACKWARD


def test_real_optimizers_and_schedulers_are_put_back_exactly_even_on_error() -> None:
    module = _Manual("trainer.optimizers step")
    trainer = zoo.fit(module, [], data=zoo.regression_data(n=8), max_steps=1)
    raw = trainer.optimizers[0]
    wrapper = trainer.strategy._lightning_optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    # LRScheduler patches the optimizer's step on the instance: that patch must survive.
    objects = (raw, wrapper, sched)
    before = [dict(vars(o)) for o in objects]
    groups = [dict(g) for g in raw.param_groups]
    params = zoo.params_of(module)
    state = copy.deepcopy(raw.state_dict())

    with pytest.raises(RuntimeError, match="boom"), isolated(module, trainer=trainer):
        for opt in (raw, wrapper):
            opt.zero_grad()
            opt.step()
        sched.step()
        raw.param_groups[0]["lr"] = 123.0
        raw.param_groups[0]["extra"] = 1
        raise RuntimeError("boom")

    for obj, attrs in zip(objects, before, strict=True):
        assert vars(obj).keys() == attrs.keys()
        assert all(vars(obj)[k] is v for k, v in attrs.items())
    assert [dict(g) for g in raw.param_groups] == groups
    assert _same(zoo.params_of(module), params)
    assert _same(raw.state_dict(), state)
    assert all(p.grad is not None for p in module.parameters())
    assert torch.autograd.backward is _ORIGINAL_BACKWARD


def test_backward_given_generators_inside_isolated_works_as_in_torch() -> None:
    """torch.autograd.backward accepts iterables: the guard reads them once and still passes
    them on (a generator used up by the guard left the gradient unfilled)."""
    m = nn.Linear(2, 1)
    x = torch.ones(1, 2, requires_grad=True)
    with isolated(m):
        torch.autograd.backward(t for t in [m(x).sum()])
    assert x.grad is not None and torch.equal(x.grad, m.weight.detach().clone())
    assert m.weight.grad is None  # the live parameter is left out
    x.grad = None
    with isolated(m):
        torch.autograd.backward([m(x).sum()], inputs=(t for t in [x]))
    assert x.grad is not None and m.weight.grad is None


# ------------------------------------------------------------------ the module's Python state
class _Stateful(L.LightningModule):
    """A training_step with every Python side effect a user writes: a counter, a list of its
    own, an attribute created over a class attribute, a print, a log record, a warning."""

    mode = "class"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)
        self.calls = 0
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        import logging
        import warnings

        self.calls += 1
        self.mode = f"step {self.calls}"
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss))
        print(f"training_step call {self.calls}")
        logging.getLogger("user").warning("call %d", self.calls)
        warnings.warn(f"user warning {self.calls}", UserWarning, stacklevel=1)
        self.log("calls", float(self.calls))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_isolated_puts_the_python_state_back_and_swallows_output(capsys, caplog) -> None:
    module = _Stateful()
    losses = module.losses
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    with pytest.warns(UserWarning):
        module.training_step((x, y), 0)  # the real step
    capsys.readouterr()
    caplog.clear()
    record = Recomputations()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with isolated(module, record=record):
            module.training_step((x, y), 0)
    assert module.calls == 1 and module.mode == "step 1"
    assert module.losses is losses and len(losses) == 1
    assert capsys.readouterr().out == "" and caplog.records == []
    assert [w for w in caught if "user warning" in str(w.message)] == []
    assert record.count == 1 and record.lost == []


def test_isolated_starts_from_a_state_taken_before_the_real_step() -> None:
    module = _Stateful()
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    before = capture_state(module)
    with pytest.warns(UserWarning):
        module.training_step((x, y), 0)  # the real step
    seen: list[int] = []
    with isolated(module, state=before):
        assert module.calls == 0 and "mode" not in vars(module) and module.losses == []
        module.training_step((x, y), 0)
        seen.append(module.calls)
    assert seen == [1] and module.calls == 1 and module.mode == "step 1"
    assert len(module.losses) == 1


def test_counters_logged_values_and_checkpoints_are_as_without_the_audit(tmp_path, capsys) -> None:
    """Lightning's own tests, in small: a call counter reads N for N batches, a value logged
    from a counter is unchanged, ModelCheckpoint(monitor=...) keeps the same best score."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(audit: bool) -> tuple[_Stateful, L.Trainer, Any]:
        L.seed_everything(0)
        module = _Stateful()
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(audit), monitor="calls", mode="max",
                               every_n_train_steps=2, save_top_k=1)
        callbacks: list[Any] = [ckpt]
        if audit:
            callbacks.append(GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None))
        with pytest.warns(UserWarning):
            trainer = zoo.fit(module, callbacks, enable_checkpointing=True)
        return module, trainer, ckpt

    plain, _, plain_ckpt = run(False)
    printed = capsys.readouterr().out
    audited, audited_trainer, audited_ckpt = run(True)
    assert capsys.readouterr().out == printed
    batches = len(zoo.regression_data())
    assert plain.calls == audited.calls == batches
    assert audited.losses == plain.losses
    assert audited.mode == plain.mode
    assert float(audited_trainer.callback_metrics["calls"]) == batches
    saved_at = 2 * (batches // 2)  # every_n_train_steps=2: the last save's counter
    assert float(audited_ckpt.best_model_score) == float(plain_ckpt.best_model_score) == saved_at
    audit = next(c for c in audited_trainer.callbacks if isinstance(c, GradientAudit))
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked == batches and per_sample.recomputations > batches
    assert per_sample.report_entry()["recomputations"] == per_sample.recomputations


class _Tracked(zoo.MLP):
    def __init__(self) -> None:
        super().__init__()
        # An object of a standard-library class that training_step updates: its inside is not
        # put back (only objects of the user's own classes are), so it counts the recomputations.
        self.tracker = types.SimpleNamespace(calls=0, forward_calls=0)
        self.history: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.tracker.calls += 1
        self.history.append(batch_idx)
        x, y = batch
        return zoo.Square.apply(nn.functional.mse_loss(self(x), y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tracker.forward_calls += 1
        return self.net(x)


def test_recompute_false_runs_nothing_again_and_says_so_once() -> None:
    recomputing = GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None)
    module = _Tracked()
    zoo.fit(module, [recomputing])
    batches = len(zoo.regression_data())
    assert module.tracker.calls > batches  # the documented limit: its inside is not put back
    assert module.tracker.forward_calls > module.tracker.calls  # the batch-mixing test's calls
    assert all(
        c.report_entry()["recomputations"] > 0
        for c in recomputing.checks
        if getattr(c, "recompute", False)
    )

    audit = GradientAudit(on_finding="log", every_n_steps=1, max_overhead=None, recompute=False)
    module = _Tracked()
    zoo.fit(module, [audit])
    assert module.tracker.calls == batches and module.history == list(range(batches))
    assert module.tracker.forward_calls == batches
    skipped = {f.check: f for f in audit.findings if f.code == "check-skipped"}
    for name in ("PerSampleGradientCheck", "AutogradCheck", "BatchMixingCheck"):
        assert "recompute=False" in skipped[name].message
    assert skipped["BatchMixingCheck"].count == 1
    for check in audit.checks:
        if hasattr(check, "recompute"):
            assert check.recompute is False and check.report_entry()["recomputations"] == 0
    assert audit.settings()["recompute"] is False


def test_what_a_recomputation_cannot_put_back_is_named_and_stops_it(monkeypatch) -> None:
    from grad_callbacks.core import python_state

    monkeypatch.setattr(python_state, "MAX_CONTAINER", 2)
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    module = _Tracked()
    module.history.extend([-1, -1, -1])  # too long to copy from the start
    zoo.fit(module, [check], max_steps=3)
    skipped = [f for f in check.findings if f.code == "check-skipped"]
    assert len(skipped) == 1 and "self.history (resized" in skipped[0].message
    assert check.steps_checked == 1  # the check stopped recomputing after the first step


class _HookRecorder(zoo.MLP):
    """Lightning's own hook test (tests_pytorch/models/test_hooks.py HookedModel): every hook
    is replaced on the instance by a ``functools.partial`` that appends its name to a list the
    test holds, outside the module."""

    def __init__(self, called: list[str]) -> None:
        super().__init__()

        def call(hook: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            called.append(hook)
            return out

        for hook in ("training_step", "forward"):
            attr = getattr(self, hook)
            setattr(self, hook, functools.update_wrapper(functools.partial(call, hook, attr), attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def test_a_hook_sequence_recorded_through_partials_is_as_without_the_audit() -> None:
    """The recomputations (per-sample, grad-mismatch replay) and the batch-mixing test call
    ``training_step`` and ``forward`` again: the list the partials append to is put back, so
    the recorded sequence is the run's own (Lightning's test_trainer_model_hook_system_fit)."""
    sequences = []
    for audit in (False, True):
        called: list[str] = []
        torch.manual_seed(0)
        zoo.fit(_HookRecorder(called), [GradientAudit(on_finding="log")] if audit else [],
                max_steps=3)
        sequences.append(called)
    plain, audited = sequences
    assert plain == ["forward", "training_step"] * 3
    assert audited == plain

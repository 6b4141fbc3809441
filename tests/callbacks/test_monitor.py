"""GradientMonitor in real Lightning runs, checked against independent oracles."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grad_callbacks import GradientAudit
from grad_callbacks.callbacks.monitor import GradientMonitor
from grad_callbacks.core.monitor import decode_histogram, group_label, histogram_row, observe
from tests import zoo

PREFIX = "grad_audit/monitor/"
MODULES = ("net.0", "net.2")  # zoo.MLP: Linear, Tanh, Linear


class Oracle(L.Callback):
    """Records, at every optimizer step, what the monitor should log, computed naively."""

    def __init__(self, modules: tuple[str, ...] = MODULES) -> None:
        self.modules = modules
        self.norms: dict[int, dict[str, float]] = {}
        self.numel: dict[int, dict[str, int]] = {}
        self.minmax: dict[int, dict[str, tuple[float, float]]] = {}
        self.before: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.ratios: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        norms, numel, minmax, before = {}, {}, {}, {}
        for name in self.modules:
            module = pl_module.get_submodule(name)
            flat = torch.cat([p.grad.flatten() for p in module.parameters()]).double()
            norms[name] = float(flat.norm())
            numel[name] = flat.numel()
            minmax[name] = (float(flat.min()), float(flat.max()))
            before[name] = [p.detach().clone() for p in module.parameters()]
        every = torch.cat(
            [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        ).double()
        norms["total"] = float(every.norm())
        self.norms[step], self.numel[step], self.minmax[step] = norms, numel, minmax
        self.before[step] = before

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        for step, before in self.before.items():
            ratios = {}
            for name, old in before.items():
                new = list(pl_module.get_submodule(name).parameters())
                delta = torch.cat(
                    [(n.detach() - o).flatten() for n, o in zip(new, old, strict=True)]
                )
                ratios[name] = float(
                    delta.double().norm() / torch.cat([o.flatten() for o in old]).double().norm()
                )
            self.ratios[step] = ratios
        self.before = {}

def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(PREFIX + tag)}


def _tb_run(tmp_path: Path, module: L.LightningModule, **kwargs: Any) -> tuple:
    oracle = Oracle()
    monitor = GradientMonitor(every_n_steps=2, on_finding="raise")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = zoo.fit(module, [oracle, monitor], logger=logger, log_every_n_steps=1, **kwargs)
    return trainer, oracle, monitor, _events(logger.log_dir)


def test_norms_ratios_and_histograms_match_the_oracle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = 0.01
    trainer, oracle, monitor, acc = _tb_run(tmp_path, zoo.MLP("adam"), gradient_clip_val=clip)
    assert trainer.global_step == 7
    monitored = [0, 2, 4, 6]
    assert monitor.steps_checked == len(monitored)
    assert monitor.findings == []

    total = _scalars(acc, "grad_norm/total")
    assert sorted(total) == monitored  # only every second step
    for step in monitored:
        assert total[step] == pytest.approx(oracle.norms[step]["total"], rel=1e-5)
        assert total[step] > 10 * clip  # before clipping: a clipped norm would be <= clip
    for name in MODULES:
        norms = _scalars(acc, f"grad_norm/{name}")
        ratios = _scalars(acc, f"update_ratio/{name}")
        assert sorted(norms) == sorted(ratios) == monitored
        for step in monitored:
            assert norms[step] == pytest.approx(oracle.norms[step][name], rel=1e-5)
            assert ratios[step] == pytest.approx(oracle.ratios[step][name], rel=1e-4)
            assert ratios[step] > 0
        hists = acc.Histograms(f"{PREFIX}grad_hist/{name}")
        assert [h.step for h in hists] == monitored
        for h in hists:
            value = h.histogram_value
            assert value.num == oracle.numel[h.step][name]
            assert sum(value.bucket) == value.num
            lo, hi = oracle.minmax[h.step][name]
            assert value.min == pytest.approx(lo, rel=1e-5)
            assert value.max == pytest.approx(hi, rel=1e-5)
    assert not [t for t in acc.Tags()["scalars"] if "nonfinite" in t]
    assert "Gradient norms" in str(GradientMonitor().scalar_charts())


class NaNAtStep2(zoo.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 2 else loss


def test_all_nan_gradients_do_not_crash_and_are_counted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, oracle, monitor, acc = _tb_run(tmp_path, NaNAtStep2())
    assert monitor.findings == []  # on_finding="raise": nothing was skipped either
    for name in MODULES:
        nonfinite = _scalars(acc, f"nonfinite/{name}")
        assert nonfinite[2] == oracle.numel[2][name]
        assert math.isnan(_scalars(acc, f"grad_norm/{name}")[2])
        steps = [h.step for h in acc.Histograms(f"{PREFIX}grad_hist/{name}")]
        assert steps == [0]  # all NaN from step 2 on (SGD spreads the NaN): no histogram
    assert _scalars(acc, "grad_norm/total")[0] == pytest.approx(oracle.norms[0]["total"], 1e-5)


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    monitor = GradientMonitor(every_n_steps=2)
    zoo.fit(zoo.MLP(), [monitor], logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    for tag in ("grad_norm/total", "grad_norm/net.0", "update_ratio/net.2"):
        assert PREFIX + tag in header
    assert not [h for h in header if "grad_hist" in h]


def test_without_logger() -> None:
    monitor = GradientMonitor(every_n_steps=3)
    trainer = zoo.fit(zoo.MLP(), [monitor])
    assert monitor.steps_checked == len(range(0, trainer.global_step, 3))
    assert monitor.findings == []


def test_nothing_happens_on_other_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from grad_callbacks.callbacks import monitor as monitor_module

    seen: list[int] = []
    real = monitor_module.observe

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(len(seen))
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "observe", spy)
    logger = zoo.RecordingLogger()
    zoo.fit(zoo.MLP(), [GradientMonitor(every_n_steps=4)], logger=logger, log_every_n_steps=1)
    assert len(seen) == 2  # steps 0 and 4 of 7
    steps = sorted(s for s, m in logger.metrics.items() if any(k.startswith(PREFIX) for k in m))
    assert steps == [0, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05},
        {"precision": "bf16-mixed"},
    ],
    ids=["accumulate-clip", "bf16"],
)
def test_bitwise_non_invasive_and_matches_oracle(kwargs: dict[str, Any]) -> None:
    results = []
    for attach in (False, True):
        L.seed_everything(0, verbose=False)
        module = zoo.MLP("adam")
        oracle = Oracle()
        logger = zoo.RecordingLogger()
        callbacks = [oracle, GradientMonitor(every_n_steps=1)] if attach else [oracle]
        zoo.fit(module, callbacks, logger=logger, log_every_n_steps=1, **kwargs)
        results.append((zoo.params_of(module), oracle, logger))
    (plain, _, _), (watched, oracle, logger) = results
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
    # norms at the stepping batch of each accumulation window
    assert sorted(oracle.norms) == sorted(
        s for s, m in logger.metrics.items() if PREFIX + "grad_norm/total" in m
    )
    for step, norms in oracle.norms.items():
        got = logger.metrics[step]
        assert got[PREFIX + "grad_norm/total"] == pytest.approx(norms["total"], rel=1e-5)
        assert got[PREFIX + "grad_norm/net.2"] == pytest.approx(norms["net.2"], rel=1e-5)
        assert got[PREFIX + "update_ratio/net.0"] == pytest.approx(
            oracle.ratios[step]["net.0"], rel=1e-4
        )


def test_manual_optimization_with_two_optimizers() -> None:
    logger = zoo.RecordingLogger()
    monitor = GradientMonitor(every_n_steps=1, on_finding="raise")
    L.seed_everything(0, verbose=False)
    module = zoo.GAN("toggle")
    zoo.fit(module, [monitor], data=zoo.gan_data(), logger=logger, log_every_n_steps=1)
    tags = {k for m in logger.metrics.values() for k in m}
    for opt, prefix in ((0, "generator"), (1, "discriminator")):
        for tag in (
            f"grad_norm/total_opt{opt}",
            f"grad_norm/{prefix}.0_opt{opt}",
            f"update_ratio/{prefix}.2_opt{opt}",
        ):
            assert PREFIX + tag in tags
    assert PREFIX + "grad_norm/total" not in tags
    # manual optimization: global_step counts both optimizers' steps (discriminator first)
    d_steps = sorted(s for s, m in logger.metrics.items() if PREFIX + "grad_norm/total_opt1" in m)
    g_steps = sorted(s for s, m in logger.metrics.items() if PREFIX + "grad_norm/total_opt0" in m)
    assert d_steps == list(range(0, 12, 2)) and g_steps == list(range(1, 12, 2))
    # the generator's parameters are not touched by the discriminator's step
    assert not [t for t in tags if "generator" in t and t.endswith("_opt1")]


def test_every_optimizer_is_monitored_when_they_step_at_odd_and_even_steps() -> None:
    """A GAN steps its optimizers at alternate global steps: each is monitored at its first
    step at or after every multiple of every_n_steps (the generator, stepping at odd steps, was
    never monitored with an even every_n_steps)."""
    logger = zoo.RecordingLogger()
    monitor = GradientMonitor(every_n_steps=4, histograms=False)
    zoo.fit(zoo.GAN("toggle"), [monitor], data=zoo.gan_data(), logger=logger)

    def steps(tag: str) -> list[int]:
        return sorted(s for s, m in logger.metrics.items() if PREFIX + tag in m)

    assert steps("grad_norm/total_opt1") == [0, 4, 8]  # the discriminator steps first
    assert steps("grad_norm/total_opt0") == [1, 5, 9]
    assert steps("grad_norm/generator.0_opt0") == [1, 5, 9]
    assert steps("update_ratio/generator.2_opt0") == [1, 5, 9]
    assert monitor.steps_checked == 6


def test_per_parameter_tags() -> None:
    logger = zoo.RecordingLogger()
    zoo.fit(
        zoo.MLP(),
        [GradientMonitor(every_n_steps=2, per_parameter=True)],
        logger=logger,
        log_every_n_steps=1,
    )
    tags = set(logger.metrics[0])
    assert {PREFIX + "grad_norm/net.0.weight", PREFIX + "update_ratio/net.2.bias"} <= tags
    assert PREFIX + "grad_norm/net.0" not in tags


# ----------------------------------------------------------------------------- core
def test_histogram_row_matches_histc() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(37, generator=g) * 3
    b[5] = float("inf")
    b[6] = float("nan")
    row = histogram_row([a, b], bins=16)
    hist = decode_histogram(row, 16)
    assert hist is not None
    values = torch.cat([a, b])
    finite = values[torch.isfinite(values)].double()
    expected = torch.histc(finite, bins=16, min=float(finite.min()), max=float(finite.max()))
    assert hist.bucket_counts == expected.tolist()
    assert hist.num == finite.numel() == 1035 and hist.nonfinite == 2
    assert hist.sum == pytest.approx(float(finite.sum()))
    assert hist.sum_squares == pytest.approx(float(finite.square().sum()))
    assert hist.bucket_limits[-1] == hist.max == float(finite.max())


def test_histogram_of_all_nan_and_of_a_constant() -> None:
    assert decode_histogram(histogram_row([torch.full((4,), float("nan"))], 8), 8) is None
    hist = decode_histogram(histogram_row([torch.full((3,), 2.0)], 4), 4)
    assert hist is not None and hist.num == 3 and hist.bucket_counts == [3.0, 0.0, 0.0, 0.0]


def test_observe_reads_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(2, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    obs = observe(list(model.named_parameters()), histogram_bins=4)
    result = obs.decode(obs.finish())
    for p, g, old in zip(model.parameters(), grads, params, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), old)
    assert result.update_ratios == {"0": 0.0, "1": 0.0}
    expected = torch.cat([g.flatten() for g in grads[:2]]).norm()
    assert result.grad_norms["0"] == pytest.approx(float(expected), rel=1e-6)
    assert group_label("w") == "w"


def _budgeted(interval: int | None, every: int = 4) -> tuple[GradientAudit, GradientMonitor]:
    """GradientAudit with only a monitor, whose budget asks ``interval`` steps between rounds
    (None: no budget)."""
    monitor = GradientMonitor(every_n_steps=every, histograms=False)
    audit = GradientAudit(
        checks=[monitor], on_finding="log", max_overhead=None if interval is None else 0.03
    )
    if audit.budget is not None:
        audit.budget.interval = lambda run_seconds, share: interval  # type: ignore[method-assign]
    return audit, monitor


@pytest.mark.parametrize(
    ("interval", "expected"),
    [(None, [0, 4, 8, 12]), (1, [0, 4, 8, 12]), (6, [0, 8]), (10**6, [0])],
)
def test_under_the_audits_budget_rounds_wait_as_their_cost_asks(
    interval: int | None, expected: list[int]
) -> None:
    """The budget spaces the monitor's rounds (never closer than every_n_steps): after the round
    at multiple m, the next is at the first multiple from m + the budget's interval on."""
    logger = zoo.RecordingLogger()
    audit, monitor = _budgeted(interval)
    zoo.fit(zoo.MLP(), [audit], data=zoo.regression_data(n=4 * 14), logger=logger)
    steps = sorted(s for s, m in logger.metrics.items() if PREFIX + "grad_norm/total" in m)
    assert steps == expected
    assert monitor.steps_checked == len(expected)


def test_under_the_budget_every_optimizer_still_gets_the_round() -> None:
    """Two optimizers stepping at alternate steps: a round held back holds back both; a round
    that runs runs for both (the generator at the step after the discriminator's)."""
    logger = zoo.RecordingLogger()
    audit, _ = _budgeted(6)
    zoo.fit(zoo.GAN("toggle"), [audit], data=zoo.gan_data(), logger=logger)

    def steps(tag: str) -> list[int]:
        return sorted(s for s, m in logger.metrics.items() if PREFIX + tag in m)

    assert steps("grad_norm/total_opt1") == [0, 8]
    assert steps("grad_norm/total_opt0") == [1, 9]

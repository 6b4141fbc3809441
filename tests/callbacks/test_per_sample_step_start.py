"""A recomputation starts where the real step started: every random stream (NumPy's global
generator and Python's ``random`` beside torch's) and the buffers a forward updates and reads
(``spectral_norm``'s power iteration), as a user writes them in ``training_step``.

Oracles: a gradient hook that doubles one parameter's gradient (the only ``grad-mismatch`` a
faithful replay can see), and the same run without the audit (bitwise).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from grad_callbacks.findings import Finding
from tests import zoo


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The models' initialisation does not depend on the tests run before."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def _check() -> PerSampleGradientCheck:
    return PerSampleGradientCheck(every_n_steps=1, on_finding="log")


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity != "info"]


def _data() -> zoo.DataLoader:
    return zoo.regression_data(n=32, batch_size=8)


class NumpyNoise(zoo.MLP):
    """Clean: noise augmentation drawn from NumPy's global generator."""

    def __init__(self, double_first_layer: bool = False) -> None:
        super().__init__()
        if double_first_layer:  # planted: the optimizer sees twice net.0.weight's gradient
            self.net[0].weight.register_hook(lambda g: 2 * g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        noise = torch.from_numpy(np.random.normal(0.0, 0.1, tuple(x.shape)).astype("float32"))
        return F.mse_loss(self.net(x + noise), y)


class PythonFlip(zoo.MLP):
    """Clean: a sign flip of the whole batch decided by Python's ``random``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if random.random() < 0.5:
            x = -x
        return F.mse_loss(self.net(x), y)


def test_numpy_noise_is_named_and_no_false_alarm() -> None:
    check = _check()
    zoo.fit(NumpyNoise(), [check], data=_data())
    assert _alarms(check.findings) == []  # was batch-coupling and grad-mismatch
    (skipped,) = check.findings
    assert skipped.code == "check-skipped" and "NumPy" in skipped.message


def test_a_doubled_gradient_is_found_through_numpy_noise() -> None:
    check = _check()
    zoo.fit(NumpyNoise(double_first_layer=True), [check], data=_data())
    (mismatch,) = [f for f in check.findings if f.code == "grad-mismatch"]
    # The replay draws the noise the real step drew: only the hooked parameter differs.
    assert mismatch.params == ("net.0.weight",)


def test_python_random_flip_is_named_and_no_false_alarm() -> None:
    check = _check()
    zoo.fit(PythonFlip(), [check], data=_data())
    assert _alarms(check.findings) == []  # was batch-coupling
    (skipped,) = check.findings
    assert skipped.code == "check-skipped" and "Python's random" in skipped.message
    assert "NumPy" not in skipped.message and "torch" not in skipped.message


def _spectral(kind: str) -> nn.Module:
    layer = nn.Linear(8, 16)
    if kind == "parametrization":
        return nn.utils.parametrizations.spectral_norm(layer)
    return nn.utils.spectral_norm(layer)


class SpectralNet(zoo.MLP):
    """Clean: a spectral-normalised first layer (its power iteration updates buffers in
    forward, and the normalised weight depends on them)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net[0] = _spectral(kind)


@pytest.mark.parametrize("kind", ["parametrization", "legacy"])
def test_spectral_norm_is_no_grad_mismatch(kind: str) -> None:
    check = _check()
    zoo.fit(SpectralNet(kind), [check], data=_data())
    assert check.findings == []  # was grad-mismatch at every step
    assert check.steps_checked == len(_data())


class SNGAN(L.LightningModule):
    """A GAN with a spectral-normalised discriminator, in manual optimization with
    ``toggle_optimizer`` (SNGAN)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(
            nn.utils.parametrizations.spectral_norm(nn.Linear(8, 16)),
            nn.LeakyReLU(0.2),
            nn.utils.parametrizations.spectral_norm(nn.Linear(16, 1)),
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 4)
        self.toggle_optimizer(opt_d)
        fake = self.generator(z).detach()
        loss_d = F.softplus(-self.discriminator(real)).mean()
        loss_d = loss_d + F.softplus(self.discriminator(fake)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        loss_g = F.softplus(-self.discriminator(self.generator(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.generator.parameters(), 2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), 2e-4, betas=(0.5, 0.999)),
        )


def _gan_data() -> zoo.DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    return zoo.DataLoader(zoo.TensorDataset(x, torch.zeros(64, 1)), batch_size=16)


def test_sngan_trains_identically_and_quietly_under_the_audit() -> None:
    states = []
    for callbacks in ([GradientAudit(on_finding="log", max_overhead=None)], []):
        torch.manual_seed(0)
        module = SNGAN()
        zoo.fit(module, callbacks, data=_gan_data(), max_epochs=2)
        states.append(module.state_dict())
        if callbacks:
            audit = callbacks[0]
            assert _alarms(audit.findings) == []  # was grad-mismatch for both optimizers
            (per_sample,) = [c for c in audit.checks if isinstance(c, PerSampleGradientCheck)]
            assert per_sample.steps_checked > 0
    with_audit, without = states
    assert with_audit.keys() == without.keys()
    assert all(torch.equal(with_audit[k], without[k]) for k in with_audit)

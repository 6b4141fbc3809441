"""``grad-audit demo``: small models with planted gradient bugs next to their fixed versions.

Each run trains for a few seconds on synthetic data (on a GPU when there is one) with
:class:`~grad_callbacks.GradientAudit` attached and a TensorBoard logger, then the audit of every
run is printed. The demo checks itself: it returns 0 only when every planted bug was found and
every fixed run stayed quiet.

Example:
    >>> from grad_callbacks.demo import run_demo
    >>> run_demo("grad_audit_demo")  # doctest: +SKIP
    0
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_callbacks.callbacks.audit import GradientAudit
from grad_callbacks.findings import Finding


class ManualRegressor(L.LightningModule):
    """Manual optimization on a regression task; ``forget_zero_grad`` plants the classic bug."""

    def __init__(self, forget_zero_grad: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.forget_zero_grad = forget_zero_grad
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if not self.forget_zero_grad:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, prog_bar=False)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        """The loss of every sample: lets PerSampleGradientCheck run in manual optimization."""
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y, reduction="none").mean(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class RingGAN(L.LightningModule):
    """A GAN on a 2-D ring of Gaussians, trained with two optimizers by hand.

    With ``leak=True`` the discriminator's gradients are cleared only after its step, so the
    generator loss's backward pass (which also reaches the discriminator) is applied by the
    discriminator's optimizer: a gradient leak. The fix clears them before its backward pass.
    """

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.leak = leak
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """The discriminator's score of each point."""
        return self.discriminator(points)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 8, device=real.device))
        bce = nn.functional.binary_cross_entropy_with_logits
        ones = torch.ones(real.shape[0], 1, device=real.device)

        opt_g.zero_grad()
        g_loss = bce(self.discriminator(fake), ones)
        self.manual_backward(g_loss)
        opt_g.step()

        if not self.leak:
            opt_d.zero_grad()
        d_loss = bce(self.discriminator(real), ones) + bce(
            self.discriminator(fake.detach()), torch.zeros_like(ones)
        )
        self.manual_backward(d_loss)
        opt_d.step()
        if self.leak:
            opt_d.zero_grad()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        ]


def _regression_data(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


def _ring_data(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    angle = torch.randint(0, 8, (n,), generator=g).float() * (2 * torch.pi / 8)
    points = torch.stack([angle.cos(), angle.sin()], dim=1) * 2
    points = points + 0.05 * torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(points), batch_size=32, shuffle=True, generator=g)


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo: the model, its data, and the code its audit must report."""

    name: str
    description: str
    expected: str | None

    def build(self) -> tuple[L.LightningModule, DataLoader]:
        if self.name.startswith("manual"):
            return ManualRegressor(forget_zero_grad=self.expected is not None), _regression_data()
        return RingGAN(leak=self.expected is not None), _ring_data()


RUNS = (
    DemoRun("manual_forgets_zero_grad", "manual optimization without opt.zero_grad()",
            "missing-zero-grad"),
    DemoRun("manual_fixed", "the same with opt.zero_grad() before backward", None),
    DemoRun("gan_leak", "GAN: generator loss leaks into the discriminator step", "gradient-leak"),
    DemoRun("gan_fixed", "GAN: discriminator gradients cleared before its backward", None),
)


def train_run(
    run: DemoRun,
    out_dir: Path,
    max_epochs: int = 2,
    max_steps: int = -1,
    name: str | None = None,
) -> list[Finding]:
    """Train one demo run with the audit attached; returns its findings.

    Args:
        run: the run.
        out_dir: the directory of the runs' logs.
        max_epochs: epochs to train (ignored when ``max_steps`` is given).
        max_steps: optimizer steps to train, over as many epochs as it takes (-1: by epochs).
        name: the run's log directory under ``out_dir`` (default: ``run.name``).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    module, data = run.build()
    audit = GradientAudit(on_finding="log")
    trainer = L.Trainer(
        max_epochs=-1 if max_steps > 0 else max_epochs,
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(out_dir, name=name or run.name, version=""),
        callbacks=[audit],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        # Lightning's own advice on this toy setup is noise next to the audit.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(module, data)
    return audit.findings


def run_directory(index: int, run: DemoRun) -> str:
    """The log directory of the ``index``-th run (from 1): numbered, so that TensorBoard and
    ``grad-audit report`` list the runs in the order they trained."""
    return f"{index}_{run.name}"


def summarize(findings: list[Finding], expected: str | None) -> tuple[bool, list[str]]:
    """Whether a run's audit is what the demo expects, and the lines that say so.

    Every finding is named, info ones included, so that the summary and the report's table
    agree (a ``check-skipped`` row is in both).

    Example:
        >>> summarize([], None)
        (True, ['  warnings and errors: none -> as expected'])
    """
    alarms = sorted({f.code for f in findings if f.severity != "info"})
    wanted = [expected] if expected else []
    ok = alarms == wanted
    verdict = "as expected" if ok else f"UNEXPECTED (wanted {wanted or 'none'})"
    lines = [f"  warnings and errors: {', '.join(alarms) or 'none'} -> {verdict}"]
    for f in findings:
        if f.severity == "info":
            reason = f.data.get("reason") if f.code == "check-skipped" else None
            lines.append(f"  info: {f.code} ({f.check}){': ' + reason if reason else ''}")
    return ok, lines


def run_demo(out_dir: str = "grad_audit_demo", max_steps: int = -1) -> int:
    """Run every demo run, print the audits in training order, and say how to open them.

    The runs train in the order of :data:`RUNS`: each planted bug, then its fix. Their log
    directories are numbered in that order, and their reports are printed in it.

    Args:
        out_dir: where the runs' logs go.
        max_steps: optimizer steps per run (-1: two epochs, 32 steps for the regressor and 64
            for the GAN, which steps two optimizers per batch).

    Returns:
        0 when each planted bug was found and each fixed run has no warning or error finding,
        1 otherwise.
    """
    from grad_callbacks.cli import load_runs
    from grad_callbacks.render import render_text

    out = Path(out_dir).resolve()
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    length = f"{max_steps} steps each" if max_steps > 0 else "two epochs each"
    print(
        f"grad-audit demo: {len(RUNS)} small runs on {device} ({length}), logs under {out}\n"
        "Each planted bug is followed by its fix; runs train, and are reported, in this order.\n"
    )
    ok = True
    names = []
    for i, run in enumerate(RUNS, 1):
        names.append(run_directory(i, run))
        print(f"{i}. training {names[-1]}: {run.description}")
        findings = train_run(run, out, max_steps=max_steps, name=names[-1])
        run_ok, lines = summarize(findings, run.expected)
        ok = ok and run_ok
        print("\n".join(lines))
    print()
    loaded = []
    for name in names:
        runs, errors = load_runs(out / name)
        loaded += runs
        for message in errors:
            print(f"grad-audit: {message}")
    render_text(loaded, sys.stdout)
    print(
        "\nOpen the audit in TensorBoard:  tensorboard --logdir "
        f"{out}\nRead it again or fail a CI job: grad-audit report {out} --fail-on error"
    )
    return 0 if ok else 1

"""A GAN with manual optimization: the generator loss leaking into the discriminator's step.

With two optimizers and ``self.automatic_optimization = False`` the order of ``zero_grad``,
``manual_backward`` and ``step`` is yours to get right. The generator loss
``bce(D(G(z)), 1)`` goes through the discriminator, so its backward pass also writes
gradients into the discriminator's parameters. In the leaky version below the discriminator's
gradients are cleared only *after* its step::

    opt_g.zero_grad(); manual_backward(g_loss); opt_g.step()
    manual_backward(d_loss); opt_d.step(); opt_d.zero_grad()   # D steps on g_loss + d_loss

so every discriminator step applies ``grad(d_loss) + grad(g_loss)``: it is partly trained to
help the generator. Nothing crashes and the losses still move; the GAN just trains worse.
``ZeroGradCheck`` (part of ``GradientAudit``) reports it as ``gradient-leak`` (error): an
optimizer stepped on gradients from a backward pass that another optimizer had already stepped on.

The fix used here is Lightning's recipe: ``toggle_optimizer(opt)`` (only that optimizer's
parameters require grad while its loss is backpropagated) and ``zero_grad`` right after each
step. Clearing ``opt_d``'s gradients *before* ``manual_backward(d_loss)`` works as well.

Run it: ``python examples/manual_gan.py`` trains both versions for one short epoch each and
checks that the leak is found in the leaky run only.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_callbacks import Finding, GradientAudit


class GAN(L.LightningModule):
    """A tiny GAN on 2-D points; ``leak=True`` clears the discriminator's gradients too late."""

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.leak = leak
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones = torch.ones(real.shape[0], 1)
        zeros = torch.zeros_like(ones)
        fake = self.generator(torch.randn(real.shape[0], 4))

        if self.leak:
            opt_g.zero_grad()
            g_loss = bce(self.discriminator(fake), ones)
            self.manual_backward(g_loss)  # also writes into the discriminator's .grad
            opt_g.step()
            d_loss = bce(self.discriminator(real), ones) + bce(
                self.discriminator(fake.detach()), zeros
            )
            self.manual_backward(d_loss)
            opt_d.step()  # BUG: steps on grad(d_loss) + grad(g_loss)
            opt_d.zero_grad()  # too late
        else:
            self.toggle_optimizer(opt_g)  # only the generator requires grad
            g_loss = bce(self.discriminator(fake), ones)
            self.manual_backward(g_loss)
            opt_g.step()
            opt_g.zero_grad()
            self.untoggle_optimizer(opt_g)

            self.toggle_optimizer(opt_d)
            d_loss = bce(self.discriminator(real), ones) + bce(
                self.discriminator(fake.detach()), zeros
            )
            self.manual_backward(d_loss)
            opt_d.step()
            opt_d.zero_grad()
            self.untoggle_optimizer(opt_d)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        ]


def ring_data(n: int = 128, batch_size: int = 16) -> DataLoader:
    """Points on a ring of 8 Gaussians."""
    g = torch.Generator().manual_seed(0)
    angle = torch.randint(0, 8, (n,), generator=g).float() * (2 * torch.pi / 8)
    points = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    points = points + 0.05 * torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(points), batch_size=batch_size, shuffle=True, generator=g)


def main(leak: bool) -> list[Finding]:
    """Train the leaky or the fixed GAN for one epoch; returns the audit's findings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[audit],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="grad_audit_gan_"),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(GAN(leak=leak), ring_data())
    label = "leaky" if leak else "fixed"
    print(f"{label} GAN, {trainer.global_step} optimizer steps:")
    for f in audit.findings:
        print(f"  [{f.severity}] {f.code}: {f.message}")
    if not audit.findings:
        print("  no findings")
    return audit.findings


def alarms(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings if f.severity in ("warning", "error")}


if __name__ == "__main__":
    leaky = main(leak=True)
    fixed = main(leak=False)
    assert "gradient-leak" in alarms(leaky), alarms(leaky)
    assert alarms(fixed) == set(), alarms(fixed)
    print("\nthe leak is found in the leaky run only")

"""Quickstart: add ``GradientAudit()`` to a Trainer, train, read the audit.

The whole integration is one line, ``callbacks=[GradientAudit()]``. Every check runs with its
default schedule while the model trains as usual. With a ``TensorBoardLogger`` attached the audit
also lands in TensorBoard (scalars under ``grad_audit/...``, the findings as a text table at
``grad_audit/findings``, a "Gradient audit" custom-scalars layout) and a ``grad_audit.json``
report is written to the run's log directory at the end of fit.

This model is clean, so the audit has nothing to complain about: no finding of warning or error
severity (a false alarm on clean training would be a bug in the audit). Findings of ``info``
severity, if any, are notes rather than alarms.

Run it: ``python examples/quickstart.py [--out DIR]`` (a temporary directory by default). It
prints the findings and the command that prints the run's audit again, e.g. in a CI job::

    grad-audit report DIR --fail-on error
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_callbacks import Finding, GradientAudit
from grad_callbacks.cli import main as cli_main


class Regressor(L.LightningModule):
    """A small MLP regressor with automatic optimization: nothing special, nothing broken."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def make_data(n: int = 256, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True).sin() + 0.05 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def main(out: str | None = None) -> list[Finding]:
    out_dir = out if out is not None else tempfile.mkdtemp(prefix="grad_audit_quickstart_")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log")  # the default "warn" would also warn on alarms
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(out_dir, name="quickstart"),
        callbacks=[audit],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=4,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(Regressor(), make_data())

    findings = audit.findings
    print(f"trained {trainer.global_step} steps; findings:")
    for f in findings:
        print(f"  [{f.severity}] {f.code} (step {f.step}, x{f.count}): {f.message}")
    if not findings:
        print("  none")
    print(f"\nlogs and report under {trainer.log_dir}; the audit, as the CLI prints it:\n")
    cli_main(["report", out_dir])
    print(f"\nprint the audit again:     grad-audit report {out_dir}")
    print(f"fail a CI job on an error: grad-audit report {out_dir} --fail-on error")
    print(f"open it in TensorBoard:    tensorboard --logdir {out_dir}")

    alarms = [f for f in findings if f.severity in ("warning", "error")]
    assert not alarms, f"clean training raised alarms: {alarms}"
    return findings


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="log directory (default: a temporary one)")
    main(parser.parse_args().out)

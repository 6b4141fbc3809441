"""GradientAudit as a bundle: work shared between its checks."""

from __future__ import annotations

import torch

from grad_callbacks import GradientAudit, GradientMonitor, GradientSanityCheck
from tests import zoo


def _train(callback: object) -> tuple[zoo.RecordingLogger, int]:
    logger = zoo.RecordingLogger()
    torch.manual_seed(0)
    trainer = zoo.fit(zoo.MLP(), [callback], logger=logger, log_every_n_steps=1)
    return logger, trainer.global_step


def test_sanity_and_monitor_share_one_pass_of_gradient_norms_per_step() -> None:
    checks = [GradientSanityCheck, GradientMonitor]
    audit = GradientAudit(checks, every_n_steps=1, max_overhead=None)  # every step watched
    _, steps = _train(audit)
    assert audit.checks[0].steps_checked == audit.checks[1].steps_checked == steps
    assert audit._norm_cache.computed == steps  # not 2 per step: one for each check


def test_shared_norms_give_the_monitor_the_same_numbers_as_its_own() -> None:
    # The oracle: the monitor alone computes its norms itself.
    # max_overhead=None: every step monitored (a budget would space the monitor's rounds).
    checks = [GradientSanityCheck, GradientMonitor]
    audit = GradientAudit(checks, every_n_steps=1, max_overhead=None)
    shared, _ = _train(audit)
    alone, _ = _train(GradientMonitor(every_n_steps=1))
    tags = [t for t in alone.metrics[0] if t.startswith("grad_audit/monitor/grad_norm/")]
    assert tags
    for step, metrics in alone.metrics.items():
        for tag in tags:
            assert shared.metrics[step][tag] == metrics[tag], (step, tag)

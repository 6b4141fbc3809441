"""A ``training_step`` that draws its own per-sample noise (``torch.randn_like(x)``,
``torch.randint(0, T, (B,))``) under automatic optimization: the draws are cut sample by sample
(as docs/checks/per-sample.md says), so the per-sample comparison runs instead of being
``check-skipped``, stays quiet on clean models, and finds a summed loss (scale = batch size)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo, zoo_generative

MODELS: dict[str, Callable[..., L.LightningModule]] = {
    "vae": zoo_generative.VAE,
    "diffusion": zoo_generative.DiffusionStep,
}


def _per_sample(audit: GradientAudit) -> PerSampleGradientCheck:
    return next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))


@pytest.mark.parametrize("model", list(MODELS))
def test_clean_generative_models_are_compared_quietly_and_untouched(model: str) -> None:
    def run(audit: GradientAudit | None) -> dict[str, torch.Tensor]:
        L.seed_everything(0)
        module = MODELS[model]()
        zoo.fit(module, [audit] if audit else [], data=zoo_generative.vector_data(), max_steps=2)
        return zoo.params_of(module)

    plain = run(None)
    audit = GradientAudit(on_finding="log")
    audited = run(audit)
    assert [k for k in plain if not torch.equal(plain[k], audited[k])] == []
    assert audit.findings == []  # not even check-skipped
    assert _per_sample(audit).steps_checked >= 1


@pytest.mark.parametrize("model", list(MODELS))
def test_a_summed_loss_with_per_sample_noise_is_reduction_sum(model: str) -> None:
    check = PerSampleGradientCheck(every_n_steps=1, on_finding="log")
    L.seed_everything(0)
    zoo.fit(MODELS[model](summed=True), [check], data=zoo_generative.vector_data(), max_steps=1)
    (finding,) = check.findings
    assert finding.code == "reduction-sum"
    assert finding.data["scale"] == pytest.approx(8.0, rel=1e-4)  # the batch size

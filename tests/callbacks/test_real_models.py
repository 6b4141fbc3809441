"""GradientAudit() on the real models of tests/zoo_real.py (and the zoo's GAN): training is
bitwise identical with and without the audit, no warning or error finding, and
PerSampleGradientCheck actually runs (no check-skipped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch

from grad_callbacks import GradientAudit, PerSampleGradientCheck
from tests import zoo, zoo_real


def _hf(kind: str, **kwargs: Any) -> Callable[[], tuple[L.LightningModule, Any]]:
    def make() -> tuple[L.LightningModule, Any]:
        zoo_real.require_transformers()
        return zoo_real.HFModule(kind, **kwargs), zoo_real.hf_loader(kind)

    return make


def _demo(cls: type, **kwargs: Any) -> Callable[[], tuple[L.LightningModule, Any]]:
    def make() -> tuple[L.LightningModule, Any]:
        module = cls(**kwargs)
        return module, module.train_dataloader()

    return make


CASES: dict[str, tuple[Callable[[], tuple[L.LightningModule, Any]], dict[str, Any]]] = {
    "gpt2-tied-embeddings": (_hf("gpt2"), {}),
    "gpt2-gradient-checkpointing": (_hf("gpt2", gradient_checkpointing=True), {}),
    "bert-strings-in-batch": (_hf("bert"), {}),
    "t5-ignore-index": (_hf("t5"), {}),
    "bart-ignore-index": (_hf("bart"), {}),
    "llama-bf16-mixed": (_hf("llama"), {"precision": "bf16-mixed"}),
    "wav2vec2-ctc-specaugment": (_hf("wav2vec2"), {}),
    "demo-lstm": (_demo(zoo_real.DemoLSTM, nhid=16), {}),
    "demo-transformer": (_demo(zoo_real.DemoTransformer), {}),
    "lstm": (lambda: (zoo_real.RNNTagger("lstm"), zoo_real.sequence_loader()), {}),
    "gru-batch-first": (
        lambda: (zoo_real.RNNTagger("gru", batch_first=True), zoo_real.sequence_loader()),
        {},
    ),
    "gan": (lambda: (zoo.GAN("toggle"), zoo.gan_data()), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_audit_leaves_real_models_untouched_quiet_and_checked(case: str) -> None:
    make, kwargs = CASES[case]

    def run(audit: bool) -> tuple[dict[str, torch.Tensor], GradientAudit | None]:
        L.seed_everything(0)
        module, data = make()
        callbacks = [GradientAudit(on_finding="log")] if audit else []
        zoo.fit(module, callbacks, data=data, max_steps=2, **kwargs)
        return zoo.params_of(module), (callbacks[0] if audit else None)

    plain, _ = run(False)
    audited, audit = run(True)
    assert audit is not None
    changed = [k for k in plain if not torch.equal(plain[k], audited[k])]
    assert changed == []
    assert [f for f in audit.findings if f.severity != "info"] == []
    per_sample = next(c for c in audit.checks if isinstance(c, PerSampleGradientCheck))
    assert per_sample.steps_checked >= 1 and per_sample.recomputations >= 1
    assert [f for f in per_sample.findings if f.code == "check-skipped"] == []

"""BatchMixingCheck on the models people train, through the calls their ``training_step`` makes:
tiny-config ``transformers`` models (T5 and BART with -100 labels, BERT with attention masks and
strings in the batch, GPT-2, ViT, Wav2Vec2 CTC on padded audio, CLIP), Lightning's demos, an
``nn.LSTM`` tagger with ``batch_first=False`` and a manual-optimization GAN.

Clean models: silent, with the check run on the calls named (not skipped). Each model with a
planted mixing bug (pooling over the batch axis, a ``view`` where a ``transpose`` was needed on a
sequence-first tensor, an attention whose padding mask is broadcast across the packed batch):
``batch-mixing`` naming the module and the call. Training with the check is bitwise identical
to training without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.sinks.warnings import GradientAuditWarning
from tests import zoo, zoo_real

HF_CALL = "pl_module(input_ids=..., attention_mask=..., labels=...)"
GAN_CALLS = ["pl_module.generator(input)", "pl_module.discriminator(input)"]


class PooledGAN(zoo.GAN):
    """The GAN whose discriminator centres its features over the batch axis (a broken
    minibatch statistic): every sample's score depends on the other samples."""

    def __init__(self) -> None:
        super().__init__()
        self.discriminator = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), CentreOverBatch(), nn.Linear(16, 1)
        )


class CentreOverBatch(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(dim=0, keepdim=True)


HF_KINDS = ("t5", "bart", "bert", "gpt2", "vit")
Case = tuple[Callable[[], L.LightningModule], Callable[[], DataLoader | None]]


def _hf(kind: str, bug: bool, n: int) -> Case:
    return (
        lambda: zoo_real.HFModule(kind, packed_attention=bug),
        lambda: zoo_real.hf_loader(kind, batch_size=4, n=n),
    )


def _cases(bug: bool, n: int = 4) -> dict[str, Case]:
    """Every model, with the planted bug or clean, on ``n`` samples in batches of 4 (the
    GAN's) or 8."""
    tokens = lambda: zoo_real.sequence_loader(n=2 * n)  # noqa: E731
    return {
        **{kind: _hf(kind, bug, n) for kind in (*HF_KINDS, "wav2vec2", "clip")},
        "demo-transformer": (lambda: zoo_real.DemoTransformer(batch_pool=bug, small=True), tokens),
        "demo-lstm": (lambda: zoo_real.DemoLSTM(view_bug=bug, nhid=16), tokens),
        "lstm-tagger": (lambda: zoo_real.RNNTagger(batch_first=False, view_bug=bug), tokens),
        "gan": (PooledGAN if bug else zoo.GAN, lambda: zoo.gan_data(n=n)),
    }


TESTED = {
    "t5": [HF_CALL],
    "bart": [HF_CALL],
    "bert": [HF_CALL],
    "gpt2": [HF_CALL],
    "vit": ["pl_module(pixel_values=..., labels=...)"],
    # sets requires_grad on a view of its input; draws SpecAugment masks from NumPy
    "wav2vec2": ["pl_module(input_values=..., attention_mask=..., labels=...)"],
    # logits_per_image/_text [B, B] compare the samples on purpose
    "clip": ["pl_module(input_ids=..., attention_mask=..., pixel_values=..., return_loss=...)"],
    "demo-transformer": ["pl_module(inputs, target)"],
    "demo-lstm": ["pl_module.model(input, hidden)"],
    "lstm-tagger": ["pl_module(tokens)"],
    "gan": GAN_CALLS,
}
# The module named, whether the mixing is in its own code (before its call of a submodule whose
# inputs already mix), and the call tested.
PLANTED = {
    "t5": ("model.encoder.block.0.layer.0.SelfAttention", True, HF_CALL),
    "bart": ("model.model.encoder.layers.0.self_attn", True, HF_CALL),
    "bert": ("model.bert.encoder.layer.0.attention.self", False, HF_CALL),
    "gpt2": ("model.transformer.h.0.attn", True, HF_CALL),
    "vit": ("model.vit.layers.0.attention", True, "pl_module(pixel_values=..., labels=...)"),
    "demo-transformer": ("model.pos_encoder", True, "pl_module(inputs, target)"),
    "demo-lstm": ("model.rnn", False, "pl_module.model(input, hidden)"),
    "lstm-tagger": ("rnn", False, "pl_module(tokens)"),
    "gan": ("discriminator.2", False, "pl_module.discriminator(input)"),
}


def _fit(case: Case, check: L.Callback | None, batches: int = 1) -> L.Trainer:
    make, data = case
    L.seed_everything(0)  # NumPy's generator too: Wav2Vec2 draws its masks from it
    module = make()
    callbacks = [check] if check is not None else []
    return zoo.fit(module, callbacks, data=data(), limit_train_batches=batches)


def _check(case: str) -> BatchMixingCheck:
    return BatchMixingCheck(on_finding="log")


@pytest.mark.parametrize("case", sorted(TESTED))
def test_clean_real_models_are_silent_with_their_calls_tested(case: str) -> None:
    check = _check(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientAuditWarning)
        _fit(_cases(bug=False)[case], check)
    assert check.findings == []  # not even check-skipped
    assert check.tested_calls == TESTED[case]
    assert check.untested_calls == []
    assert check.report_entry()["tested_calls"] == TESTED[case]


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_mixing_in_real_models_is_reported_with_module_and_call(case: str) -> None:
    check = _check(case)
    _fit(_cases(bug=True)[case], check)
    (finding,) = check.findings
    module, in_its_code, call = PLANTED[case]
    assert finding.code == "batch-mixing" and finding.severity == "error"
    assert finding.params == (module,)
    assert finding.data["call"] == call
    assert finding.message.startswith(f"In the call `{call}` that training_step made")
    if in_its_code:
        assert f"Samples mix in the code of `{module}`" in finding.message
        assert finding.data["next_module"] is not None
    else:
        assert f"The first module whose output mixes samples is `{module}`" in finding.message
    assert finding.step == 0
    assert [0, 1] in finding.data["pairs"]


# ---------------------------------------------------------------------------------- no trace
def _state(trainer: L.Trainer) -> dict[str, Any]:
    module = trainer.lightning_module
    return {
        "params": zoo.params_of(module),
        "opt": [o.state_dict()["state"] for o in trainer.optimizers],
        "rng": torch.get_rng_state(),
        "attrs": {k: v for k, v in vars(module).items() if not k.startswith("_")},
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("case", ["gan", "bert", "lstm-tagger", "demo-lstm", "wav2vec2"])
def test_training_with_the_check_is_bitwise_identical(case: str) -> None:
    check = BatchMixingCheck(every_n_steps=1, sample_count=2)
    plain = _state(_fit(_cases(bug=False, n=12)[case], None, 3))
    audited = _state(_fit(_cases(bug=False, n=12)[case], check, 3))
    assert check.steps_checked == 3
    assert check.findings == [] and check.tested_calls == TESTED[case]
    for key in plain:  # the demo LSTM carries its hidden state from batch to batch
        assert _same(plain[key], audited[key]), key

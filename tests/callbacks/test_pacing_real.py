"""GradientAudit() paced as on a slow machine, over about a hundred batches of real models.

test_real_models.py runs a few batches per model: none of the pacing is reached there. Here the
budget spaces everything as far as GradientAudit allows (``slow_machine_audit``, as in
test_latency.py), over enough batches for the first window, two spaced windows, a dozen of the
sentinel's looks and many idle batches, on a tiny GPT-2 with -100 labels, a BERT whose pooler
the loss never reaches, a Switch Transformer (top-1 mixture of experts: experts without tokens,
so without a gradient, at some steps), ``nn.LSTM`` / ``nn.GRU`` taggers and the zoo's GAN in
manual optimization. For each:

* the paced audit reports the same warnings and errors as the audit that watches every batch
  (``max_overhead=None``) over the same batches: it invents none and loses none. Findings are
  compared per ``(code, parameter)``: the two may group the same parameters differently (a
  finding groups those that reached it at the same step);
* the audit that watches every batch is itself held to an oracle: a callback that records,
  at every optimizer step, which parameters had no gradient;
* training is bitwise identical to a run without any callback;
* the pacing happened: idle batches, and less than half the batches watched.

A bug planted on a real model in a gap between windows (GPT-2's embeddings output detached
from batch 48 on) is reported within its bound. Last, a limitation, pinned: on a
mixture-of-experts model at the default ``patience``, an expert without tokens for
``patience`` steps in a row and then with tokens again is reported by the full audit, and by the
paced one only when a look and a window catch the streak.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from grad_callbacks import GradientAudit, GradientSanityCheck
from grad_callbacks.callbacks.audit import DEFAULT_CHECKS
from grad_callbacks.callbacks.pacing import FINITE_EVERY_STEPS_CPU, LATENCY_BOUNDS
from tests import zoo, zoo_real
from tests.callbacks.test_latency import slow_machine_audit
from tests.zoo import FirstSeen

#: Batches per run: the first window (8), spaced windows at 40 and 80, a look every 8 steps.
BATCHES = 100
#: GradientSanityCheck's default patience.
PATIENCE = 3


# ------------------------------------------------------------------------------- models
class BertUnusedPooler(L.LightningModule):
    """``BertModel`` (with its pooler, as built by default) and a classifier on the first
    token's last hidden state: the pooler is never on the loss's path (``missing-grad``)."""

    def __init__(self) -> None:
        super().__init__()
        tf = zoo_real.require_transformers()
        config = tf.BertConfig(
            vocab_size=zoo_real.VOCAB, max_position_embeddings=32, hidden_size=16,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.bert = tf.BertModel(config)
        self.head = nn.Linear(16, 3)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hidden = self.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return nn.functional.cross_entropy(self.head(hidden[:, 0]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SwitchMoE(L.LightningModule):
    """A tiny ``SwitchTransformersForConditionalGeneration``: one encoder and one decoder block,
    each with a top-1 mixture of 4 experts (an ``nn.ModuleDict``), router jitter on, trained on
    its own loss over -100 labels. With 16 tokens a batch, an expert gets no token, hence no
    gradient, at some steps."""

    def __init__(self) -> None:
        super().__init__()
        tf = zoo_real.require_transformers()
        config = tf.SwitchTransformersConfig(
            vocab_size=zoo_real.VOCAB, d_model=16, d_kv=8, d_ff=32, num_heads=2,
            num_layers=1, num_decoder_layers=1, encoder_sparse_step=1, decoder_sparse_step=1,
            num_experts=4, expert_capacity=64, dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0,
        )
        self.model = tf.SwitchTransformersForConditionalGeneration(config)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@dataclass(frozen=True)
class Case:
    """A model and its data (``BATCHES`` batches of 2 to 4 samples), the sanity check's
    patience for both audits, and what the case is there to exercise: ``unused`` (parameters
    that never get a gradient), ``intermittent`` (parameters without a gradient at some steps
    only)."""

    make: Callable[[], tuple[L.LightningModule, Any]]
    patience: int = PATIENCE
    unused: bool = False
    intermittent: bool = False


def _tokens(**kwargs: Any) -> Any:
    return zoo_real.token_loader(batch_size=2, n=2 * BATCHES, length=8, **kwargs)


def _sequences() -> Any:
    return zoo_real.sequence_loader(n=2 * BATCHES, length=8, batch_size=2)


def _gpt2() -> tuple[L.LightningModule, Any]:
    zoo_real.require_transformers()
    return zoo_real.HFModule("gpt2"), _tokens()


CASES: dict[str, Case] = {
    "gpt2-ignore-index": Case(_gpt2),
    "bert-unused-pooler": Case(lambda: (BertUnusedPooler(), _tokens(num_labels=3)), unused=True),
    # Experts go a few steps without tokens: a patience above the longest gap, as the docs of
    # missing-grad advise for mixture-of-experts layers (the default patience: see the last
    # test).
    "switch-moe": Case(lambda: (SwitchMoE(), _tokens()), patience=8, intermittent=True),
    "lstm": Case(lambda: (zoo_real.RNNTagger("lstm"), _sequences())),
    "gru-batch-first": Case(lambda: (zoo_real.RNNTagger("gru", batch_first=True), _sequences())),
    "gan-manual": Case(lambda: (zoo.GAN("toggle"), zoo.gan_data(n=4 * BATCHES))),
}


# ------------------------------------------------------------------------------- oracle
class GradPresence(L.Callback):
    """Records, at every optimizer step, the names of the stepping optimizer's trainable
    parameters whose ``.grad`` is None or all zeros, per optimizer. It only reads."""

    def __init__(self) -> None:
        self.missing: dict[int, list[set[str]]] = {}
        self.names: dict[int, str] = {}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if not self.names:
            self.names = {id(p): n for n, p in pl_module.named_parameters()}
        raw = getattr(optimizer, "_optimizer", optimizer)
        params = [p for group in raw.param_groups for p in group["params"] if p.requires_grad]
        missing = {self.names[id(p)] for p in params if p.grad is None or not p.grad.any()}
        self.missing.setdefault(id(raw), []).append(missing)

    def longest_streaks(self) -> dict[str, int]:
        """Per parameter ever without a gradient: its most steps in a row without one."""
        longest: dict[str, int] = {}
        for steps in self.missing.values():
            for name in set().union(*steps):
                runs = [len(list(g)) for k, g in itertools.groupby(name in s for s in steps) if k]
                longest[name] = max(longest.get(name, 0), *runs)
        return longest

    def never(self) -> set[str]:
        """Parameters without a gradient at every step of their optimizer."""
        return {name for steps in self.missing.values() for name in set.intersection(*steps)}


class Watched(L.Callback):
    """Records, per batch, whether any of the audit's per-step checks watched it."""

    def __init__(self, audit: GradientAudit) -> None:
        self.audit = audit
        self.batches: list[bool] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches.append(any(c.watching for c in self.audit.checks if c.watches_steps))


# ---------------------------------------------------------------------------------- runs
@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One intra-op thread: as fast for these tiny models, and on a loaded machine (the suite
    beside other jobs) two threads contend and make the runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checks(patience: int) -> list[Any] | None:
    """GradientAudit's default checks, with the sanity check's patience when not the default
    (built as GradientAudit builds it)."""
    if patience == PATIENCE:
        return None
    sanity = GradientSanityCheck(patience=patience, every_n_steps=20, on_finding="log")
    return [sanity if c is GradientSanityCheck else c for c in DEFAULT_CHECKS]


def _fit(case: Case, callbacks: list[L.Callback]) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module, data = case.make()
    zoo.fit(module, callbacks, data=data, max_steps=-1, limit_train_batches=BATCHES)
    return zoo.params_of(module)


def _full_audit(patience: int) -> GradientAudit:
    return GradientAudit(checks=_checks(patience), max_overhead=None, on_finding="log")


def _alarms(audit: GradientAudit) -> set[tuple[str, str]]:
    """The warning and error findings, as (code, parameter) pairs (``""`` for none)."""
    return {
        (f.code, name)
        for f in audit.findings
        if f.severity != "info"
        for name in (f.params or ("",))
    }


def _missing_grad(audit: GradientAudit) -> set[str]:
    return {name for code, name in _alarms(audit) if code == "missing-grad"}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_the_paced_audit_finds_what_the_full_audit_finds_and_leaves_training_alone(
    name: str,
) -> None:
    case = CASES[name]
    plain = _fit(case, [])
    full, presence = _full_audit(case.patience), GradPresence()
    after_full = _fit(case, [full, presence])
    paced = slow_machine_audit(checks=_checks(case.patience))
    after_paced = _fit(case, [paced])

    # Training is untouched by either audit.
    assert _changed(plain, after_paced) == []
    assert _changed(plain, after_full) == []
    # The full audit against the oracle: missing-grad names exactly the parameters that went
    # `patience` steps in a row without a gradient.
    streaks = presence.longest_streaks()
    assert _missing_grad(full) == {p for p, n in streaks.items() if n >= case.patience}
    # What the case is there for.
    assert bool(presence.never()) == case.unused, presence.never()
    intermittent = {p for p in streaks if p not in presence.never()}
    assert bool(intermittent) == case.intermittent, streaks
    if case.intermittent:
        # the sentinel's looks saw them and asked for windows (which found nothing)
        assert paced.missing_hints >= 1
    # The paced audit invents no alarm and loses none.
    assert _alarms(paced) == _alarms(full)
    # The pacing happened.
    paced.report_extras()  # counts the idle batches not yet given to the budget
    assert paced.idle_batch_count > 0
    assert paced.watch_windows is not None and paced.watch_windows.watched_share < 0.5


def test_gpt2_embeddings_detached_in_a_gap_are_found_within_the_bound() -> None:
    """From batch 48 (in the gap after the window at 40, just after a look of the sentinel),
    GPT-2's embeddings output is detached: the position embeddings get no gradient (the token
    embeddings still get one, through the tied LM head)."""
    onset = 48
    zoo_real.require_transformers()
    L.seed_everything(0, verbose=False)
    module = zoo_real.HFModule("gpt2")
    zoo.plant(module, "detach", onset, module.model.transformer.drop)
    audit, presence = slow_machine_audit(), GradPresence()
    seen, watched = FirstSeen(audit), Watched(audit)
    callbacks = [audit, presence, seen, watched]
    zoo.fit(module, callbacks, data=_tokens(), limit_train_batches=BATCHES)

    # The oracle: what had no gradient from the onset on (and had one before).
    (steps,) = presence.missing.values()
    cut = set.intersection(*steps[onset:])
    assert cut and not cut & set.union(*steps[:onset]), cut
    assert _missing_grad(audit) == cut
    assert "missing-grad" in seen.at, [f.code for f in audit.findings]
    assert 0 <= seen.at["missing-grad"] - onset <= LATENCY_BOUNDS["missing-grad"]
    assert not watched.batches[onset]  # it started in a gap
    assert [f.code for f in audit.findings if f.severity != "info"] == ["missing-grad"]
    assert audit.watch_windows is not None and audit.watch_windows.watched_share < 0.5


def test_short_streaks_of_an_intermittent_expert_are_the_only_alarms_the_paced_audit_misses() -> (
    None
):
    """At the default patience, the Switch Transformer's experts go ``patience`` steps in a row
    without tokens now and then, and get tokens again: the full audit reports each such expert
    (``missing-grad``, as documented). The paced audit sees a streak only when the sentinel's
    look lands early enough in it for a window of the sanity check to cover ``patience`` of its
    steps (and hints back off after windows that found nothing): it invents nothing, and what it
    misses are such short streaks, not a parameter that stays without a gradient (the bound of
    ``missing-grad`` is for that one; docs/performance.md states the limit)."""
    case = CASES["switch-moe"]
    full, presence = _full_audit(PATIENCE), GradPresence()
    _fit(case, [full, presence])
    paced = slow_machine_audit()
    _fit(case, [paced])

    streaks = presence.longest_streaks()
    assert not presence.never()
    reported = {p for p, n in streaks.items() if n >= PATIENCE}
    assert reported and _missing_grad(full) == reported
    assert _alarms(paced) <= _alarms(full)  # no alarm invented
    lost = {name for code, name in _alarms(full) - _alarms(paced)}
    # Every streak it missed is shorter than a look's interval plus the patience a window needs.
    assert all(streaks[name] < FINITE_EVERY_STEPS_CPU + PATIENCE for name in lost), lost

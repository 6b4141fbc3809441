"""Property-based: whatever the batch looks like, the audit never breaks training.

Hypothesis builds nested batches (dicts, lists, tuples, namedtuples, dataclasses) of float,
half, integer and bool tensors, strings, None, per-sample lists of strings and tensors without
a batch dimension, at batch sizes 0, 1, 2 and 5. A clean model trains on each with every check
attached: fit must finish with as many steps as without the audit, and nothing but info findings
(``check-skipped`` and the like) may appear.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import lightning as L
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from grad_callbacks import GradientAudit
from tests import zoo

Pair = namedtuple("Pair", ["first", "second"])


@dataclasses.dataclass
class Record:
    payload: Any
    label: Any


def _leaves(b: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.just(torch.randn(b, 4)),
        st.just(torch.randn(b, 4).half()),
        st.just(torch.randint(0, 5, (b,))),
        st.just(torch.rand(b) > 0.5),
        st.just(torch.randn(3)),  # no batch dimension
        st.just(torch.tensor(2.0)),  # a scalar
        st.just("a string"),
        st.none(),
        st.integers(-3, 3),
        st.just([f"sample {i}" for i in range(b)]),  # per-sample python values
        st.just([torch.randn(2), torch.randn(3)]),  # a ragged list
    )


def _batches(b: int) -> st.SearchStrategy[Any]:
    return st.recursive(
        _leaves(b),
        lambda inner: st.one_of(
            st.dictionaries(st.sampled_from(["x", "y", "meta", "mask"]), inner, max_size=3),
            st.lists(inner, max_size=3),
            st.tuples(inner, inner),
            st.builds(Pair, inner, inner),
            st.builds(Record, inner, inner),
        ),
        max_leaves=5,
    )


def _first_features(batch: Any) -> torch.Tensor | None:
    """The first 2-D float32 tensor of the batch (the model's input if there is one)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() == 2 and batch.dtype == torch.float32 else None
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        children: list[Any] = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, dict):
        children = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        children = list(batch)
    else:
        return None
    for child in children:
        found = _first_features(child)
        if found is not None:
            return found
    return None


class Tolerant(L.LightningModule):
    """A clean model that takes any batch: it uses the first float features it finds."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = _first_features(batch)
        loss = 1e-3 * self.layer.weight.pow(2).sum()
        if x is not None and x.numel() > 0:
            loss = loss + self.layer(x).pow(2).mean()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI must not depend on the draw
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), b=st.sampled_from([0, 1, 2, 5]))
def test_any_batch_structure_trains_with_the_audit_and_raises_no_alarm(
    data: st.DataObject, b: int
) -> None:
    batch = data.draw(_batches(b))
    without = zoo.fit(Tolerant(), [], data=DataLoader([batch, batch], batch_size=None))
    audit = GradientAudit(every_n_steps=1, on_finding="log")
    trainer = zoo.fit(Tolerant(), [audit], data=DataLoader([batch, batch], batch_size=None))
    # the audit changes nothing about the run (Lightning itself skips a batch that is None)
    assert trainer.global_step == without.global_step
    alarms = [f for f in audit.findings if f.severity != "info"]
    assert alarms == [], alarms

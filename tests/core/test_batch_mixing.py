"""find_batch_mixing: exact pairs and modules on models that mix samples, silence on clean ones,
and no trace left on the module, its inputs or the RNG."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from grad_callbacks.core.batch_mixing import (
    CannotCheckMixing,
    Mixing,
    ModelCall,
    batch_size_of,
    default_sample_indices,
    find_batch_mixing,
)
from grad_callbacks.core.batch_mixing.record import CallRecorder
from tests import zoo, zoo_mixing

SAMPLES = [0, 2, 3]


def _pairs(found: list[Mixing]) -> list[tuple[int, int]]:
    return sorted(p for m in found for p in m.pairs)


def _check(model: nn.Module, x: object, **kwargs: object) -> list[Mixing]:
    torch.manual_seed(0)
    model.train()
    return find_batch_mixing(model, x, sample_indices=SAMPLES, module=model, **kwargs)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _ids(batch: int = 4, length: int = 4) -> torch.Tensor:
    return torch.randint(0, 20, (batch, length), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------- broken
def test_reshape_folding_pairs_of_samples_names_the_pairs_and_the_mixer() -> None:
    found = _check(zoo_mixing.FoldNet(), _x(4, 8))
    assert _pairs(found) == [(0, 1), (2, 3), (3, 2)]
    assert {(m.module, m.module_type, m.previous_module) for m in found} == {
        ("mixer", "Linear", "enc")
    }
    assert all(m.output == "output" and m.inputs == ("input",) for m in found)
    assert all(m.magnitude > 0 and m.own_magnitude > 0 for m in found)


def test_linear_after_transpose_mixes_every_sample() -> None:
    found = _check(zoo_mixing.TransposeMixer(), _x(4, 8))
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    assert {m.module for m in found} == {"model.mixer"}
    assert {m.previous_module for m in found} == {"model.enc"}


def test_mean_over_dim0_between_modules_is_localised_to_the_code_between_them() -> None:
    found = _check(zoo_mixing.MeanOverDim0(), _x(4, 8))
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    # head's inputs already mix: the mixing is in MeanOverDim0.forward, after enc, before head
    assert {(m.module, m.previous_module, m.next_module) for m in found} == {
        ("MeanOverDim0", "enc", "head")
    }


def test_mean_over_dim0_in_the_top_level_forward_names_the_top_level_module() -> None:
    found = _check(zoo_mixing.MeanOverDim0(at_end=True), _x(4, 8))
    assert {(m.module, m.module_type, m.previous_module) for m in found} == {
        ("MeanOverDim0", "MeanOverDim0", "head")
    }


def test_localisation_survives_in_place_activations() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(inplace=True), zoo_mixing.BatchPool(), nn.Linear(4, 1)
    )
    found = find_batch_mixing(model, _x(4, 4), sample_indices=[0], module=model)
    assert [(m.module, m.module_type, m.previous_module) for m in found] == [
        ("2", "BatchPool", "1")
    ]


def test_plain_function_without_module_is_tested_but_not_localised() -> None:
    found = find_batch_mixing(lambda x: x - x.mean(dim=0), _x(3, 2), sample_indices=[0, 2])
    assert _pairs(found) == [(0, 1), (0, 2), (2, 0), (2, 1)]
    assert all(m.module is None for m in found)


def test_two_inputs_two_outputs_only_the_mixing_output_and_input_are_named() -> None:
    model = zoo_mixing.TwoInTwoOut()
    found = find_batch_mixing(
        lambda inp: model(*inp), (_x(4, 8), _x(4, 8) + 1), sample_indices=SAMPLES, module=model
    )
    assert [(m.output, m.sample, m.sources, m.inputs) for m in found] == [
        ("output[1]", 0, (3,), ("input[0]",)),
        ("output[1]", 2, (1,), ("input[0]",)),
        ("output[1]", 3, (2,), ("input[0]",)),
    ]
    # x2 + x1.roll(1) mixes in TwoInTwoOut.forward, before head_b; head_a does not feed
    # output[1]: it is not the module "before" the mixing.
    assert {(m.module, m.previous_module, m.next_module) for m in found} == {
        ("TwoInTwoOut", None, "head_b")
    }


def test_dict_output_names_the_key_and_the_pooling_module() -> None:
    found = _check(zoo_mixing.DictOut(), _x(4, 8))
    assert {m.output for m in found} == {"output['score']"}
    assert {(m.module, m.module_type, m.previous_module) for m in found} == {
        ("pool", "BatchPool", "enc")
    }


def test_dict_inputs_with_non_tensor_leaves() -> None:
    model = zoo_mixing.FoldNet()
    batch = {"names": ["a", "b", "c", "d"], "x": _x(4, 8), "scale": torch.tensor(2.0)}
    found = find_batch_mixing(
        lambda b: model(b["x"] * b["scale"]), batch, sample_indices=[1], module=model
    )
    assert [(m.sample, m.sources, m.inputs, m.module) for m in found] == [
        (1, (0,), ("input['x']",), "mixer")
    ]


def test_attention_over_the_batch_axis_fires_through_the_token_embedding() -> None:
    found = _check(zoo_mixing.TinyTransformer(bug=True), _ids())
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    assert {(m.module, m.module_type) for m in found} == {("attn", "MultiheadAttention")}
    assert {m.inputs for m in found} == {("tok output for input",)}


def test_token_mean_over_batch_fires() -> None:
    found = _check(zoo_mixing.TokenMeanOverBatch(mix=True), _ids())
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    assert {(m.module, m.next_module) for m in found} == {("TokenMeanOverBatch", "head")}


def test_small_cross_sample_dependence_is_found_unless_below_atol() -> None:
    def leaky(x: torch.Tensor) -> torch.Tensor:
        return x + 1e-4 * x.mean(dim=0)

    assert _pairs(find_batch_mixing(leaky, _x(4, 3))) == [(0, 1), (0, 2), (0, 3)]
    assert find_batch_mixing(leaky, _x(4, 3), atol=1e-3) == []


# ---------------------------------------------------------------------------------- clean
CLEAN = {
    "mlp": lambda: (zoo.MLP().net, _x(4, 8)),
    "cnn": lambda: (zoo.CNN().net, _x(4, 1, 8, 8)),
    "batchnorm-dropout": lambda: (zoo_mixing.BatchNormNet(), _x(4, 8)),
    "transformer": lambda: (zoo_mixing.TinyTransformer(bug=False), _ids()),
    "token-mean": lambda: (zoo_mixing.TokenMeanOverBatch(mix=False), _ids()),
}


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_clean_models_are_silent(case: str) -> None:
    model, x = CLEAN[case]()
    assert _check(model, x) == []


def test_batchnorm_without_running_stats_and_input_changed_in_place_are_clean() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1, track_running_stats=False)
            self.head = nn.Linear(64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2.0)  # changes its input in place
            return self.head(self.bn(x).flatten(1))

    model = Net()
    assert _check(model, _x(4, 1, 8, 8)) == []
    assert model.bn.running_mean is None and model.bn.training


def test_sequence_first_attention_is_clean_with_its_batch_dims() -> None:
    attn = nn.MultiheadAttention(8, 2)  # (T, B, E)
    x = _x(5, 4, 8)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return attn(x, x, x)[0]

    assert find_batch_mixing(forward, x, sample_indices=[0, 3], input_dim=1, output_dim=1) == []
    # Read with the wrong axes, every "sample" (a position) attends to every other one.
    assert find_batch_mixing(forward, x, sample_indices=[0]) != []


def test_nan_gradients_from_other_samples_are_not_mixing() -> None:
    x = _x(4, 3).abs()
    x[1, 0] = 0.0  # sqrt'(0) = inf: sample 1's gradient for output 0 is 0 * inf = NaN
    assert find_batch_mixing(torch.sqrt, x, sample_indices=[0, 2]) == []


def test_integer_inputs_that_are_not_embedded_are_passed_through() -> None:
    lin = nn.Linear(3, 1)

    def forward(inp: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, mask = inp
        return lin(x) * mask.unsqueeze(1)

    mask = torch.tensor([1, 0, 1, 1])
    assert find_batch_mixing(forward, (_x(4, 3), mask), sample_indices=[0, 3]) == []


# ---------------------------------------------------------------------------------- no trace
def test_no_trace_on_batchnorm_buffers_grads_flags_inputs_or_rng() -> None:
    model = zoo_mixing.BatchNormNet()
    model.train()
    model.net[0].bias.requires_grad_(False)
    model.net[4].weight.grad = torch.full_like(model.net[4].weight, 7.0)
    bn = model.net[1]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = _x(4, 8)
    x_before, x_version = x.clone(), x._version
    rng = torch.get_rng_state()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    assert find_batch_mixing(model, x, sample_indices=SAMPLES, module=model) == []

    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert int(bn.num_batches_tracked) == 0
    assert bn.training and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.net[4].weight.grad, torch.full_like(model.net[4].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "net.4.weight")
    assert torch.equal(x, x_before) and x._version == x_version and not x.requires_grad


def test_buffers_are_restored_after_localisation_too() -> None:
    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.pool = zoo_mixing.BatchPool()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.bn(x))

    model = Mixing()
    before = {k: v.clone() for k, v in model.named_buffers()}
    found = find_batch_mixing(model, _x(4, 8), sample_indices=[0], module=model)
    assert {m.module for m in found} == {"pool"}
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())


# ---------------------------------------------------------------------------------- cannot run
def test_batch_of_one_cannot_be_checked() -> None:
    with pytest.raises(CannotCheckMixing, match="1 sample"):
        find_batch_mixing(nn.Linear(3, 1), _x(1, 3))


def test_integer_input_without_embedding_cannot_be_checked() -> None:
    with pytest.raises(CannotCheckMixing, match=r"reach no nn\.Embedding"):
        find_batch_mixing(lambda ids: ids.float(), _ids(), module=nn.Linear(1, 1))


def test_output_without_the_batch_axis_cannot_be_checked() -> None:
    with pytest.raises(CannotCheckMixing, match="no floating output has the batch size 4"):
        find_batch_mixing(lambda x: x.sum(), _x(4, 3))


def test_helpers() -> None:
    assert batch_size_of(({"a": [1, 2]}, _x(6, 2)), dim=0) == 6
    assert batch_size_of("text") is None
    assert default_sample_indices(4, 3) == [0, 2, 3]
    assert default_sample_indices(1, 3) == [0]


# ---------------------------------------------------------------------------------- leaves
class LearnedPositions(nn.Embedding):
    """BART's learned positional embedding: called with the ids (B, T), it looks up the
    positions and returns (1, T, H), with no batch axis."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.arange(ids.shape[1])).unsqueeze(0)


class WithPositions(nn.Module):
    def __init__(self, pool_over_batch: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.pos = LearnedPositions(16, 8)
        self.head = nn.Linear(8, 1)
        self.pool_over_batch = pool_over_batch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(ids)
        if self.pool_over_batch:
            h = h + h.mean(dim=0, keepdim=True)
        return self.head(h).squeeze(-1)


def test_embedding_output_without_a_batch_axis_is_carried_not_indexed() -> None:
    """Before: IndexError (the positional lookup (1, T, H) was indexed at sample 2 and 3)."""
    assert _check(WithPositions(), _ids()) == []
    found = _check(WithPositions(pool_over_batch=True), _ids())
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    assert {m.inputs for m in found} == {("tok output for input",)}  # not pos


class PositionsOf(nn.Embedding):
    """A positional embedding called with a float ``(B, T)`` slice of the embeddings (as BART's
    encoder calls its own): (B, T, H) positions, the same for every sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return super().forward(positions)


def test_embedding_called_with_a_float_tensor_of_the_ids_shape_is_not_tapped() -> None:
    """Before: taken for a lookup of the ids (same shape) and named as an input of the test."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(20, 8)
            self.pos = PositionsOf(16, 8)
            self.pool = zoo_mixing.BatchPool()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.tok(ids)
            return self.pool(h + self.pos(h[:, :, -1])).sum(-1)

    found = _check(Model(), _ids())
    assert {m.inputs for m in found} == {("tok output for input",)}
    assert {m.module for m in found} == {"pool"}


def test_other_ids_of_the_inputs_shape_are_carried_as_they_are() -> None:
    """Decoder ids shifted from the labels have the ids' shape but are not the ids: their
    lookups are carried, not taken for the inputs (before: they were, by shape)."""
    model = nn.Embedding(20, 8)
    labels = torch.randint(0, 20, (4, 4), generator=torch.Generator().manual_seed(3))

    def forward(inp: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, labels = inp
        decoder_ids = labels.roll(1, dims=1)
        return model(ids) + model(decoder_ids).mean(dim=0)  # pooled, but over carried ids

    assert find_batch_mixing(forward, (_ids(), labels), sample_indices=[0], module=model) == []


# ---------------------------------------------------------------------------------- k x B rows
class Flattened(nn.Module):
    """(B, T, F) -> per-token logits flattened to (B*T, V) as Lightning's demos return them;
    ``sequence_first`` runs on (T, B, F) and flattens that; ``pool`` mixes samples."""

    def __init__(self, sequence_first: bool = False, pool: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.sequence_first = sequence_first
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.transpose(0, 1) if self.sequence_first else x)
        if self.pool:
            h = h + h.mean(dim=1 if self.sequence_first else 0, keepdim=True)
        return h.reshape(-1, 5)


@pytest.mark.parametrize("sequence_first", [False, True])
def test_outputs_of_k_rows_per_sample_are_tested(sequence_first: bool) -> None:
    """Before: 'no floating output has the batch size' (check-skipped)."""
    x = _x(4, 6, 3)
    assert _check(Flattened(sequence_first), x) == []
    found = _check(Flattened(sequence_first, pool=True), x)
    assert _pairs(found) == [(i, j) for i in SAMPLES for j in range(4) if j != i]
    assert {m.rows for m in found} == {6}
    assert {m.module for m in found} == {"Flattened"}


# ---------------------------------------------------------------------------------- calls
def test_a_model_call_names_its_arguments_and_keeps_keywords() -> None:
    model = zoo_mixing.TwoInTwoOut()
    call = ModelCall.of(model, (_x(4, 8),), {"x2": _x(4, 8) + 1})
    assert call.describe("pl_module") == "pl_module(x1, x2=...)"
    found = find_batch_mixing(lambda c: c.run(model), call, sample_indices=[0], module=model)
    assert [(m.output, m.sources, m.inputs) for m in found] == [("output[1]", (3,), ("x1",))]


def test_the_recorder_keeps_the_outermost_first_calls_and_leaves_no_trace() -> None:
    model = zoo_mixing.FoldsBatch()  # forward calls self.model
    x = _x(4, 8)
    x0 = x.clone()
    recorder = CallRecorder(model).start()
    model(x)
    model(x + 1)  # a second call is not kept
    model.model.enc(x)  # a grandchild: not watched
    x.add_(1.0)  # the inputs kept are copies
    calls = recorder.stop()
    assert [(c.target, c.call.describe("m")) for c in calls] == [("", "m(x)")]
    assert torch.equal(calls[0].call.args[0], x0)
    assert not calls[0].call.args[0].requires_grad
    assert "forward" not in model.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    found = find_batch_mixing(
        lambda c: c.run(model), calls[0].call, sample_indices=[0], module=model
    )
    assert {m.module for m in found} == {"model.mixer"}


def test_the_recorder_keeps_children_the_step_calls_itself() -> None:
    gan = zoo.GAN()
    recorder = CallRecorder(gan).start()
    gan._losses(_x(4, 8))
    calls = recorder.stop()
    assert [c.target for c in calls] == ["generator", "discriminator"]
    assert [tuple(c.call.args[0].shape) for c in calls] == [(4, 4), (4, 8)]


def test_a_module_copied_or_pickled_while_recorded_is_itself() -> None:
    model = zoo_mixing.FoldsBatch()
    recorder = CallRecorder(model).start()
    twin = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    x = _x(4, 8)
    twin(x)
    loaded(x)
    recorder.stop()
    assert recorder.calls == []  # neither copy records into the recorder
    assert torch.equal(twin(x), model(x)) and torch.equal(loaded(x), model(x))
    assert "forward" not in model.__dict__


# ------------------------------------------------------------------ scores between samples
class PairScores(nn.Module):
    """A CLIP-style head: per-sample embeddings and their ``[B, B]`` similarity scores;
    ``centre`` plants mixing (embeddings centred over the batch)."""

    def __init__(self, centre: bool = False) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(3, 4), nn.Linear(3, 4)
        self.centre = centre

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t, v = self.text(x), self.image(x.flip(-1))
        if self.centre:
            t = t - t.mean(dim=0, keepdim=True)
        return {"text": t, "scores": t @ v.T}


def test_scores_between_samples_are_read_on_their_diagonal() -> None:
    # oracle: scores[i, j] = <t_i, v_j> depends on i and j by design; [i, i] on i alone
    assert _check(PairScores(), _x(4, 3)) == []


def test_mixing_seen_on_the_diagonal_of_scores_is_still_reported() -> None:
    found = _check(PairScores(centre=True), _x(4, 3), localize=False)
    assert {m.output for m in found} == {"output['text']", "output['scores']"}
    assert _pairs(found) == sorted([(i, j) for i in SAMPLES for j in range(4) if j != i] * 2)


def test_a_square_classifier_output_that_mixes_is_reported() -> None:
    # B classes for a batch of B: square by coincidence, the batch-mean mixing shows on [i, i]
    model = nn.Sequential(_Centre(), nn.Linear(3, 4))
    assert _pairs(_check(model, _x(4, 3), localize=False)) == [
        (i, j) for i in SAMPLES for j in range(4) if j != i
    ]


class _Centre(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)

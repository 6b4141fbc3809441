"""Tests for grad_callbacks.core.batch: batch size and per-sample slicing of nested batches."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, field

import pytest
import torch

from grad_callbacks.core.batch import batch_size, flatten_batch, slice_batch

Pair = namedtuple("Pair", ["x", "y"])


@dataclass
class Sample:
    x: torch.Tensor
    names: list[str]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    tag: str = "t"


def test_batch_size_of_plain_tensor_and_nesting() -> None:
    x = torch.zeros(5, 3)
    assert batch_size(x) == 5
    assert batch_size({"a": x, "b": [torch.ones(5), (torch.ones(5, 2, 2), "s")]}) == 5
    assert batch_size(Pair(x, torch.zeros(5))) == 5
    assert batch_size(Sample(x, ["a"] * 5)) == 5


def test_batch_size_ignores_non_tensors_and_scalars() -> None:
    batch = {"x": torch.zeros(4, 2), "s": "name", "n": None, "k": 3, "t": torch.tensor(1.0)}
    assert batch_size(batch) == 4


def test_batch_size_none_when_undetermined() -> None:
    assert batch_size({"x": torch.zeros(5, 2), "w": torch.zeros(3)}) is None
    assert batch_size(["a", None, 3]) is None
    assert batch_size(torch.tensor(2.0)) is None
    assert batch_size({}) is None


def test_batch_size_one() -> None:
    assert batch_size((torch.zeros(1, 3), torch.zeros(1))) == 1


def test_slice_int_keeps_leading_dim() -> None:
    x = torch.arange(10.0).reshape(5, 2)
    y = torch.arange(5)
    one = slice_batch((x, y), 3)
    assert isinstance(one, tuple)
    assert one[0].shape == (1, 2) and one[0].tolist() == [[6.0, 7.0]]
    assert one[1].tolist() == [3]


def test_slice_negative_and_out_of_range() -> None:
    x = torch.arange(5)
    assert slice_batch(x, -1).tolist() == [4]
    assert slice_batch(x, -5).tolist() == [0]
    with pytest.raises(IndexError):
        slice_batch(x, 5)
    with pytest.raises(IndexError):
        slice_batch(x, -6)


def test_slice_with_slice_and_index_tensors() -> None:
    x = torch.arange(12).reshape(6, 2)
    names = list("abcdef")
    got = slice_batch({"x": x, "names": names}, slice(1, 5, 2))
    assert got["x"].tolist() == [[2, 3], [6, 7]]
    assert got["names"] == ["b", "d"]
    idx = torch.tensor([5, 0, 5])
    got = slice_batch({"x": x, "names": names}, idx)
    assert got["x"].tolist() == [[10, 11], [0, 1], [10, 11]]
    assert got["names"] == ["f", "a", "f"]
    mask = torch.tensor([True, False, False, True, False, False])
    got = slice_batch({"x": x, "names": names}, mask)
    assert got["x"].tolist() == [[0, 1], [6, 7]]
    assert got["names"] == ["a", "d"]
    with pytest.raises(ValueError):
        slice_batch(x, torch.zeros(2, 2, dtype=torch.long))


def test_slice_keeps_non_batched_leaves() -> None:
    w = torch.ones(3)
    s = torch.tensor(2.0)
    batch = {"x": torch.zeros(5, 2), "w": w, "s": s, "tag": "train", "none": None, "k": 7}
    got = slice_batch(batch, 1, size=5)
    assert got["x"].shape == (1, 2)
    assert got["w"] is w and got["s"] is s
    assert got["tag"] == "train" and got["none"] is None and got["k"] == 7
    with pytest.raises(ValueError, match="batch size"):
        slice_batch(batch, 1)  # leading dims 5 and 3 disagree: size must be given


def test_slice_list_of_b_strings_but_not_other_lists() -> None:
    batch = {
        "x": torch.zeros(3, 1),
        "names": ["a", "b", "c"],
        "vocab": ["p", "q"],
        "tokens": [["a", "b"], ["c"], []],
        "pair": [torch.zeros(3), torch.ones(3)],
    }
    got = slice_batch(batch, 2)
    assert got["names"] == ["c"]
    assert got["vocab"] == ["p", "q"]
    assert got["tokens"] == [[]]
    assert isinstance(got["pair"], list) and len(got["pair"]) == 2
    assert got["pair"][1].tolist() == [1.0]


def test_slice_namedtuple_and_dataclasses_keep_their_type() -> None:
    x = torch.arange(4.0)
    got = slice_batch(Pair(x, x * 2), 1)
    assert type(got) is Pair and got.y.tolist() == [2.0]
    got = slice_batch(Sample(x.reshape(4, 1), ["a", "b", "c", "d"], {"k": 1}), 2)
    assert type(got) is Sample
    assert got.x.tolist() == [[2.0]] and got.names == ["c"] and got.meta == {"k": 1}
    got = slice_batch(Frozen(x), 0)
    assert type(got) is Frozen and got.x.tolist() == [0.0] and got.tag == "t"


def test_slice_keeps_mapping_types() -> None:
    x = torch.arange(3)
    od = slice_batch(OrderedDict(b=x, a=x), 0)
    assert type(od) is OrderedDict and list(od) == ["b", "a"]
    dd = defaultdict(list, {"x": x})
    got = slice_batch(dd, 1)
    assert type(got) is defaultdict and got.default_factory is list and got["x"].tolist() == [1]
    assert dd["x"] is x  # the input is not modified


def test_slice_nested_lists_and_tuples() -> None:
    x = torch.arange(6).reshape(3, 2)
    batch = [x, (x[:, 0], {"deep": [x.sum(1)]}), "s"]
    got = slice_batch(batch, 1)
    assert isinstance(got, list) and isinstance(got[1], tuple)
    assert got[0].tolist() == [[2, 3]]
    assert got[1][0].tolist() == [2]
    assert got[1][1]["deep"][0].tolist() == [5]
    assert got[2] == "s"


def test_slice_batch_size_one() -> None:
    x = torch.randn(1, 4)
    got = slice_batch({"x": x, "names": ["only"]}, 0)
    assert torch.equal(got["x"], x) and got["names"] == ["only"]


def test_flatten_and_rebuild() -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4)
    batch = {"x": x, "meta": ("tag", y, torch.ones(2)), "names": list("abcd")}
    flat = flatten_batch(batch, size=4)
    assert flat.size == 4 and flat.has_sample_lists
    assert [t is s for t, s in zip(flat.tensors, (x, y), strict=True)] == [True, True]
    new = flat.rebuild([torch.ones(1, 2), torch.ones(1)])
    assert new["x"].shape == (1, 2) and new["meta"][1].shape == (1,)
    assert new["meta"][0] == "tag" and new["meta"][2].shape == (2,)
    with pytest.raises(ValueError):
        flat.rebuild([torch.ones(1)])
    assert not flatten_batch((x, ["one"] * 3)).has_sample_lists

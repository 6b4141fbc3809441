"""PythonState: what a recomputed training step rebinds or mutates is put back, and what cannot
be put back is named."""

from __future__ import annotations

import torch
from torch import nn

from grad_callbacks.core import python_state
from grad_callbacks.core.python_state import MISSING, PythonState

CALLS = 0
HISTORY: list[int] = []


class Counter(nn.Module):
    shared = "class value"
    seen = 0

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.calls = 0
        self.history: list[int] = []
        self.cache: dict[str, int] = {"a": 1}
        self.hidden = (torch.zeros(2, 3), torch.ones(2, 3))
        self.total = torch.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global CALLS
        CALLS += 1
        HISTORY.append(CALLS)
        self.calls += 1
        type(self).seen += 1
        self.history.append(self.calls)
        self.cache["b"] = 2
        self.shared = "instance value"  # shadows the class attribute
        self.hidden = (self.hidden[0] + 1, self.hidden[1] + 1)
        self.total.add_(1.0)
        self.inner.note = "created on a submodule"
        del self.cache
        return self.inner(x)


def test_every_kind_of_change_is_put_back_as_the_same_objects() -> None:
    net = Counter()
    history, hidden, total = net.history, net.hidden, net.total
    state = PythonState.capture(net, [net.forward])
    net(torch.ones(1, 2))
    assert state.restore() == []
    assert net.calls == 0 and net.history is history and history == []
    assert net.cache == {"a": 1} and net.hidden is hidden
    assert "shared" not in vars(net) and net.shared == "class value"
    assert Counter.seen == 0
    assert not hasattr(net.inner, "note")
    assert net.total is total and torch.equal(total, torch.zeros(3))
    assert CALLS == 0 and HISTORY == []


def test_rebound_names_what_changed_with_its_earlier_value() -> None:
    net = Counter()
    hidden = net.hidden
    state = PythonState.capture(net)
    net.hidden = (hidden[0] * 2, hidden[1])
    net.inner.created = 1
    rebound = state.rebound()
    assert rebound["self.hidden"] is hidden
    assert rebound["inner.created"] is MISSING
    state.restore()
    assert state.rebound() == {}


def test_what_is_too_large_to_copy_is_named_not_guessed(monkeypatch) -> None:
    monkeypatch.setattr(python_state, "MAX_CONTAINER", 3)
    monkeypatch.setattr(python_state, "MAX_TENSOR", 2)
    net = nn.Linear(2, 2)
    net.big_list = [1, 2, 3, 4]
    net.big_tensor = torch.zeros(5)
    net.small_list = [1]
    state = PythonState.capture(net)
    net.big_list.append(5)
    net.big_tensor.add_(1)
    net.small_list.append(2)
    lost = state.restore()
    assert sorted(lost) == [
        "self.big_list (resized, too large to copy)",
        "self.big_tensor (written in place, too large to copy)",
    ]
    assert net.small_list == [1]


def test_a_closure_cell_is_put_back() -> None:
    count = 0

    def step() -> None:
        nonlocal count
        count += 1

    state = PythonState.capture(nn.Linear(1, 1), [step])
    step()
    assert count == 1
    state.restore()
    assert count == 0


def test_restoring_an_earlier_picture_then_the_current_one() -> None:
    """A faithful replay: start from the picture taken before the real step, then put the state
    after the real step back."""
    net = Counter()
    before = PythonState.capture(net, [net.forward])
    net(torch.ones(1, 2))  # the real step
    after_calls, after_hidden = net.calls, net.hidden
    entry = PythonState.capture(net, [net.forward])
    before.restore()
    assert net.calls == 0 and torch.equal(net.total, torch.zeros(3))
    net(torch.ones(1, 2))  # the replay sees what the real step saw
    assert net.calls == 1
    entry.restore()
    assert net.calls == after_calls and net.hidden is after_hidden
    assert torch.equal(net.total, torch.ones(3))


def test_containers_and_tensors_two_levels_in_are_put_back() -> None:
    """Before: only one level was watched; ``self.logs["train"].append(x)`` and a tensor in a
    dict written in place stayed changed."""
    net = nn.Linear(2, 2)
    train: list[int] = [1]
    net.logs = {"train": train, "seen": {"a"}}
    net.cache = {"h": torch.zeros(3)}
    net.pairs = ([0], torch.zeros(2))
    net.deep = {"a": {"b": []}}  # three levels: not watched
    state = PythonState.capture(net)
    net.logs["train"].append(2)
    net.logs["seen"].add("b")
    net.cache["h"].add_(1)
    net.pairs[0].append(1)
    net.pairs[1].add_(1)
    net.deep["a"]["b"].append(1)
    assert state.restore() == []
    assert net.logs["train"] is train and train == [1] and net.logs["seen"] == {"a"}
    assert torch.equal(net.cache["h"], torch.zeros(3))
    assert net.pairs[0] == [0] and torch.equal(net.pairs[1], torch.zeros(2))
    assert net.deep == {"a": {"b": [1]}}  # the documented limit


def test_a_large_container_two_levels_in_is_named(monkeypatch) -> None:
    monkeypatch.setattr(python_state, "MAX_CONTAINER", 3)
    net = nn.Linear(2, 2)
    net.logs = {"train": [1, 2, 3, 4]}
    state = PythonState.capture(net)
    net.logs["train"].append(5)
    assert state.restore() == ["self.logs['train'] (resized, too large to copy)"]


def test_tensors_beyond_the_clone_budget_are_only_watched(monkeypatch) -> None:
    monkeypatch.setattr(python_state, "MAX_CLONED", 4)
    net = nn.Linear(2, 2)
    net.cache = {"a": torch.zeros(3), "b": torch.zeros(3)}  # 6 elements, 4 may be cloned
    state = PythonState.capture(net)
    net.cache["a"].add_(1)
    net.cache["b"].add_(1)
    assert state.restore() == ["self.cache['b'] (written in place, too large to copy)"]
    assert torch.equal(net.cache["a"], torch.zeros(3))


class _Box:
    def __init__(self) -> None:
        self.count = 0
        self.items: list[int] = []


def test_objects_of_the_users_classes_are_put_back_not_library_ones() -> None:
    import types

    net = nn.Linear(2, 2)
    net.box, net.ns = _Box(), types.SimpleNamespace(count=0)
    items = net.box.items
    state = PythonState.capture(net)
    net.box.count += 1
    net.box.items.append(1)
    net.box.extra = True
    net.ns.count += 1
    assert state.restore() == []
    assert net.box.count == 0 and net.box.items is items and items == []
    assert not hasattr(net.box, "extra")
    assert net.ns.count == 1  # a standard-library object: not watched

"""The rank comparison's pieces in one process: the schedule, the rows a rank sends, and what a
gathered table (built here as several ranks would send it) says."""

from __future__ import annotations

import torch

from grad_callbacks.core.fingerprint import fingerprints
from grad_callbacks.core.rank_sync import (
    HEADER,
    NOT_STEPPED,
    compare,
    next_check,
    not_stepped_rows,
    pack,
    step_rows,
    summary,
)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=g)
    return params  # the third has no gradient


def _gathered(*ranks: list[torch.nn.Parameter], capacity: int = 5) -> torch.Tensor:
    return torch.stack([pack(step_rows(ps), layout=11, step=3, capacity=capacity) for ps in ranks])


def _copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def test_schedule_is_the_first_steps_then_every_n() -> None:
    due = sorted({next_check(s, 16, 2) for s in range(70)})
    assert due == [0, 1, 16, 32, 48, 64, 80]
    assert [next_check(s, 5, 0) for s in (0, 1, 5, 6)] == [0, 5, 5, 10]


def test_rows_hold_the_fingerprints_and_norms_of_gradients_and_parameters() -> None:
    params = _params()
    rows = step_rows(params)
    assert rows.shape == (3, 6)
    grads = [p.grad for p in params]
    assert torch.equal(rows[:, :2], fingerprints(grads))
    assert torch.equal(rows[:, 2:4], fingerprints(params))
    norms = rows[:, 4:].contiguous().view(torch.float64)
    for i, p in enumerate(params):
        expected_grad = 0.0 if p.grad is None else float(p.grad.norm())
        assert abs(float(norms[i, 0]) - expected_grad) < 1e-5
        assert abs(float(norms[i, 1]) - float(p.detach().norm())) < 1e-5
    assert rows[2, 0] == -1  # no gradient: the fingerprint of None


def test_equal_ranks_agree_and_nothing_is_read() -> None:
    params = _params()
    gathered = _gathered(params, _copy(params), _copy(params))
    assert summary(gathered).tolist() == [0, 3]


def test_a_parameter_that_differs_on_one_rank_is_named_with_its_rank() -> None:
    params = _params()
    other = _copy(params)
    with torch.no_grad():
        other[1][2, 1] = -other[1][2, 1]  # a sign flip: same norm
    third = _copy(params)
    third[0].grad[0, 0] += 0.5
    gathered = _gathered(params, other, third)
    differs, rows = summary(gathered).tolist()
    assert (differs, rows) == (1, 3)
    result = compare(gathered, capacity=5)
    by_index = {r.index: r for r in result.rows}
    assert set(by_index) == {0, 1}
    assert by_index[1].param_ranks == (1,) and by_index[1].grad_ranks == ()
    assert by_index[1].param_gap < 1e-6  # the norms agree: the gap is only a lower bound
    assert by_index[0].grad_ranks == (2,) and by_index[0].param_ranks == ()
    assert by_index[0].grad_gap > 0
    assert result.ranks == (1, 2)
    assert result.with_grad == {0, 1}  # the third parameter had no gradient


def test_an_optimizer_that_stepped_on_some_ranks_only() -> None:
    params = _params()
    skipped = pack(not_stepped_rows(3, torch.device("cpu")), layout=11, step=3, capacity=5)
    gathered = torch.stack([pack(step_rows(params), layout=11, step=3, capacity=5), skipped])
    result = compare(gathered, capacity=5)
    assert [r.stepped_ranks for r in result.rows] == [(0,)] * 3
    assert all(r.grad_ranks == () and r.param_ranks == (1,) for r in result.rows)
    assert int(skipped[HEADER]) == NOT_STEPPED


def test_layouts_errors_and_capacity() -> None:
    params = _params()
    mine = pack(step_rows(params), layout=11, step=3, capacity=5)
    other_layout = pack(step_rows(params), layout=12, step=3, capacity=5)
    assert compare(torch.stack([mine, other_layout]), capacity=5).layout_ranks == (1,)
    failed = pack(
        not_stepped_rows(0, torch.device("cpu")), layout=0, step=3, capacity=5, error=True
    )
    gathered = torch.stack([mine, failed])
    assert summary(gathered).tolist()[0] == 1
    assert compare(gathered, capacity=5).error_ranks == (1,)
    # More rows than the capacity: the header keeps the true count, read by every rank.
    cut = torch.stack([pack(step_rows(params), layout=11, step=3, capacity=2)] * 2)
    assert summary(cut).tolist() == [0, 3]

"""GradSanityMonitor's decoding of collected rows, against a plain step-by-step reference."""

from __future__ import annotations

import random

import pytest
import torch

from grad_callbacks.core.grad_stats import GradSanityMonitor, HostCopy, _Row


@pytest.mark.parametrize("seed", range(20))
def test_vectorised_decode_matches_the_row_by_row_reference(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
    params = [
        [(f"g{g}.p{i}", torch.nn.Parameter(torch.ones(2))) for i in range(n)]
        for g, n in enumerate(sizes)
    ]
    patience = rng.randint(1, 4)
    monitor = GradSanityMonitor(params, patience=patience)
    choices = [0.0, 0.0, 1.0, 2.5, float("nan"), float("inf")]
    carried = {g: [0] * n for g, n in enumerate(sizes)}
    for _read in range(3):  # streaks carry across reads
        sequence = []
        for step in range(rng.randint(1, 12)):
            group = rng.randrange(len(sizes))
            values = [rng.choice(choices) for _ in range(sizes[group])]
            local = (
                [rng.choice(choices) for _ in range(sizes[group])] if rng.random() < 0.3 else None
            )
            counted = rng.random() < 0.8
            gap = rng.random() < 0.2  # steps of the group went unobserved before this one
            sequence.append((group, step, values, local, counted, gap))
            monitor._rows.append(_row(group, step, values, local, counted, gap))
        tensor, layout = monitor.collect()  # type: ignore[misc]
        summaries = monitor.decode(HostCopy(tensor).result(), layout)
        expected, _ = _reference_from(carried, sequence, sizes, patience)
        assert len(summaries) == len(expected)
        for s, (group, fm, fn, streak) in zip(summaries, expected, strict=True):
            names = [n for n, _ in params[group]]
            assert s.group == group
            assert s.missing == tuple(names[i] for i in sorted(fm))
            assert s.missing_step == min(fm.values(), default=-1)
            assert s.nonfinite == tuple(names[i] for i in sorted(fn))
            assert s.nonfinite_step == min(fn.values(), default=-1)
            assert s.without_grad == sum(1 for x in streak if x > 0)
            assert s.streak == max((streak[i] for i in fm), default=0)


def _reference_from(carried, sequence, sizes, patience):  # type: ignore[no-untyped-def]
    """The reference, starting from the streaks carried in (updated in place)."""
    out = []
    window: dict[int, tuple[dict[int, int], dict[int, int]]] = {}
    for group, step, values, local, counted, gap in sequence:
        fm, fn = window.setdefault(group, ({}, {}))
        tested = local if local is not None else values
        if gap:
            carried[group] = [0] * len(carried[group])
        for i, v in enumerate(values):
            carried[group][i] = carried[group][i] + 1 if v == 0 else 0
            if carried[group][i] >= patience and i not in fm:
                fm[i] = step
            t = tested[i]
            if counted and (t != t or abs(t) == float("inf")) and i not in fn:
                fn[i] = step
    for group in sorted(window):
        fm, fn = window[group]
        out.append((group, fm, fn, list(carried[group])))
    return out, carried


def _row(group: int, step: int, values, local, counted, gap):  # type: ignore[no-untyped-def]
    from grad_callbacks.core.grad_stats import _Row

    tensors = [torch.tensor(values)]
    if local is not None and counted:
        tensors.append(torch.tensor(local))
    return _Row(group, step, counted, len(tensors) == 2, after_gap=gap), tensors


def test_a_gap_restarts_streaks_so_sparse_use_is_not_missing() -> None:
    """A parameter used at every 3rd step, observed only at the other steps around a gap, is
    never 3 observed steps in a row without a gradient; without mark_gap it would look so."""
    used, rare = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    monitor = GradSanityMonitor([[("used", used), ("rare", rare)]], patience=3)
    for step in range(12):
        rare_used = step % 3 == 0
        (used.sum() + (rare.sum() if rare_used else 0)).backward()
        if rare_used:  # the steps that use it fall in the gaps
            monitor.mark_gap()
        else:
            monitor.observe(0, step)
        used.grad, rare.grad = None, None
    tensor, layout = monitor.collect()  # type: ignore[misc]
    (summary,) = monitor.decode(HostCopy(tensor).result(), layout)
    assert summary.missing == ()
    assert summary.without_grad == 1  # rare, at the last observed step


def test_each_step_of_a_read_has_its_own_counts() -> None:
    """per_step: parameters without a gradient and with NaN/Inf at each step, counted by hand."""
    a, b, frozen = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    frozen.requires_grad_(False)
    monitor = GradSanityMonitor([[("a", a), ("b", b), ("frozen", frozen)]], patience=5)
    expected = []
    for step in range(4):
        loss = a.sum() * (float("nan") if step == 2 else 1.0)
        if step % 2:
            loss = loss + b.sum()
        loss.backward()
        monitor.observe(0, 10 + step)
        expected.append((10 + step, 0 if step % 2 else 1, 1 if step == 2 else 0))
        a.grad, b.grad = None, None
    tensor, layout = monitor.collect()  # type: ignore[misc]
    (summary,) = monitor.decode(HostCopy(tensor).result(), layout)
    assert summary.per_step == tuple(expected)


def test_decoding_healthy_rows_at_once_says_what_the_fold_says() -> None:
    """Rows where every gradient norm is finite and not 0 are decoded without the row-by-row
    fold (a watch window's read); the fold, on the same rows and streaks, is the oracle."""
    torch.manual_seed(0)
    named = [[("a", torch.nn.Parameter(torch.ones(3))), ("b", torch.nn.Parameter(torch.ones(2)))]]
    fast, slow = GradSanityMonitor(named, patience=2), GradSanityMonitor(named, patience=2)
    for monitor in (fast, slow):
        monitor.restore_streaks([(0, "b", 1)])  # carried from an earlier read
        monitor.mark_gap()
    rows = [_Row(0, step, True, False, after_gap=step == 5) for step in (5, 6, 7)]
    host = torch.rand(3 * 2) + 0.1
    got = fast.decode(host, rows)
    expected = slow._fold(host, rows)
    assert got == expected
    assert fast.groups[0].streak.tolist() == slow.groups[0].streak.tolist() == [0, 0]
    # With one zero the fold runs (and a streak shows).
    host[-1] = 0.0
    assert fast.decode(host, rows)[0].without_grad == 1

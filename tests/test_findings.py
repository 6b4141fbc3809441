"""Findings gathered from several ranks: one finding per key, told by its earliest sighting."""

from __future__ import annotations

from grad_callbacks.findings import Finding, FindingLog


def _finding(step: int, rank_norm: float) -> Finding:
    return Finding(
        code="nonfinite-grad",
        severity="error",
        check="GradientSanityCheck",
        step=step,
        message=f"non-finite gradient at step {step} (norm {rank_norm})",
        params=("layer.weight",),
        data={"norm": rank_norm},
    )


def test_merge_keeps_the_earliest_sighting_whole() -> None:
    log = FindingLog()
    log.merge(_finding(step=9, rank_norm=1.0), rank=0)
    log.merge(_finding(step=4, rank_norm=2.0), rank=1)
    (merged,) = log.findings
    # step, message and numbers all come from rank 1, which saw it first
    assert merged.step == 4
    assert merged.message == "non-finite gradient at step 4 (norm 2.0)"
    assert merged.data == {"norm": 2.0, "ranks": [0, 1]}
    assert merged.count == 2


def test_merge_keeps_the_first_when_it_is_earliest() -> None:
    log = FindingLog()
    log.merge(_finding(step=4, rank_norm=1.0), rank=0)
    log.merge(_finding(step=9, rank_norm=2.0), rank=1)
    (merged,) = log.findings
    assert (merged.step, merged.data["norm"], merged.data["ranks"]) == (4, 1.0, [0, 1])

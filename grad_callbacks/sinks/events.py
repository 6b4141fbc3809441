"""Read the audit's scalars back from a run's TensorBoard event files.

Uses TensorBoard's own reader, so whatever TensorBoard shows is what the plots show.

Example:
    >>> scalars = read_audit_scalars("lightning_logs/version_0")  # doctest: +SKIP
    >>> scalars["grad_audit/zero_grad/uncleared_params"][:2]  # doctest: +SKIP
    [(1, 0.0), (2, 4.0)]
"""

from __future__ import annotations

import os
from pathlib import Path

#: The tag prefix of every scalar the suite writes.
AUDIT_PREFIX = "grad_audit/"


def event_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The TensorBoard event files directly inside ``run_dir`` (sorted; none when missing)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and "tfevents" in p.name)


def read_audit_scalars(
    run_dir: str | os.PathLike[str], prefix: str = AUDIT_PREFIX
) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``prefix`` in the event files of ``run_dir``.

    Reads all event files of the directory (a resumed run writes several) with
    ``tensorboard.backend.event_processing.event_accumulator.EventAccumulator``, keeping every
    point (no down-sampling).

    Args:
        run_dir: a run's log directory (where the ``events.out.tfevents.*`` files are).
        prefix: keep only the tags that start with this.

    Returns:
        tag -> ``[(step, value), ...]`` sorted by step, tags sorted; ``{}`` when the directory
        holds no event file or no such scalar.
    """
    if not event_files(run_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in sorted(acc.Tags().get(SCALARS, [])):
        if tag.startswith(prefix):
            points = sorted(
                ((int(e.step), float(e.value)) for e in acc.Scalars(tag)), key=lambda p: p[0]
            )
            if points:
                out[tag] = points
    return out

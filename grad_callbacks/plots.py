"""Plots of a run's audit metrics, with its findings marked.

matplotlib is imported lazily and drawn on an Agg canvas without pyplot: no display is needed and
the user's pyplot backend is left alone.

Example:
    >>> from grad_callbacks.sinks.events import read_audit_scalars
    >>> scalars = read_audit_scalars("lightning_logs/version_0")  # doctest: +SKIP
    >>> plot_run(scalars, findings, "audit.png")  # doctest: +SKIP
    PosixPath('audit.png')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grad_callbacks.findings import SEVERITY_RANK, Finding

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Severities that get a vertical marker (info findings are not alarms).
MARKED_SEVERITIES = ("warning", "error")
_COLORS = {"error": "tab:red", "warning": "tab:orange"}
_AUDIT_PREFIX = "grad_audit/"
#: Panels stacked in one column before another column is started.
PANELS_PER_COLUMN = 8
#: The most columns of panels in one figure.
MAX_COLUMNS = 4


@dataclass(frozen=True)
class Marker:
    """A vertical line on every subplot: the first step of one or more findings.

    Attributes:
        step: the global step of the line.
        codes: the finding codes first seen at that step (sorted).
        severity: the worst severity among them.
    """

    step: int
    codes: tuple[str, ...]
    severity: str

    @property
    def label(self) -> str:
        """The text shown next to the line."""
        return ", ".join(self.codes)


def draw_marker(ax: Axes, marker: Marker, *, annotate: bool, legend: bool = False) -> None:
    """Draw ``marker`` on ``ax``: a dashed vertical line in its severity's colour, with its codes
    written along it when ``annotate``, and a legend entry when ``legend``."""
    color = _COLORS[marker.severity]
    label = f"{marker.label} @ step {marker.step}" if legend else None
    ax.axvline(marker.step, color=color, linestyle="--", linewidth=1.0, label=label)
    if annotate:
        ax.annotate(
            marker.label,
            xy=(marker.step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=7,
            color=color,
        )


def _draw_single(ax: Axes, step: int, value: float) -> None:
    """A series with one point (a check that ran once): a marker, labelled with its step."""
    ax.plot([step], [value], marker="o", linestyle="none", color="tab:blue")
    ax.annotate(
        f"ran once: step {step}, {value:.4g}",
        xy=(step, value),
        xytext=(6, 0),
        textcoords="offset points",
        va="center",
        fontsize=7,
    )


def finding_markers(findings: Iterable[Finding]) -> list[Marker]:
    """One :class:`Marker` per step at which a warning or error finding was first seen.

    Example:
        >>> from grad_callbacks.findings import make_finding
        >>> f = make_finding("stale-grad", check="ZeroGradCheck", step=3, message="m")
        >>> finding_markers([f])
        [Marker(step=3, codes=('stale-grad',), severity='warning')]
    """
    by_step: dict[int, list[Finding]] = {}
    for f in findings:
        if f.severity in MARKED_SEVERITIES:
            by_step.setdefault(f.step, []).append(f)
    markers = []
    for step in sorted(by_step):
        group = by_step[step]
        worst = max(group, key=lambda f: SEVERITY_RANK[f.severity]).severity
        markers.append(Marker(step, tuple(sorted({f.code for f in group})), worst))
    return markers


def build_figure(
    scalars: Mapping[str, Sequence[tuple[int, float]]],
    findings: Iterable[Finding],
    title: str | None = None,
    max_panels: int = 64,
) -> Figure:
    """A figure with one subplot per scalar tag (steps on x) and the findings marked.

    A series with a single point (a check that ran once) is drawn as a marker labelled with its
    step. Each warning or error finding gets a dashed vertical line at its first step on every
    subplot, labelled with its code on the top subplot of each column and in the legend. Up to
    :data:`PANELS_PER_COLUMN` panels go in one column, then more columns are added (at most
    :data:`MAX_COLUMNS`).

    Args:
        scalars: tag -> ``[(step, value), ...]`` (see
            :func:`grad_callbacks.sinks.events.read_audit_scalars`).
        findings: the run's findings.
        title: the figure's title.
        max_panels: plot at most this many tags (sorted by name); the title says how many
            were left out.

    Raises:
        ValueError: when ``scalars`` is empty.
    """
    if not scalars:
        raise ValueError("no scalars to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    all_tags = sorted(scalars)
    tags = all_tags[:max_panels]
    markers = finding_markers(findings)
    ncols = min(MAX_COLUMNS, -(-len(tags) // PANELS_PER_COLUMN))
    nrows = -(-len(tags) // ncols)
    fig = Figure(figsize=(4.5 + 4.5 * ncols, 1.9 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    grid = fig.subplots(nrows, ncols, sharex=True, squeeze=False)
    # Column-major: tags read top to bottom, then left to right.
    axes = [grid[r, c] for c in range(ncols) for r in range(nrows)]
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    for i, (ax, tag) in enumerate(zip(axes, tags, strict=False)):
        points = scalars[tag]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        if len(points) == 1:
            _draw_single(ax, steps[0], values[0])
        else:
            ax.plot(steps, values, marker="." if len(points) < 50 else None, lw=1.2)
        ax.set_title(tag.removeprefix(_AUDIT_PREFIX), fontsize=8, loc="left")
        ax.grid(alpha=0.3)
        for m in markers:
            draw_marker(ax, m, annotate=i % nrows == 0, legend=True)
    # Steps are integers; a run whose every point sits at one step gets a readable axis
    # around it instead of matplotlib's +-1e-17 one.
    first = min(s for tag in tags for s, _ in scalars[tag])
    last = max(s for tag in tags for s, _ in scalars[tag])
    grid[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if first == last:
        grid[0, 0].set_xlim(first - 1, last + 1)
    for c in range(ncols):
        grid[nrows - 1, c].set_xlabel("global step")
        grid[nrows - 1, c].xaxis.set_tick_params(labelbottom=True)
    if markers:
        handles = [
            Line2D([], [], color=_COLORS[m.severity], linestyle="--", label=f"{m.label} @ {m.step}")
            for m in markers
        ]
        top_right = grid[0, ncols - 1]
        top_right.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if len(all_tags) > len(tags):
        left_out = f"{len(all_tags) - len(tags)} more tags not shown"
        title = f"{title} ({left_out})" if title else left_out
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_run(
    scalars: Mapping[str, Sequence[tuple[int, float]]],
    findings: Iterable[Finding],
    out_path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write a PNG of a run's audit scalars with its warning/error findings marked.

    The PNG's ``Description`` text records the markers drawn (``code@step`` entries), so a
    script can check them without looking at the picture.

    Args:
        scalars: tag -> ``[(step, value), ...]``.
        findings: the run's findings; warnings and errors are marked at their first step.
        out_path: the PNG to write (parent directories are created).
        title: the figure's title.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when ``scalars`` is empty.
    """
    findings = list(findings)
    fig = build_figure(scalars, findings, title=title)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    marks = " ".join(f"{c}@{m.step}" for m in finding_markers(findings) for c in m.codes)
    fig.savefig(
        path,
        format="png",
        dpi=100,
        metadata={"Title": title or "grad_audit", "Description": f"markers: {marks}".strip()},
    )
    return path

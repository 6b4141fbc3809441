"""Figures of the TensorBoard guide (docs/tensorboard.md), drawn from a real run.

Trains three small runs on CPU into one TensorBoard log directory, each with
:class:`~grad_callbacks.GradientAudit` and a ``TensorBoardLogger`` attached:

* ``forgets_zero_grad``: the regressor of ``grad-audit demo`` in manual optimization, without
  ``opt.zero_grad()`` (the planted bug: ``missing-zero-grad``);
* ``summed_loss``: the same network in automatic optimization with ``reduction="sum"`` (a second
  planted bug: ``reduction-sum``);
* ``fixed``: the demo's regressor with ``opt.zero_grad()`` and a mean loss.

Then it reads the event files back with TensorBoard's own reader (``EventAccumulator``: the
scalars, the custom-scalars layout, the findings text and the histograms) and draws PNGs with
matplotlib (an Agg canvas, no pyplot). No browser is involved: these are matplotlib renderings of
the data TensorBoard would show, grouped the way its tabs group them. The last figure is what
``grad-audit report RUN --plot DIR`` writes for the broken run.

The runs are seeded and deterministic on CPU (one intra-op thread, no overhead budget, so every
check runs at fixed steps): regenerating the figures on the same versions gives the same images.

Usage::

    python docs/make_figures.py                   # writes docs/img/tensorboard/*.png
    python docs/make_figures.py --out /tmp/img    # writes /tmp/img/tensorboard/*.png
    python docs/make_figures.py --log-dir runs    # keep the runs: tensorboard --logdir runs
    python docs/make_figures.py --quick           # one epoch per run (what the test uses)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Draw with this checkout's package, whatever else is installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from grad_callbacks import (  # noqa: E402
    AutogradCheck,
    BatchMixingCheck,
    Finding,
    GradientAudit,
    GradientMonitor,
    GradientSanityCheck,
    PerSampleGradientCheck,
    ZeroGradCheck,
)
from grad_callbacks.demo import RUNS, ManualRegressor  # noqa: E402
from grad_callbacks.plots import draw_marker, finding_markers  # noqa: E402
from grad_callbacks.sinks.events import read_audit_scalars  # noqa: E402
from grad_callbacks.sinks.report import find_reports, load_report  # noqa: E402
from grad_callbacks.sinks.tensorboard import FINDINGS_TAG, LAYOUT_TITLE  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Where the figures go, relative to ``--out``: the page links ``img/tensorboard/<name>.png``.
SUBDIR = "tensorboard"
DEFAULT_OUT = ROOT / "docs" / "img"

#: The runs (trained in this order) and their line colours in the figures.
RUN_COLORS = {
    "forgets_zero_grad": "tab:red",
    "summed_loss": "tab:purple",
    "fixed": "tab:blue",
}
BROKEN = "forgets_zero_grad"
#: Schedules of the figure run (denser than the defaults, so a short run has points to draw).
PER_SAMPLE_EVERY = 10
MONITOR_EVERY = 5
LOG_EVERY = 5
SEED = 0
#: The tag of the custom-scalars layout (what ``SummaryWriter.add_custom_scalars`` writes).
LAYOUT_TAG = "custom_scalars__config__"
#: Percentiles of TensorBoard's Distributions tab, in basis points.
_BANDS = ((0, 10000), (668, 9332), (1587, 8413), (3085, 6915))
DPI = 100


# ---------------------------------------------------------------------------- the runs
class SummedRegressor(ManualRegressor):
    """The demo's regressor in automatic optimization, its loss summed over the batch."""

    def __init__(self) -> None:
        super().__init__(forget_zero_grad=False)
        self.automatic_optimization = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y, reduction="sum")  # the planted bug
        self.log("train_loss", loss)
        return loss


def _build(name: str) -> tuple[L.LightningModule, Any]:
    """The module and data of a run; every run starts from the same weights (seed :data:`SEED`)."""
    demo = {run.name: run for run in RUNS}
    module, data = demo["manual_forgets_zero_grad" if name == BROKEN else "manual_fixed"].build()
    if name == "summed_loss":
        torch.manual_seed(SEED)  # the demo's build drew the fixed run's weights: draw them again
        module = SummedRegressor()
    return module, data


def make_audit() -> GradientAudit:
    """Every check, with denser schedules than the defaults and no overhead budget.

    Without a budget the per-sample check runs at fixed steps (with one, how far apart its runs
    are depends on how long they take), so the figures are reproducible; the price is no
    ``grad_audit/audit/overhead`` scalar.
    """
    return GradientAudit(
        checks=[
            ZeroGradCheck,
            PerSampleGradientCheck(every_n_steps=PER_SAMPLE_EVERY, on_finding="log"),
            BatchMixingCheck,
            GradientSanityCheck,
            AutogradCheck,
            GradientMonitor(every_n_steps=MONITOR_EVERY, on_finding="log"),
        ],
        on_finding="log",
        max_overhead=None,
    )


@contextlib.contextmanager
def _quiet_and_seeded(seed: int = SEED) -> Iterator[None]:
    """Seed torch, use one intra-op thread, silence Lightning; restore all of it afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    threads = torch.get_num_threads()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def train(log_dir: Path, epochs: int) -> dict[str, Path]:
    """Train every run into ``log_dir/<run>``; returns run name -> its log directory.

    Raises:
        FileExistsError: when ``log_dir/<run>`` exists already.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    dirs = {}
    for name in RUN_COLORS:
        if (log_dir / name).exists():
            # A second run would add its event files to the first's, and the figures mix both.
            raise FileExistsError(f"{log_dir / name} exists: remove it or pick another log dir")
        with _quiet_and_seeded():
            module, data = _build(name)
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                devices=1,
                logger=TensorBoardLogger(log_dir, name=name, version=""),
                callbacks=[make_audit()],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=LOG_EVERY,
            )
            trainer.fit(module, data)
        dirs[name] = log_dir / name
    return dirs


# ---------------------------------------------------------------------------- reading back
@dataclass
class RunData:
    """What TensorBoard shows of one run, as read by its ``EventAccumulator``.

    Attributes:
        name: the run's name (its directory under the log directory).
        scalars: ``grad_audit/`` tag -> ``[(step, value), ...]``.
        layout: the custom-scalars charts of the "Gradient audit" category: title -> regexes.
        findings_text: the latest markdown table at ``grad_audit/findings``.
        histograms: tag -> ``[(step, bucket left edges, right edges, counts), ...]``.
        distributions: tag -> ``[(step, {basis point: value}), ...]`` (the Distributions tab).
        findings: the findings of the run's ``grad_audit.json``.
        tags: every tag of the run by TensorBoard's kind (``scalars``, ``histograms``, ...).
    """

    name: str
    scalars: dict[str, list[tuple[int, float]]]
    layout: dict[str, list[str]]
    findings_text: str
    histograms: dict[str, list[tuple[int, list[float], list[float], list[float]]]]
    distributions: dict[str, list[tuple[int, dict[int, float]]]]
    findings: list[Finding] = field(default_factory=list)
    tags: dict[str, list[str]] = field(default_factory=dict)


def read_run(run_dir: Path) -> RunData:
    """Read a run's event files and report file back."""
    from tensorboard.backend.event_processing.event_accumulator import (
        COMPRESSED_HISTOGRAMS,
        HISTOGRAMS,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )
    from tensorboard.plugins.custom_scalar import layout_pb2

    guidance = {SCALARS: 0, TENSORS: 0, HISTOGRAMS: 0, COMPRESSED_HISTOGRAMS: 0}
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)
    acc.Reload()
    kinds = acc.Tags()

    layout: dict[str, list[str]] = {}
    if LAYOUT_TAG in kinds.get(TENSORS, []):
        proto = layout_pb2.Layout()
        proto.ParseFromString(acc.Tensors(LAYOUT_TAG)[-1].tensor_proto.string_val[0])
        for category in proto.category:
            if category.title == LAYOUT_TITLE:
                layout = {c.title: list(c.multiline.tag) for c in category.chart}
    text = ""
    if FINDINGS_TAG in kinds.get(TENSORS, []):
        text = acc.Tensors(FINDINGS_TAG)[-1].tensor_proto.string_val[0].decode("utf-8")

    histograms: dict[str, list[tuple[int, list[float], list[float], list[float]]]] = {}
    distributions: dict[str, list[tuple[int, dict[int, float]]]] = {}
    for tag in kinds.get(HISTOGRAMS, []):
        series = []
        for event in acc.Histograms(tag):
            h = event.histogram_value
            right = list(h.bucket_limit)
            left = [h.min, *right[:-1]]
            series.append((int(event.step), left, right, list(h.bucket)))
        histograms[tag] = series
        distributions[tag] = [
            (int(e.step), {int(bp): float(value) for bp, value in e.compressed_histogram_values})
            for e in acc.CompressedHistograms(tag)
        ]
    reports = find_reports(run_dir)
    findings = (
        [Finding.from_dict(f) for f in load_report(reports[0])["findings"]] if reports else []
    )
    tags = {kind: sorted(v) for kind, v in kinds.items() if isinstance(v, list) and v}
    return RunData(
        name=run_dir.name,
        scalars=read_audit_scalars(run_dir),
        layout=layout,
        findings_text=text,
        histograms=histograms,
        distributions=distributions,
        findings=findings,
        tags=tags,
    )


# ---------------------------------------------------------------------------- drawing
def _figure(
    width: float,
    height: float,
    *,
    left: float = 0.55,
    right: float = 0.2,
    top: float = 0.7,
    bottom: float = 0.5,
    wspace: float = 0.22,
    hspace: float = 0.5,
) -> Figure:
    """A figure on an Agg canvas (no pyplot), margins in inches.

    Fixed margins rather than a layout engine: constrained layout would triple the drawing
    time of these many-panel figures.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global state
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=wspace,
        hspace=hspace,
    )
    return fig


def _save(fig: Figure, path: Path, title: str) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Title": title})
    return write_png(buffer.getvalue(), path)


def write_png(data: bytes, path: Path) -> Path:
    """Write PNG ``data`` to ``path`` with a 256-colour palette (a third of the size, or less).

    Line plots on a white background lose nothing visible; the PNG's text chunks (title,
    ``grad-audit report --plot``'s list of markers) are kept.
    """
    from PIL import Image, PngImagePlugin

    with Image.open(io.BytesIO(data)) as image:
        info = PngImagePlugin.PngInfo()
        for key, value in image.text.items():
            info.add_text(key, value)
        palette = image.convert("RGB").quantize(colors=256)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette.save(path, format="PNG", pnginfo=info)
    return path


def _style(ax: Axes, title: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def _mark_findings(ax: Axes, findings: Sequence[Finding], label: bool) -> None:
    """The dashed lines of ``grad-audit report --plot``: warning and error findings."""
    for m in finding_markers(findings):
        draw_marker(ax, m, annotate=label)


def draw_custom_scalars(run: RunData, path: Path) -> Path:
    """The "Gradient audit" layout of one run: one multiline chart per chart of the layout.

    Every tag that one of a chart's regexes matches (``re.match``, as TensorBoard's
    custom-scalars plugin matches them) is a line of the chart: the Custom Scalars tab with that
    one run selected. Warning and error findings are marked as ``grad-audit report --plot``
    marks them (TensorBoard draws no such lines).
    """
    charts = [
        (title, [t for t in run.scalars if any(re.match(rx, t) for rx in regexes)])
        for title, regexes in run.layout.items()
    ]
    charts = [(title, tags) for title, tags in charts if tags]
    last_step = max(step for points in run.scalars.values() for step, _ in points)
    ncols = 3
    nrows = -(-len(charts) // ncols)
    fig = _figure(14, 3.0 * nrows + 0.6, hspace=0.35)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(charts) :]:
        ax.set_visible(False)
    for ax, (title, tags) in zip(axes, charts, strict=False):
        prefix = _common_prefix(tags)
        for tag in tags:
            steps, values = zip(*run.scalars[tag], strict=True)
            ax.plot(steps, values, marker=".", lw=1.2, label=tag.removeprefix(prefix))
        _mark_findings(ax, run.findings, label=True)
        _style(ax, title)
        ax.set_xlim(-0.03 * last_step, 1.03 * last_step)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6.5, loc="best", title=prefix, title_fontsize=6.5)
    fig.suptitle(f'Custom Scalars, "{LAYOUT_TITLE}" layout: run {run.name}', fontsize=11)
    return _save(fig, path, "custom scalars")


def _common_prefix(tags: Sequence[str]) -> str:
    """The longest ``/``-ended prefix of every tag (the legend's title)."""
    head = tags[0].rsplit("/", 1)[0] + "/"
    while not all(t.startswith(head) for t in tags):
        head = head[:-1].rsplit("/", 1)[0] + "/"
    return head


#: Reference lines of the comparison panels: tag -> [(y, label), ...], and y-axis limits.
REFERENCE_LINES: dict[str, list[tuple[float, str]]] = {
    "grad_audit/per_sample/scale": [(1.0, "mean: c = 1"), (32.0, "sum: c = n = 32")],
    "grad_audit/per_sample/residual": [(1e-3, "batch-coupling above 1e-3 (float32)")],
    "grad_audit/per_sample/cosine": [(1.0, "aligned")],
    "grad_audit/per_sample/optimizer_grad_error": [(1e-4, "grad-mismatch above 1e-4")],
    "grad_audit/per_sample/noise_scale": [(32.0, "n = 32: levels off here")],
}
Y_LIMITS: dict[str, tuple[float, float]] = {
    "grad_audit/per_sample/scale": (0.0, 36.0),
    "grad_audit/per_sample/residual": (0.0, 1.5e-3),
    "grad_audit/per_sample/cosine": (0.0, 1.1),
    "grad_audit/per_sample/optimizer_grad_error": (0.0, 1.5e-4),
}


def draw_comparison(
    runs: Sequence[RunData],
    tags: Sequence[str],
    path: Path,
    title: str,
    ncols: int,
    log_tags: Sequence[str] = (),
) -> Path:
    """One panel per tag, one line per run (the Scalars tab with several runs selected).

    Panels get the dashed reference lines of :data:`REFERENCE_LINES` (thresholds and expected
    values from the checks' documentation) and the y limits of :data:`Y_LIMITS`.
    """
    nrows = -(-len(tags) // ncols)
    fig = _figure(3.6 * ncols + 1.8, 2.3 * nrows + 0.7, right=1.8, hspace=0.3)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    for ax, tag in zip(axes, tags, strict=False):
        for run in runs:
            if tag in run.scalars:
                steps, values = zip(*run.scalars[tag], strict=True)
                ax.plot(steps, values, color=RUN_COLORS[run.name], marker=".", lw=1.2)
        for y, label in REFERENCE_LINES.get(tag, []):
            ax.axhline(y, color="0.45", linestyle="--", linewidth=0.8)
            ax.annotate(
                label,
                xy=(0.01, y),
                xycoords=("axes fraction", "data"),
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=6.5,
                color="0.3",
            )
        if tag in log_tags:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        if tag in Y_LIMITS:
            ax.set_ylim(*Y_LIMITS[tag])
        _style(ax, tag)
    for c in range(ncols):  # step labels under the lowest panel of each column
        lowest = [grid[r, c] for r in range(nrows) if grid[r, c].get_visible()][-1]
        lowest.set_xlabel("step", fontsize=8)
        lowest.xaxis.set_tick_params(labelbottom=True)
    _run_legend(fig, runs)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path, title)


def _run_legend(fig: Figure, runs: Sequence[RunData]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=RUN_COLORS[r.name], marker=".", lw=1.2, label=r.name) for r in runs
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8, title="run")


def _markdown_rows(text: str) -> list[list[str]]:
    """The cells of a markdown table (header first), without the code marks."""
    return [
        [cell.strip().replace("\\|", "|").strip("`") for cell in line.strip("|").split(" | ")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def draw_findings_text(runs: Sequence[RunData], path: Path) -> Path:
    """The Text tab: the markdown table at ``grad_audit/findings`` of each run, as a table.

    TensorBoard renders the markdown as an HTML table, one card per run; here each run's table
    is a matplotlib table, long cells wrapped.
    """
    widths = [8, 18, 22, 6, 6, 26, 90]  # characters per column (severity ... message)
    line_h, title_h, gap, width = 0.16, 0.3, 0.25, 14.0
    blocks = []
    for run in runs:
        rows = [
            [textwrap.fill(cell, width=w) for cell, w in zip(row, widths, strict=False)]
            for row in _markdown_rows(run.findings_text)
        ]
        lines = [max(c.count("\n") + 1 for c in row) + 1 for row in rows]  # +1: padding
        blocks.append((run, rows, lines, line_h * max(sum(lines), 2)))
    height = 0.6 + sum(title_h + h + gap for *_, h in blocks)
    fig = _figure(width, height)
    fig.suptitle(f"Text tab: {FINDINGS_TAG} at the last step of each run", fontsize=11)
    y = height - 0.6  # inches from the bottom, going down
    for run, rows, lines, table_h in blocks:
        fig.text(
            0.1 / width,
            (y - title_h / 2) / height,
            f"{FINDINGS_TAG}   run {run.name}",
            fontsize=9,
            va="center",
            color=RUN_COLORS[run.name],
        )
        y -= title_h + table_h
        ax = fig.add_axes((0.1 / width, y / height, 1 - 0.2 / width, table_h / height))
        ax.set_axis_off()
        y -= gap
        if not rows:
            ax.text(0.0, 0.5, run.findings_text or "(no text)", fontsize=8, va="center")
            continue
        table = ax.table(
            cellText=rows[1:],
            colLabels=rows[0],
            colWidths=[w / sum(widths) for w in widths],
            cellLoc="left",
            bbox=(0, 0, 1, 1),
        )
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for (r, c), cell in table.get_celld().items():
            cell.PAD = 0.7 / widths[c]  # a character or so (PAD is a share of the cell's width)
            cell.set_height(lines[r] / sum(lines))
            cell.set_edgecolor("0.8")
            if r == 0:
                cell.set_text_props(weight="bold")
                cell.set_facecolor("0.94")
    return _save(fig, path, "findings text")


def _tint(color: str, amount: float) -> tuple[float, float, float]:
    """``color`` mixed with white: 0 is white, 1 the colour itself (opaque, no alpha seams)."""
    from matplotlib.colors import to_rgb

    return tuple(1 - amount * (1 - c) for c in to_rgb(color))  # type: ignore[return-value]


def draw_histograms(runs: Sequence[RunData], tag: str, path: Path) -> Path:
    """Distributions (percentile bands over steps) and Histograms (one curve per step).

    The Distributions panels draw what TensorBoard's reader computes for that tab (the
    compressed histograms: min, 6.7%, 15.9%, 30.9%, median, ... max). In the Histograms panels
    each step's curve is the bucket counts over bucket width, scaled to its own peak, later
    steps lower (TensorBoard's "offset" mode).
    """
    fig = _figure(12, 3.0 * len(runs) + 0.7, left=0.7, wspace=0.18, hspace=0.45)
    grid = fig.subplots(len(runs), 2, squeeze=False)
    for (dist_ax, hist_ax), run in zip(grid, runs, strict=True):
        color = RUN_COLORS[run.name]
        dist = run.distributions.get(tag, [])
        steps = [s for s, _ in dist]
        for i, (lo, hi) in enumerate(_BANDS):
            dist_ax.fill_between(
                steps,
                [v[lo] for _, v in dist],
                [v[hi] for _, v in dist],
                color=_tint(color, 0.18 + 0.2 * i),
                lw=0,
            )
        dist_ax.plot(steps, [v[5000] for _, v in dist], color=color, lw=1.0)
        _style(dist_ax, f"Distributions: {tag}  (run {run.name})")
        dist_ax.set_xlabel("step", fontsize=8)
        dist_ax.set_ylabel("gradient value", fontsize=8)

        series = run.histograms.get(tag, [])
        spacing = (series[-1][0] - series[0][0]) / max(len(series) - 1, 1) or 1.0
        for k, (step, left, right, counts) in enumerate(series):
            centers = [(a + b) / 2 for a, b in zip(left, right, strict=True)]
            density = [c / max(b - a, 1e-30) for a, b, c in zip(left, right, counts, strict=True)]
            peak = max(density) or 1.0
            top = [step - 2.0 * spacing * d / peak for d in density]
            hist_ax.fill_between(centers, step, top, color=_tint(color, 0.12), lw=0, zorder=k)
            hist_ax.plot(
                centers,
                top,
                color=_tint(color, 0.35 + 0.65 * (k + 1) / len(series)),
                lw=0.8,
                zorder=k,
            )
        hist_ax.invert_yaxis()
        _style(hist_ax, f"Histograms (offset): {tag}  (run {run.name})")
        hist_ax.set_xlabel("gradient value", fontsize=8)
        hist_ax.set_ylabel("step", fontsize=8)
    fig.suptitle("GradientMonitor histograms (first layer)", fontsize=11)
    return _save(fig, path, "histograms")


def draw_report_plot(run_dir: Path, path: Path) -> Path:
    """What ``grad-audit report LOGS --plot DIR`` writes for the run at ``run_dir``.

    The run is copied alone into ``lightning_logs/`` of a temporary working directory, so that
    the command plots only it, named and titled after its path there
    (``lightning_logs/<name>``, as for ``grad-audit report lightning_logs``).
    """
    from grad_callbacks.cli import main as cli_main

    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.chdir(tmp),
    ):
        shutil.copytree(run_dir, Path("lightning_logs") / run_dir.name)
        code = cli_main(["report", "lightning_logs", "--plot", "plots"])
        if code != 0:
            raise RuntimeError(f"grad-audit report exited {code}")
        png = Path("plots") / f"lightning_logs_{run_dir.name}.png"
        return write_png(png.read_bytes(), path)


# ---------------------------------------------------------------------------- the whole thing
@dataclass
class Result:
    """What :func:`generate` made.

    Attributes:
        images: the PNGs written.
        tags: every tag the runs wrote, by TensorBoard's kind (``scalars``, ``histograms``,
            ``distributions``, ``tensors``), over all runs.
        seconds: wall time of the training and of the drawing.
    """

    images: list[Path]
    tags: dict[str, list[str]]
    seconds: dict[str, float]


PER_SAMPLE_TAGS = [
    f"grad_audit/per_sample/{m}"
    for m in (
        "scale",
        "residual",
        "cosine",
        "optimizer_grad_error",
        "noise_scale",
        "norm_median",
        "norm_p90",
        "norm_max",
        "samples",
    )
]
MONITOR_TAGS = [
    f"grad_audit/monitor/{m}"
    for m in (
        "grad_norm/total",
        "grad_norm/net.0",
        "grad_norm/net.2",
        "update_ratio/net.0",
        "update_ratio/net.2",
    )
]
HIST_TAG = "grad_audit/monitor/grad_hist/net.0"


def generate(out: Path, quick: bool = False, log_dir: Path | None = None) -> Result:
    """Train the runs and write every figure into ``out/tensorboard/``.

    Args:
        out: the image root (``docs/img``); the PNGs go to ``out/tensorboard/``.
        quick: one epoch per run (16 steps) instead of five (80 steps).
        log_dir: keep the runs' log directory here (default: a temporary one, removed).
    """
    target = out / SUBDIR
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grad_fig_")))
        started = time.perf_counter()
        dirs = train(log_dir, epochs=1 if quick else 5)
        trained = time.perf_counter()
        runs = {name: read_run(d) for name, d in dirs.items()}
        broken, summed, fixed = runs[BROKEN], runs["summed_loss"], runs["fixed"]
        images = [
            draw_custom_scalars(broken, target / "custom-scalars.png"),
            draw_comparison(
                [summed, fixed],
                PER_SAMPLE_TAGS,
                target / "per-sample.png",
                "PerSampleGradientCheck: summed_loss against fixed",
                ncols=3,
            ),
            draw_comparison(
                [broken, summed, fixed],
                MONITOR_TAGS,
                target / "monitor.png",
                "GradientMonitor: gradient norms and update/weight ratios (log scale)",
                ncols=3,
                log_tags=MONITOR_TAGS,
            ),
            draw_findings_text([broken, summed, fixed], target / "findings-text.png"),
            draw_histograms([broken, fixed], HIST_TAG, target / "histograms.png"),
            draw_report_plot(dirs[BROKEN], target / "report-plot.png"),
        ]
        drawn = time.perf_counter()
        tags: dict[str, set[str]] = {}
        for run in runs.values():
            for kind, names in run.tags.items():
                tags.setdefault(kind, set()).update(names)
    return Result(
        images=images,
        tags={kind: sorted(names) for kind, names in sorted(tags.items())},
        seconds={"train": trained - started, "draw": drawn - trained},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python docs/make_figures.py [--out DIR] [--quick] [--log-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"image root; PNGs go to OUT/{SUBDIR}/ (default: docs/img)",
    )
    parser.add_argument("--quick", action="store_true", help="one epoch per run")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the runs here (default: a temporary directory)",
    )
    parser.add_argument("--list-tags", action="store_true", help="print every tag written")
    args = parser.parse_args(argv)
    result = generate(args.out, quick=args.quick, log_dir=args.log_dir)
    for image in result.images:
        print(f"wrote {image} ({image.stat().st_size // 1024} KiB)")
    if args.list_tags:
        for kind, names in result.tags.items():
            print(f"{kind}:")
            print("".join(f"  {name}\n" for name in names), end="")
    timing: Mapping[str, float] = result.seconds
    print(f"trained in {timing['train']:.1f} s, drew in {timing['draw']:.1f} s")
    if args.log_dir is not None:
        print(f"open the runs: tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures of the TensorBoard guide (docs/tensorboard.md), drawn from a real run.

Trains three small runs on CPU into one TensorBoard log directory, each with
:class:`~grad_callbacks.GradientAudit` and a ``TensorBoardLogger`` attached:

* ``forgets_zero_grad``: the regressor of ``grad-audit demo`` in manual optimization, without
  ``opt.zero_grad()`` (the planted bug: ``missing-zero-grad``);
* ``summed_loss``: the same network in automatic optimization with ``reduction="sum"`` (a second
  planted bug: ``reduction-sum``);
* ``fixed``: the demo's regressor with ``opt.zero_grad()`` and a mean loss.

Then it reads the event files back with TensorBoard's own reader (``EventAccumulator``: the tags
each run wrote, which the tests compare with the tags table of docs/reports.md) and writes what
``grad-audit report RUN --plot DIR`` draws for the broken run. The pictures of TensorBoard itself
are screenshots of a real browser: ``docs/make_screenshots.py`` trains the same runs (with
:func:`train`), serves them with ``tensorboard`` on 127.0.0.1 and shoots them with headless
Chromium.

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
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from grad_callbacks.sinks.events import read_audit_scalars  # noqa: E402
from grad_callbacks.sinks.report import find_reports, load_report  # noqa: E402
from grad_callbacks.sinks.tensorboard import FINDINGS_TAG, LAYOUT_TITLE  # noqa: E402

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
        images = [draw_report_plot(dirs[BROKEN], target / "report-plot.png")]
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

"""Screenshots of TensorBoard showing the audit, for docs/tensorboard.md, from a real browser.

Trains the runs of ``docs/make_figures.py`` (``forgets_zero_grad``, ``summed_loss``, ``fixed``:
80 steps each, GradientAudit with dense schedules), then for each screenshot copies the runs it
shows into a fresh log directory, serves it with ``tensorboard`` on 127.0.0.1 (never another
interface), waits until TensorBoard's HTTP data API serves the runs' scalars and findings text,
and takes the picture with headless Chromium (``chromium --headless --screenshot``). The PNGs are
re-encoded with a 256-colour palette to keep the repository small.

Needs ``tensorboard`` and a ``chromium`` (or ``chromium-browser``, ``google-chrome``) binary on
the PATH; on Debian: ``apt-get install chromium``.

Usage::

    python docs/make_screenshots.py                  # writes docs/img/tensorboard/*.png
    python docs/make_screenshots.py --out /tmp/img   # writes /tmp/img/tensorboard/*.png
    python docs/make_screenshots.py --log-dir runs   # reuse (or keep) the trained runs
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(DOCS.parent))

import make_figures  # noqa: E402

from tests.tensorboard_server import HOST, get_json, tensorboard_server  # noqa: E402

READY_TIMEOUT_S = 90.0
#: Virtual time Chromium gives the page's scripts to load the data and draw the charts.
RENDER_BUDGET_MS = 20000
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@dataclass(frozen=True)
class Shot:
    """One screenshot: the runs shown, the TensorBoard page (URL fragment) and the window."""

    name: str
    runs: tuple[str, ...]
    fragment: str
    width: int = 1400
    height: int = 1000


SHOTS = (
    Shot("custom-scalars", ("forgets_zero_grad",), "#custom_scalars", height=1250),
    Shot("per-sample", ("summed_loss", "fixed"), "#scalars&tagFilter=per_sample", height=1500),
    Shot(
        "monitor",
        ("forgets_zero_grad", "summed_loss", "fixed"),
        "#scalars&tagFilter=grad_norm%7Cupdate_ratio",
        height=1250,
    ),
    Shot("findings-text", ("forgets_zero_grad", "summed_loss", "fixed"), "#text", height=1300),
    Shot(
        "histograms",
        ("forgets_zero_grad", "fixed"),
        "#distributions&tagFilter=grad_hist%2Fnet%5C.0",
    ),
)


def browser() -> str:
    """The path of a Chromium binary.

    Raises:
        FileNotFoundError: when none is installed.
    """
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no browser found ({', '.join(BROWSERS)}): apt-get install chromium")


def serve(logdir: Path, runs: Sequence[str]) -> Iterator[int]:
    """``tensorboard`` on 127.0.0.1 over ``logdir``; yields its port once it serves every run's
    audit scalars and findings text."""
    with tensorboard_server(logdir) as (server, port):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {server.returncode}")
            try:
                scalars = get_json(port, "/data/plugin/scalars/tags")
                texts = get_json(port, "/data/plugin/text/tags")
                assert isinstance(scalars, dict) and isinstance(texts, dict)
                if all(scalars.get(r) and texts.get(r) for r in runs):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard did not serve {list(runs)} in time")
            time.sleep(0.5)
        yield port


def screenshot(url: str, path: Path, width: int, height: int) -> Path:
    """Load ``url`` in headless Chromium and write what it draws to ``path`` (palette PNG)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "shot.png"
        subprocess.run(
            [
                browser(),
                "--headless",
                "--no-sandbox",  # runs as root in containers
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={RENDER_BUDGET_MS}",
                f"--screenshot={raw}",
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
        return make_figures.write_png(raw.read_bytes(), path)


def take(shot: Shot, run_dirs: dict[str, Path], out: Path) -> Path:
    """Serve the runs of ``shot`` alone and photograph its page into ``out/<name>.png``."""
    with tempfile.TemporaryDirectory(prefix="grad_shot_") as tmp:
        for run in shot.runs:
            shutil.copytree(run_dirs[run], Path(tmp) / run)
        with serve(Path(tmp), shot.runs) as port:
            url = f"http://{HOST}:{port}/{shot.fragment}"
            return screenshot(url, out / f"{shot.name}.png", shot.width, shot.height)


def generate(out: Path, log_dir: Path | None = None) -> list[Path]:
    """Train the runs (unless ``log_dir`` holds them) and take every screenshot.

    Args:
        out: the image root (``docs/img``); the PNGs go to ``out/tensorboard/``.
        log_dir: where the runs are, or are trained and kept (default: a temporary directory).
    """
    browser()  # fail before training when there is no browser
    target = out / make_figures.SUBDIR
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grad_shot_")))
        names = list(make_figures.RUN_COLORS)
        if all((log_dir / name).is_dir() for name in names):
            run_dirs = {name: log_dir / name for name in names}
        else:
            run_dirs = make_figures.train(log_dir, epochs=5)
        return [take(shot, run_dirs, target) for shot in SHOTS]


def main(argv: Sequence[str] | None = None) -> int:
    """``python docs/make_screenshots.py [--out DIR] [--log-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=make_figures.DEFAULT_OUT)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    for path in generate(args.out, args.log_dir):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The TensorBoard guide's figures: made by docs/make_figures.py (the ``--plot`` figure) and
docs/make_screenshots.py (TensorBoard in headless Chromium), committed, and all shown.

The figure script runs once (``--quick``: one epoch per run) into a temporary directory. Every
PNG that docs/tensorboard.md shows must be one the scripts write and one committed under
docs/img/tensorboard/, and the sets must agree (no figure the page forgot, no stale image). The
screenshot script needs a browser: its list of shots is checked here, and it runs (slow test)
where Chromium is installed. The runs' tags must all be in the tags table of docs/reports.md,
which the guide links to instead of repeating it.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE = DOCS / "tensorboard.md"
COMMITTED = DOCS / "img" / "tensorboard"
#: A markdown image of the guide: ![alt](img/tensorboard/<name>.png).
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\((img/tensorboard/[^)\s]+\.png)\)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_BYTES = 8 * 1024
MAX_BYTES = 200 * 1024
MIN_SIDE_PX = 400


def _shots() -> set[str]:
    """The screenshots docs/make_screenshots.py takes, relative to docs/img/."""
    sys.path.insert(0, str(DOCS))
    try:
        script = runpy.run_path(str(DOCS / "make_screenshots.py"))
    finally:
        sys.path.remove(str(DOCS))
    return {f"tensorboard/{shot.name}.png" for shot in script["SHOTS"]}


def _referenced() -> list[str]:
    """The image paths the guide shows, relative to docs/img/ (``tensorboard/x.png``)."""
    return [m.removeprefix("img/") for m in IMAGE_LINK.findall(PAGE.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the figure script in quick mode; what it wrote, and the process state around it."""
    out = tmp_path_factory.mktemp("docs_img")
    threads, rng, rc = torch.get_num_threads(), torch.get_rng_state(), _rc_params()
    script = runpy.run_path(str(DOCS / "make_figures.py"))  # not __main__: nothing runs yet
    result = script["generate"](out, quick=True)
    pyplot = sys.modules.get("matplotlib.pyplot")  # torchmetrics imports it along with lightning
    return {
        "out": out,
        "result": result,
        "pyplot_figures": pyplot.get_fignums() if pyplot is not None else [],
        "rc_kept": _rc_params() == rc,
        "threads_kept": torch.get_num_threads() == threads,
        "rng_kept": torch.equal(torch.get_rng_state(), rng),
    }


def _rc_params() -> dict[str, Any]:
    import matplotlib

    return {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}


def _check_png(path: Path) -> None:
    """A readable PNG of a real figure: signature, size, dimensions, more than one colour."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert MIN_BYTES <= len(data) <= MAX_BYTES, f"{path}: {len(data)} bytes"
    with Image.open(path) as image:
        image.load()
        assert min(image.size) >= MIN_SIDE_PX, f"{path}: {image.size}"
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 16, f"{path} is (nearly) blank"


def test_the_guide_shows_figures() -> None:
    refs = _referenced()
    assert len(refs) >= 5, refs
    assert len(set(refs)) == len(refs), "an image is shown twice"


def test_every_figure_shown_is_generated_and_committed(generated: dict[str, Any]) -> None:
    out: Path = generated["out"]
    written = {p.relative_to(out).as_posix() for p in generated["result"].images}
    shots = _shots()
    for ref in _referenced():
        assert ref in written | shots, f"docs/tensorboard.md shows {ref}: no script makes it"
        if ref in written:
            _check_png(out / ref)
        assert (COMMITTED.parent / ref).is_file(), f"docs/img/{ref} is not committed"
        _check_png(COMMITTED.parent / ref)


def test_no_figure_unshown_or_stale(generated: dict[str, Any]) -> None:
    out: Path = generated["out"]
    refs = set(_referenced())
    written = {p.relative_to(out).as_posix() for p in generated["result"].images} | _shots()
    committed = {f"tensorboard/{p.name}" for p in COMMITTED.iterdir()}
    assert written == refs, f"made, not shown: {written - refs}; shown, not made: {refs - written}"
    assert committed == refs, (
        f"committed, not shown: {committed - refs}; shown, not committed: {refs - committed}"
    )


def _documented_patterns() -> list[re.Pattern[str]]:
    """The tags of docs/reports.md's TensorBoard section, ``<module>`` as a wildcard."""
    text = (DOCS / "reports.md").read_text(encoding="utf-8")
    section = text[text.index("## TensorBoard") :]
    patterns = []
    for tag in re.findall(r"`(grad_audit/[^`]+)`", section):
        if "<check>" in tag or "<metric_prefix>" in tag:
            continue  # the generic forms would match anything
        body = re.escape(tag).replace(re.escape("<module>"), r"[^/]+")
        patterns.append(re.compile(rf"{body}(_opt\d+)?"))
    return patterns


def test_every_tag_the_run_writes_is_in_the_tags_table(generated: dict[str, Any]) -> None:
    tags = generated["result"].tags
    written = [
        t
        for kind in ("scalars", "histograms", "tensors")
        for t in tags.get(kind, [])
        if t.startswith("grad_audit/")
    ]
    assert "grad_audit/findings" in written and "grad_audit/zero_grad/uncleared_params" in written
    patterns = _documented_patterns()
    undocumented = [t for t in written if not any(p.fullmatch(t) for p in patterns)]
    assert not undocumented, f"tags missing from docs/reports.md#scalar-tags: {undocumented}"


def test_the_script_leaves_the_process_as_it_found_it(generated: dict[str, Any]) -> None:
    assert generated["pyplot_figures"] == [], "figures left open in pyplot"
    assert generated["rc_kept"], "matplotlib's rcParams were changed"
    assert generated["threads_kept"], "torch's thread count was not restored"
    assert generated["rng_kept"], "torch's global random state was changed"


@pytest.mark.slow
def test_the_screenshot_script_photographs_every_shot(tmp_path: Path) -> None:
    """docs/make_screenshots.py end to end: tensorboard on 127.0.0.1, headless Chromium."""
    import shutil

    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chromium installed (apt-get install chromium)")
    pytest.importorskip("tensorboard")
    sys.path.insert(0, str(DOCS))
    try:
        script = runpy.run_path(str(DOCS / "make_screenshots.py"))
    finally:
        sys.path.remove(str(DOCS))
    images = script["generate"](tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in images} == _shots()
    for image in images:
        _check_png(image)

"""The audit as a real TensorBoard server shows it (scalars, custom-scalars layout, findings text).

A broken run (manual optimization without ``opt.zero_grad()``) is trained with a
``TensorBoardLogger``; then ``tensorboard`` is started on 127.0.0.1 and its HTTP data API is
queried, as the web UI does:

* ``/data/runs`` and ``/data/plugin/scalars/tags``: the run and its ``grad_audit/...`` scalars;
* ``/data/plugin/custom_scalars/layout``: the "Gradient audit" category;
* ``/data/plugin/text/text?run=RUN&tag=grad_audit/findings``: the findings table, under exactly
  the tag the contract names (torch's ``add_text`` would have appended ``/text_summary``).

A run of the demo is loaded the same way, with the data of each chart of the custom-scalars
layout (``/data/plugin/custom_scalars/scalars?run=RUN&tag=REGEX``): every chart of a check that
checked more than one step must be a line. The server listens on 127.0.0.1 only; the test is
skipped where ``tensorboard`` is not installed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grad_callbacks import GradientAudit
from tests import zoo
from tests.tensorboard_server import get_json, tensorboard_server

pytest.importorskip("tensorboard")

READY_TIMEOUT_S = 60.0
FINDINGS_TAG = "grad_audit/findings"
SERVED_FINDINGS_TAGS = (FINDINGS_TAG,)


def _train_broken_run(logdir: Path) -> tuple[GradientAudit, str]:
    from lightning.pytorch.loggers import TensorBoardLogger

    audit = GradientAudit(on_finding="log")
    logger = TensorBoardLogger(str(logdir), name="broken", version="")
    zoo.fit(zoo.ManualMLP(zero_grad=False), [audit], logger=logger, log_every_n_steps=1)
    return audit, "broken"


def _wait_until_loaded(
    server: subprocess.Popen[bytes], port: int, run: str, stderr_path: Path
) -> tuple[dict[str, Any], str]:
    """Poll until the run's audit scalars and findings text are served.

    Returns the scalar tags of every run and the tag the findings text is served under.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"tensorboard exited with {server.returncode}:\n"
                f"{stderr_path.read_text(errors='replace')[-4000:]}"
            )
        try:
            scalar_tags = get_json(port, "/data/plugin/scalars/tags")
            text_tags = get_json(port, "/data/plugin/text/tags")
            served = [t for t in text_tags.get(run, []) if t in SERVED_FINDINGS_TAGS]
            if any(t.startswith("grad_audit/") for t in scalar_tags.get(run, {})) and served:
                return scalar_tags, served[0]
            last = (scalar_tags, text_tags)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(
        f"tensorboard did not serve the run {run!r} within {READY_TIMEOUT_S:.0f} s "
        f"(last answer: {last!r}); its stderr:\n"
        f"{stderr_path.read_text(errors='replace')[-4000:]}"
    )


@contextlib.contextmanager
def _tensorboard(logdir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A TensorBoard server on 127.0.0.1 over ``logdir``; its stderr goes to tmp_path."""
    with open(tmp_path / "tensorboard.stderr", "wb") as stderr:
        with tensorboard_server(logdir, stderr=stderr) as served:
            yield served


def test_tensorboard_serves_the_audit_of_a_broken_run(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    audit, run = _train_broken_run(logdir)
    assert "missing-zero-grad" in {f.code for f in audit.findings}

    with _tensorboard(logdir, tmp_path) as (server, port):
        stderr_path = tmp_path / "tensorboard.stderr"
        scalar_tags, findings_tag = _wait_until_loaded(server, port, run, stderr_path)

        # the routes the UI uses exist in this TensorBoard and list our run and plugins
        plugins = get_json(port, "/data/plugins_listing")
        for plugin in ("scalars", "custom_scalars", "text"):
            assert plugin in plugins, sorted(plugins)
        assert run in get_json(port, "/data/runs")

        # scalars: the zero-grad check's metrics for the run
        tags = sorted(scalar_tags[run])
        assert any(t.startswith("grad_audit/zero_grad/") for t in tags), tags

        # custom-scalars layout: the audit's category
        layout = get_json(port, "/data/plugin/custom_scalars/layout")
        categories = {c["title"]: c for c in layout.get("category", [])}
        assert "Gradient audit" in categories, layout
        assert categories["Gradient audit"]["chart"], layout

        # the findings table as text
        entries = get_json(port, "/data/plugin/text/text", run=run, tag=findings_tag)
        assert entries, "no findings text"
        assert any("missing-zero-grad" in e["text"] for e in entries), entries
        assert all(isinstance(e["step"], int) for e in entries)


#: Charts of the layout that are not one check's, and the check whose steps they follow.
CHART_CHECKS = {"Gradient norms": "GradientMonitor", "Update / weight": "GradientMonitor"}
DEMO_STEPS = 60


def test_every_panel_of_a_demo_run_is_a_line_and_the_table_has_a_row_per_finding(
    tmp_path: Path,
) -> None:
    """The demo's first run (manual optimization without zero_grad), 60 steps, as the browser
    loads it: every custom-scalars chart of a check that checked more than one step has at
    least two points (ZeroGradCheck's and GradientSanityCheck's were one point at step 0 under
    watch windows), a check that ran once has its one point; the findings table has one row per
    finding of the report, once."""
    from grad_callbacks import demo
    from grad_callbacks.sinks.report import REPORT_NAME, load_report

    logdir = tmp_path / "logs"
    run = "1_manual_forgets_zero_grad"
    demo.train_run(demo.RUNS[0], logdir, max_steps=DEMO_STEPS, name=run)
    report = load_report(logdir / run / REPORT_NAME)
    steps_checked = {c["name"]: c["steps_checked"] for c in report["checks"]}

    with _tensorboard(logdir, tmp_path) as (server, port):
        _wait_until_loaded(server, port, run, tmp_path / "tensorboard.stderr")
        layout = get_json(port, "/data/plugin/custom_scalars/layout")
        (category,) = [c for c in layout["category"] if c["title"] == "Gradient audit"]
        points: dict[str, int] = {}
        for chart in category["chart"]:
            series: dict[str, Any] = {}
            for regex in chart["multiline"]["tag"]:
                data = get_json(port, "/data/plugin/custom_scalars/scalars", run=run, tag=regex)
                assert data["regex_valid"], chart
                series.update(data["tag_to_events"])
            assert series, f"chart {chart['title']!r} has no data"
            points[chart["title"]] = min(len(events) for events in series.values())
        assert set(points) == {
            "ZeroGradCheck", "PerSampleGradientCheck", "BatchMixingCheck (runs once: one point)",
            "GradientSanityCheck", "Gradient norms", "Update / weight", "Audit overhead",
        }
        for title, n in points.items():
            check = title.removesuffix(" (runs once: one point)")
            checked = steps_checked.get(CHART_CHECKS.get(check, check), DEMO_STEPS)
            if checked > 1:
                assert n >= 2, f"chart {title!r}: {n} point(s) for {checked} steps checked"
            else:
                assert n == 1, (title, n)

        entries = get_json(port, "/data/plugin/text/text", run=run, tag=FINDINGS_TAG)
        html = entries[-1]["text"]  # the markdown, rendered inside the plugin's own table
        table = html[html.index("<th>#</th>") :]
        body = table[table.index("<tbody>") : table.index("</tbody>")]
        assert body.count("<tr>") == len(report["findings"]) >= 1
        for finding in report["findings"]:
            assert f"<code>{finding['code']}</code>" in body
        # written once per change of the findings: no two tables in a row are the same
        texts = [e["text"] for e in entries]
        assert all(a != b for a, b in itertools.pairwise(texts)), texts

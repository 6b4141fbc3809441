"""The ``grad-audit`` command line tool on real run directories written by Lightning runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from grad_callbacks import ZeroGradCheck
from grad_callbacks.cli import main
from grad_callbacks.findings import CODES, make_finding
from grad_callbacks.sinks.report import REPORT_NAME, load_report
from tests import zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Runs:
    root: Path  # holds both runs
    broken: Path  # log_dir of a manual-optimization run that never calls zero_grad
    clean: Path  # log_dir of a clean run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    broken = zoo.fit(
        zoo.ManualMLP(zero_grad=False),
        [ZeroGradCheck(on_finding="log")],
        logger=TensorBoardLogger(root, name="broken"),
        log_every_n_steps=1,
    )
    clean = zoo.fit(
        zoo.MLP(),
        [ZeroGradCheck(on_finding="log")],
        logger=TensorBoardLogger(root, name="clean"),
        log_every_n_steps=1,
    )
    assert broken.log_dir is not None and clean.log_dir is not None
    return Runs(root=root, broken=Path(broken.log_dir), clean=Path(clean.log_dir))


def _run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- the run dirs
def test_the_report_is_written_in_the_loggers_log_dir(runs: Runs) -> None:
    broken = load_report(runs.broken / REPORT_NAME)
    clean = load_report(runs.clean / REPORT_NAME)
    assert broken["status"] == clean["status"] == "finished"
    assert [f["code"] for f in broken["findings"]] == ["missing-zero-grad"]
    assert clean["findings"] == []
    assert any(p.name.startswith("events.out.tfevents") for p in runs.broken.iterdir())


# ---------------------------------------------------------------------------- text
def test_text_report_of_a_broken_run(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report", runs.broken)
    assert code == 0  # no --fail-on: reading a report never fails
    assert "missing-zero-grad" in out
    assert "ZeroGradCheck" in out
    assert "error" in out
    assert "status: finished" in out
    assert "global_step: 7" in out
    assert "steps checked" in out
    assert "cost: not measured" in out  # a check used alone has no overhead budget
    assert "+1 more" in out  # 4 parameters, 3 shown
    assert "no-op)" in out  # the end of CODES["missing-zero-grad"].fix: wrapped, not cut
    assert "…" not in out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    assert err == ""


@pytest.mark.parametrize("width", ["70", "120", "200"])
def test_text_report_wraps_instead_of_truncating(
    runs: Runs, capsys: pytest.CaptureFixture[str], width: str
) -> None:
    code, out, _ = _run(capsys, "report", runs.broken, "--width", width)
    assert code == 0
    assert "…" not in out
    assert "missing-zero-grad" in out
    assert max(len(line) for line in out.splitlines()) <= int(width)
    words = CODES["missing-zero-grad"].fix.split()
    assert words[-1] in out  # the fix is there to its last word


def test_verbose_prints_the_messages(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _run(capsys, "report", runs.broken, "-v", "--width", "400")
    assert "stepped on gradients that still held contributions" in out
    assert "net.2.bias" in out  # all parameters are in the message


def test_clean_run_says_no_findings(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "report", runs.clean, "--fail-on", "error")
    assert code == 0
    assert "No findings." in out
    assert "missing-zero-grad" not in out


# ---------------------------------------------------------------------------- --fail-on
@pytest.mark.parametrize("severity", ["error", "warning"])
def test_fail_on_a_broken_run_exits_1(
    runs: Runs, capsys: pytest.CaptureFixture[str], severity: str
) -> None:
    code, out, err = _run(capsys, "report", runs.broken, "--fail-on", severity)
    assert code == 1
    assert "missing-zero-grad" in out
    assert "missing-zero-grad" in err and f"--fail-on {severity}" in err


def test_fail_on_looks_at_every_run_under_the_directory(
    runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "report", runs.root, "--fail-on", "error")[0] == 1
    assert _run(capsys, "report", runs.root / "clean", "--fail-on", "warning")[0] == 0


def test_fail_on_ignores_findings_below_the_threshold(
    tmp_path: Path, runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    report = load_report(runs.clean / REPORT_NAME)
    note = make_finding("short-accumulation-window", check="ZeroGradCheck", step=2, message="k/N")
    stale = make_finding("stale-grad", check="ZeroGradCheck", step=3, message="old", params=["w"])
    report["findings"] = [note.to_dict()]
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / REPORT_NAME).write_text(json.dumps(report))
    report["findings"] = [note.to_dict(), stale.to_dict()]
    (tmp_path / "warn").mkdir()
    (tmp_path / "warn" / REPORT_NAME).write_text(json.dumps(report))

    assert _run(capsys, "report", tmp_path / "info", "--fail-on", "warning")[0] == 0
    assert _run(capsys, "report", tmp_path / "warn", "--fail-on", "error")[0] == 0
    code, out, _ = _run(capsys, "report", tmp_path / "warn", "--fail-on", "warning")
    assert code == 1
    assert "stale-grad" in out and "short-accumulation-window" in out


# ---------------------------------------------------------------------------- what RUN_DIR is
def test_a_directory_holding_two_runs_prints_two_sections(
    runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "report", runs.root)
    assert code == 0
    assert "broken/version_0" in out
    assert "clean/version_0" in out
    assert out.count("status: finished") == 2
    assert out.index("broken/version_0") < out.index("clean/version_0")
    assert "No findings." in out and "missing-zero-grad" in out


def test_run_dir_may_be_the_report_file(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "report", runs.broken / REPORT_NAME, "--fail-on", "error")
    assert code == 1
    assert "missing-zero-grad" in out


def test_run_dir_may_be_a_report_file_under_another_name(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = tmp_path / "ci_artifact.json"
    artifact.write_text((runs.broken / REPORT_NAME).read_text())
    code, out, _ = _run(capsys, "report", artifact, "--fail-on", "error")
    assert code == 1
    assert "missing-zero-grad" in out
    (tmp_path / "notes.txt").write_text("not a report")
    assert _run(capsys, "report", tmp_path / "notes.txt")[0] == 2


def test_an_empty_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report", tmp_path)
    assert code == 2
    assert out == ""
    assert f"no gradient audit found under {tmp_path}" in err
    assert "GradientAudit()" in err and "log_dir" in err


def test_a_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "report", tmp_path / "nope", "--fail-on", "error")
    assert code == 2
    assert "no gradient audit found under" in err


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"schema_version": 1}',
        '{"schema_version": 1, "findings": [{"code": "x"}]}',
        '{"schema_version": 1, "findings": [{"code": "x", "severity": "fatal", "check": "c", '
        '"step": 0, "message": "m"}]}',
    ],
    ids=["not-json", "list", "no-findings-key", "finding-fields-missing", "bad-severity"],
)
def test_a_malformed_report_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    (tmp_path / REPORT_NAME).write_text(content)
    code, _, err = _run(capsys, "report", tmp_path, "--fail-on", "error")
    assert code == 2
    assert "malformed gradient audit report" in err
    assert str(tmp_path / REPORT_NAME) in err


def test_a_malformed_report_beside_good_ones_still_exits_2(
    tmp_path: Path, runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / REPORT_NAME).write_text((runs.clean / REPORT_NAME).read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / REPORT_NAME).write_text("")
    code, out, err = _run(capsys, "report", tmp_path)
    assert code == 2
    assert "No findings." in out  # the good run is still shown
    assert "bad" in err


# ---------------------------------------------------------------------------- md and json
def test_markdown_output_is_a_table(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "report", runs.root, "--format", "md")
    assert code == 0
    lines = out.splitlines()
    assert "## broken/version_0" in lines and "## clean/version_0" in lines
    header = "| check | code | severity | first step | count | parameters | fix |"
    assert lines.count(header) == 1  # the clean run has no table
    sep = lines[lines.index(header) + 1]
    assert sep == "|---|---|---|---|---|---|---|"
    row = lines[lines.index(header) + 2]
    assert row.startswith("| ZeroGradCheck | `missing-zero-grad` | error | 1 |")
    assert row.count(" | ") == 6 and row.endswith("|")
    assert "No findings." in lines


def test_json_output_parses(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "report", runs.root, "--format", "json")
    assert code == 0
    reports = json.loads(out)
    assert [Path(r["path"]).parent.parent.name for r in reports] == ["broken", "clean"]
    assert reports[0]["findings"][0]["code"] == "missing-zero-grad"
    assert reports[0]["checks"][0]["name"] == "ZeroGradCheck"
    assert reports[1]["findings"] == []
    assert reports[0]["schema_version"] == load_report(runs.broken / REPORT_NAME)["schema_version"]


def test_json_output_with_fail_on(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "report", runs.broken, "--format", "json", "--fail-on", "error")
    assert code == 1
    assert len(json.loads(out)) == 1


# ---------------------------------------------------------------------------- --plot
def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)  # type: ignore[attr-defined]


def test_plot_writes_a_png_per_run_with_the_finding_marked(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "plots"
    code, out, _ = _run(capsys, "report", runs.root, "--plot", out_dir, "--fail-on", "error")
    assert code == 1
    pngs = sorted(out_dir.glob("*.png"))
    # named after the run's path (its last three components outside the working directory)
    prefix = runs.root.name
    assert [p.name for p in pngs] == [
        f"{prefix}_broken_version_0.png",
        f"{prefix}_clean_version_0.png",
    ]
    assert _png_text(pngs[0])["Title"] == f"grad_audit: {prefix}/broken/version_0"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"wrote {png}" in out
    assert "missing-zero-grad@1" in _png_text(pngs[0])["Description"]
    assert "missing-zero-grad" not in _png_text(pngs[1])["Description"]


def test_plot_with_json_keeps_stdout_parseable(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "report", runs.broken, "--format", "json", "--plot", tmp_path)
    assert code == 0
    assert len(json.loads(out)) == 1
    assert "wrote" in err
    assert (tmp_path / f"{runs.root.name}_broken_version_0.png").read_bytes()[:8] == PNG_MAGIC


def test_plots_of_two_runs_both_named_version_0_do_not_collide(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plotting each run directory on its own used to write version_0.png twice."""
    out_dir = tmp_path / "plots"
    assert _run(capsys, "report", runs.broken, "--plot", out_dir)[0] == 0
    assert _run(capsys, "report", runs.clean, "--plot", out_dir)[0] == 0
    names = sorted(p.name for p in out_dir.glob("*.png"))
    prefix = runs.root.name
    assert names == [f"{prefix}_broken_version_0.png", f"{prefix}_clean_version_0.png"]


def test_a_run_under_the_working_directory_is_named_by_its_relative_path(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(runs.root.parent)
    out_dir = tmp_path / "plots"
    assert _run(capsys, "report", Path(runs.root.name) / "broken", "--plot", out_dir)[0] == 0
    (png,) = out_dir.glob("*.png")
    assert png.name == f"{runs.root.name}_broken_version_0.png"


def test_plot_without_event_files_says_so(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / REPORT_NAME).write_text((runs.broken / REPORT_NAME).read_text())
    code, out, _ = _run(capsys, "report", run, "--plot", tmp_path / "plots")
    assert code == 0
    assert "no grad_audit scalars" in out
    assert not (tmp_path / "plots").exists()


def test_figure_marks_warnings_and_errors_at_their_first_step() -> None:
    from grad_callbacks.plots import build_figure, finding_markers

    scalars = {
        "grad_audit/zero_grad/uncleared_params": [(1, 0.0), (2, 4.0), (3, 4.0)],
        "grad_audit/zero_grad/stale_params": [(1, 0.0), (2, 0.0), (3, 1.0)],
    }
    findings = [
        make_finding("missing-zero-grad", check="ZeroGradCheck", step=2, message="m"),
        make_finding("stale-grad", check="ZeroGradCheck", step=3, message="m"),
        make_finding("short-accumulation-window", check="ZeroGradCheck", step=1, message="m"),
    ]
    markers = finding_markers(findings)
    assert [(m.step, m.codes, m.severity) for m in markers] == [
        (2, ("missing-zero-grad",), "error"),
        (3, ("stale-grad",), "warning"),
    ]
    fig = build_figure(scalars, findings)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        vertical = [ln for ln in ax.get_lines() if list(ln.get_xdata()) in ([2, 2], [3, 3])]
        assert sorted(ln.get_label() for ln in vertical) == [
            "missing-zero-grad @ step 2",
            "stale-grad @ step 3",
        ]
        assert all(ln.get_linestyle() == "--" for ln in vertical)


def test_read_audit_scalars_of_a_real_run(runs: Runs) -> None:
    from grad_callbacks.sinks.events import read_audit_scalars

    scalars = read_audit_scalars(runs.broken)
    assert "grad_audit/zero_grad/uncleared_params" in scalars
    assert all(tag.startswith("grad_audit/") for tag in scalars)
    uncleared = dict(scalars["grad_audit/zero_grad/uncleared_params"])
    assert max(uncleared.values()) == 4.0  # the four parameters of ManualMLP
    assert "train_loss" not in scalars


# ---------------------------------------------------------------------------- other commands
def test_codes_lists_every_stable_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "codes", "--width", "200")
    assert code == 0
    for c in CODES:
        assert c in out
    code, out, _ = _run(capsys, "codes", "--format", "json")
    assert [c["code"] for c in json.loads(out)] == list(CODES)


def test_demo_calls_run_demo_with_the_out_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []
    fake = types.ModuleType("grad_callbacks.demo")

    def run_demo(out_dir: str) -> int:
        calls.append(out_dir)
        return 3

    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "grad_callbacks.demo", fake)
    assert main(["demo", "--out", str(tmp_path)]) == 3
    assert main(["demo"]) == 3
    assert calls == [str(tmp_path), "./grad_audit_demo"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["report"]) == 2
    assert main(["report", ".", "--fail-on", "info"]) == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------- entry point
def test_python_dash_m_grad_callbacks_runs_the_cli(runs: Runs) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "grad_callbacks", "report", str(runs.broken), "--fail-on", "error"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "missing-zero-grad" in proc.stdout
    assert "--fail-on error" in proc.stderr


def test_figure_with_many_tags_uses_columns_and_says_what_it_left_out() -> None:
    from grad_callbacks.plots import MAX_COLUMNS, build_figure

    scalars = {f"grad_audit/monitor/layer{i:03d}": [(0, 0.0), (1, float(i))] for i in range(70)}
    fig = build_figure(scalars, [], title="big", max_panels=40)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 40
    fig.canvas.draw()
    columns = {round(ax.get_position().x0, 3) for ax in visible}
    assert 1 < len(columns) <= MAX_COLUMNS
    assert "30 more tags not shown" in fig.get_suptitle()
    assert visible[0].get_title(loc="left") == "monitor/layer000"


def test_skipped_check_shows_its_reason_in_the_fix_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grad_callbacks.sinks.report import build_report, write_report

    skipped = make_finding(
        "check-skipped",
        check="BatchMixingCheck",
        step=0,
        message="m",
        data={"reason": "no input found; pass input_mapping=..."},
    )
    entry = {
        "name": "BatchMixingCheck",
        "state_key": "k",
        "settings": {},
        "steps_checked": 1,
        "seconds": 0.0,
        "findings": [skipped.to_dict()],
    }
    write_report(tmp_path, build_report([entry], status="finished", global_step=1))
    code, out, _ = _run(capsys, "report", tmp_path, "--format", "md")
    assert code == 0
    assert "pass input_mapping=..." in out
    assert CODES["check-skipped"].fix not in out


def test_figure_draws_a_series_of_one_point_as_a_marker_with_its_step() -> None:
    """A check that ran once: a labelled marker on a readable integer axis, not a dot on an
    axis of +-1e-17."""
    from grad_callbacks.plots import build_figure

    scalars = {"grad_audit/batch_mixing/mixing_pairs": [(0, 0.0)]}
    fig = build_figure(scalars, [])
    (ax,) = fig.axes
    assert ax.get_xlim() == (-1.0, 1.0)
    assert any("ran once: step 0" in t.get_text() for t in ax.texts)
    (line,) = ax.get_lines()
    assert line.get_marker() == "o"
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert all(float(t.replace("\u2212", "-")).is_integer() for t in ticks), ticks

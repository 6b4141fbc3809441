"""The ``grad-audit`` command line tool.

Subcommands:

* ``grad-audit report RUN_DIR [--fail-on warning|error] [--format text|md|json] [--plot OUT_DIR]``
  prints the audit of one run or of every run under a directory, and exits 1 when a finding
  reaches ``--fail-on`` (for CI);
* ``grad-audit demo [--out DIR]`` trains a small model with planted gradient bugs and shows the
  audit end to end;
* ``grad-audit codes`` lists the stable finding codes.

Exit codes: 0 success; 1 a finding reached ``--fail-on``; 2 no report found, a malformed report,
or a usage error.

Example:
    >>> main(["codes", "--format", "md"])  # doctest: +SKIP
    0

In CI::

    grad-audit report lightning_logs/ --fail-on error
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from grad_callbacks.findings import CODES, SEVERITY_RANK, Finding, at_least
from grad_callbacks.sinks.report import find_reports, load_report

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2

#: How many parameter names a table cell shows before "+N more".
MAX_PARAMS_SHOWN = 3
#: Console width when stdout is not a terminal (CI logs) and COLUMNS is not set.
DEFAULT_PIPE_WIDTH = 150
#: Below this width findings are printed as blocks instead of a table.
NARROW_WIDTH = 120
DEFAULT_DEMO_DIR = "./grad_audit_demo"

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_NOT_FOUND = (
    "no gradient audit found under {path}: train with grad_callbacks.GradientAudit() or a check "
    "callback attached; the report is written at the end of fit to the logger's log_dir"
)


class ReportError(ValueError):
    """A report file that cannot be read or is not a grad_audit report."""


@dataclass
class Run:
    """One loaded report.

    Attributes:
        path: the ``grad_audit.json`` file.
        title: its directory relative to the ``RUN_DIR`` given on the command line (the
            directory as given when it is ``RUN_DIR`` itself).
        report: the report as loaded.
        findings: its findings, parsed.
    """

    path: Path
    title: str
    report: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """A file name stem for its outputs (``broken/version_0`` -> ``broken_version_0``)."""
        title = self.path.parent.name if self.title == str(self.path.parent) else self.title
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", title.strip("/")).strip("._")
        return slug or "run"

    @property
    def directory(self) -> Path:
        """The run's log directory (where the report and the event files are)."""
        return self.path.parent


# ---------------------------------------------------------------------------- loading
def _title(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        rel = path.parent.resolve().relative_to(base.resolve())
    except ValueError:
        rel = path.parent
    return str(path.parent) if str(rel) == "." else rel.as_posix()


def load_run(path: Path, root: Path) -> Run:
    """Load and validate one report.

    Raises:
        ReportError: when the file cannot be read or parsed, or is not a grad_audit report.
    """
    try:
        report = load_report(path)
        raw = report["findings"]
        if not isinstance(raw, list):
            raise ValueError("'findings' is not a list")
        findings = [Finding.from_dict(f) for f in raw]
        for f in findings:
            if f.severity not in SEVERITY_RANK:
                raise ValueError(f"unknown severity {f.severity!r} in finding {f.code!r}")
        for check in report.get("checks", []) or []:
            if not isinstance(check, Mapping):
                raise ValueError("'checks' entries must be objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"malformed gradient audit report {path}: {exc}") from exc
    return Run(path=path, title=_title(path, root), report=report, findings=findings)


def load_runs(run_dir: str | os.PathLike[str]) -> tuple[list[Run], list[str]]:
    """Every report under ``run_dir``: the loaded runs and the error messages of bad files.

    ``run_dir`` may also be a report file under another name (e.g. a downloaded CI artifact).
    """
    root = Path(run_dir)
    runs: list[Run] = []
    errors: list[str] = []
    for path in [root] if root.is_file() else find_reports(root):
        try:
            runs.append(load_run(path, root))
        except ReportError as exc:
            errors.append(str(exc))
    return runs, errors


# ---------------------------------------------------------------------------- formatting
def _params_cell(params: Sequence[str]) -> str:
    shown = ", ".join(params[:MAX_PARAMS_SHOWN])
    extra = len(params) - MAX_PARAMS_SHOWN
    return shown + (f" +{extra} more" if extra > 0 else "")


def _fix(finding: Finding) -> str:
    """The fix column: the code's usual fix; for a skipped check, why it skipped."""
    reason = finding.data.get("reason") if finding.code == "check-skipped" else None
    if isinstance(reason, str) and reason:
        return reason
    info = CODES.get(finding.code)
    return info.fix if info is not None else "(unknown code: see the finding's message)"


def _versions(report: Mapping[str, Any]) -> str:
    versions = report.get("versions") or {}
    if not isinstance(versions, Mapping):
        return str(versions)
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _header(run: Run) -> str:
    r = run.report
    return (
        f"status: {r.get('status', '?')} | global_step: {r.get('global_step', '?')} | "
        f"world size: {r.get('world_size', '?')} | versions: {_versions(r)}"
    )


def _check_lines(run: Run) -> list[str]:
    lines = []
    for c in run.report.get("checks", []) or []:
        seconds = c.get("seconds")
        secs = _duration(seconds) if isinstance(seconds, (int, float)) else "? s"
        lines.append(f"{c.get('name', '?')}: {c.get('steps_checked', '?')} steps checked, {secs}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.2f} s"


def _sorted(findings: Sequence[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], f.step, f.code))


def _console_width(width: int | None, stream: TextIO) -> int | None:
    if width:
        return width
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None  # rich measures the terminal
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    return columns if columns > 40 else DEFAULT_PIPE_WIDTH


def _console(width: int | None, stream: TextIO) -> Any:
    from rich.console import Console

    return Console(
        file=stream,
        soft_wrap=False,
        width=_console_width(width, stream),
        highlight=False,
        emoji=False,
    )


def _findings_table(findings: Sequence[Finding]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True, expand=True, header_style="bold")
    table.add_column("check", overflow="fold")
    table.add_column("code", overflow="fold", min_width=12)
    table.add_column("severity", overflow="fold")
    table.add_column("first step", justify="right", overflow="fold")
    table.add_column("count", justify="right", overflow="fold")
    table.add_column("parameters", overflow="fold", ratio=2, min_width=20)
    table.add_column("fix", overflow="fold", ratio=3, min_width=30)
    for f in _sorted(findings):
        table.add_row(
            Text(f.check),
            Text(f.code),
            Text(f.severity, style=_SEVERITY_STYLE.get(f.severity, "")),
            Text(str(f.step)),
            Text(str(f.count)),
            Text(_params_cell(f.params)),
            Text(_fix(f)),
        )
    return table


def _print_stacked(console: Any, findings: Sequence[Finding]) -> None:
    """The table's content as one block per finding, for consoles too narrow for a table."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    for f in _sorted(findings):
        console.print(
            Text.assemble((f.severity, _SEVERITY_STYLE.get(f.severity, "")), " ", (f.code, "bold"))
        )
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for label, value in (
            ("check", f.check),
            ("first step", str(f.step)),
            ("count", str(f.count)),
            ("parameters", _params_cell(f.params) or "-"),
            ("fix", _fix(f)),
        ):
            grid.add_row(Text(label + ":"), Text(value))
        console.print(Padding(grid, (0, 0, 0, 2), expand=False))


def render_text(
    runs: Sequence[Run], stream: TextIO, width: int | None = None, verbose: bool = False
) -> None:
    """Print every run as a header and a rich table (wrapped, never truncated).

    Below :data:`NARROW_WIDTH` columns each finding is printed as a block of lines instead.

    Args:
        runs: the loaded runs.
        stream: where to print.
        width: text width; default: the terminal's, or ``COLUMNS`` / 150 when not a terminal.
        verbose: also print each finding's full message.
    """
    from rich.text import Text

    console = _console(width, stream)
    for i, run in enumerate(runs):
        if i:
            console.print()
        console.rule(Text(run.title, style="bold"), align="left")
        console.print(Text(_header(run)))
        if run.report.get("error"):
            console.print(Text(f"error: {run.report['error']}", style="red"))
        for line in _check_lines(run):
            console.print(Text("  " + line))
        if not run.findings:
            console.print(Text("No findings.", style="green"))
            continue
        if console.width < NARROW_WIDTH:
            _print_stacked(console, run.findings)
        else:
            console.print(_findings_table(run.findings))
        if verbose:
            for f in _sorted(run.findings):
                console.print(Text.assemble((f"[{f.code} @ step {f.step}] ", "bold"), f.message))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(runs: Sequence[Run], stream: TextIO, verbose: bool = False) -> None:
    """Print every run as a markdown section with a findings table (and messages if verbose)."""
    out: list[str] = []
    for run in runs:
        out.append(f"## {run.title}")
        out.append("")
        for part in _header(run).split(" | "):
            out.append(f"- {part}")
        if run.report.get("error"):
            out.append(f"- error: `{_md_cell(str(run.report['error']))}`")
        for line in _check_lines(run):
            out.append(f"- {_md_cell(line)}")
        out.append("")
        if not run.findings:
            out.append("No findings.")
        else:
            out.append("| check | code | severity | first step | count | parameters | fix |")
            out.append("|---|---|---|---|---|---|---|")
            for f in _sorted(run.findings):
                out.append(
                    f"| {_md_cell(f.check)} | `{f.code}` | {f.severity} | {f.step} | {f.count} "
                    f"| {_md_cell(_params_cell(f.params))} | {_md_cell(_fix(f))} |"
                )
            if verbose:
                out.append("")
                out += [
                    f"- `{f.code}` @ step {f.step}: {_md_cell(f.message)}"
                    for f in _sorted(run.findings)
                ]
        out.append("")
    stream.write("\n".join(out))


def render_json(runs: Sequence[Run], stream: TextIO) -> None:
    """Print the loaded reports as a JSON list (each with a ``path`` key added)."""
    payload = [{"path": str(run.path), **run.report} for run in runs]
    stream.write(json.dumps(payload, indent=2, default=str) + "\n")


def write_plots(runs: Sequence[Run], out_dir: str | os.PathLike[str], stream: TextIO) -> list[Path]:
    """One PNG per run with TensorBoard audit scalars; says so for runs without any."""
    from grad_callbacks.plots import plot_run
    from grad_callbacks.sinks.events import read_audit_scalars

    written: list[Path] = []
    used: set[str] = set()
    for run in runs:
        scalars = read_audit_scalars(run.directory)
        if not scalars:
            stream.write(
                f"no grad_audit scalars in TensorBoard event files under {run.directory} "
                f"(attach a TensorBoardLogger to plot the audit); no plot for {run.title}\n"
            )
            continue
        name = run.slug
        while name in used:
            name += "_"
        used.add(name)
        path = plot_run(
            scalars, run.findings, Path(out_dir) / f"{name}.png", title=f"grad_audit: {run.title}"
        )
        written.append(path)
        stream.write(f"wrote {path}\n")
    return written


# ---------------------------------------------------------------------------- commands
def cmd_report(args: argparse.Namespace) -> int:
    """``grad-audit report``."""
    root = Path(args.run_dir)
    runs, errors = load_runs(root)
    if not runs and not errors:
        print("grad-audit: " + _NOT_FOUND.format(path=root), file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    if args.format == "json":
        render_json(runs, out)
    elif args.format == "md":
        render_markdown(runs, out, verbose=args.verbose)
    else:
        render_text(runs, out, width=args.width, verbose=args.verbose)
    if args.plot:
        # Keep stdout parseable with --format json.
        try:
            write_plots(runs, args.plot, sys.stderr if args.format == "json" else out)
        except OSError as exc:
            errors.append(f"cannot write plots to {args.plot}: {exc}")
    for message in errors:
        print(f"grad-audit: {message}", file=sys.stderr)
    if errors:
        return EXIT_USAGE
    if args.fail_on:
        failing = at_least([f for run in runs for f in run.findings], args.fail_on)
        if failing:
            codes = ", ".join(sorted({f.code for f in failing}))
            print(
                f"grad-audit: {len(failing)} finding(s) at severity {args.fail_on} or worse "
                f"({codes}); failing as asked by --fail-on {args.fail_on}",
                file=sys.stderr,
            )
            return EXIT_FINDINGS
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``grad-audit demo``: runs :func:`grad_callbacks.demo.run_demo`."""
    try:
        from grad_callbacks.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("grad_callbacks.demo",):
            raise
        print("grad-audit: the demo is not available in this installation", file=sys.stderr)
        return EXIT_USAGE
    return int(run_demo(args.out))


def cmd_codes(args: argparse.Namespace) -> int:
    """``grad-audit codes``: the stable finding codes."""
    if args.format == "json":
        payload = [
            {"code": c.code, "severity": c.severity, "summary": c.summary, "fix": c.fix}
            for c in CODES.values()
        ]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    elif args.format == "md":
        lines = ["| code | severity | meaning |", "|---|---|---|"]
        lines += [f"| `{c.code}` | {c.severity} | {_md_cell(c.summary)} |" for c in CODES.values()]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table(show_lines=False, header_style="bold")
        table.add_column("code", overflow="fold")
        table.add_column("severity", overflow="fold")
        table.add_column("meaning", overflow="fold")
        for c in CODES.values():
            table.add_row(
                Text(c.code), Text(c.severity, style=_SEVERITY_STYLE[c.severity]), Text(c.summary)
            )
        _console(args.width, sys.stdout).print(table)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grad-audit``."""
    parser = argparse.ArgumentParser(
        prog="grad-audit",
        description="Read and check the gradient audits written by grad_callbacks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    report = sub.add_parser(
        "report",
        help="print the audit of a run (or of every run under a directory)",
        description=(
            "Print the gradient audit of RUN_DIR: a grad_audit.json file, a run's log directory, "
            "or a directory holding several runs (one section per report found)."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="report file or directory")
    report.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default=None,
        help="exit with code 1 when any finding reaches this severity",
    )
    report.add_argument(
        "--format", choices=("text", "md", "json"), default="text", help="output format"
    )
    report.add_argument(
        "--plot",
        metavar="OUT_DIR",
        default=None,
        help="write one PNG per run of its grad_audit/ TensorBoard scalars, findings marked",
    )
    report.add_argument("--width", type=int, default=None, help="text width (default: terminal)")
    report.add_argument(
        "-v", "--verbose", action="store_true", help="also print each finding's full message"
    )
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser(
        "demo", help="train a small model with planted gradient bugs and show the audit"
    )
    demo.add_argument(
        "--out", default=DEFAULT_DEMO_DIR, help=f"output directory (default {DEFAULT_DEMO_DIR})"
    )
    demo.set_defaults(func=cmd_demo)

    codes = sub.add_parser("codes", help="list the stable finding codes")
    codes.add_argument("--format", choices=("text", "md", "json"), default="text")
    codes.add_argument("--width", type=int, default=None, help="text width (default: terminal)")
    codes.set_defaults(func=cmd_codes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``grad-audit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["report", "lightning_logs", "--fail-on", "error"])  # doctest: +SKIP
        1
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

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
from grad_callbacks.render import (
    SEVERITY_STYLE,
    console,
    md_cell,
    render_json,
    render_markdown,
    render_text,
)
from grad_callbacks.sinks.report import find_reports, is_url, load_report

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2

DEFAULT_DEMO_DIR = "./grad_audit_demo"
#: Path components naming a run outside the working directory (``name/version`` and the root).
LABEL_PARTS = 3

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

    path: Path | str  # str: an fsspec URL
    title: str
    report: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The run's directory as a path a reader recognises: relative to the working directory
        when under it, else its last :data:`LABEL_PARTS` components
        (``lightning_logs/text_buggy/version_0``); a URL's directory as it is."""
        if isinstance(self.path, str):
            return self.path.rsplit("/", 1)[0]
        directory = self.path.parent.resolve()
        try:
            return directory.relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return "/".join(directory.parts[-LABEL_PARTS:])

    @property
    def slug(self) -> str:
        """A file name stem for its outputs, after :attr:`label`
        (``lightning_logs/text_buggy/version_0`` -> ``lightning_logs_text_buggy_version_0``)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.label.strip("/")).strip("._")
        return slug or "run"

    @property
    def directory(self) -> Path | str:
        """The run's log directory (where the report and the event files are)."""
        if isinstance(self.path, str):
            return self.path.rsplit("/", 1)[0]
        return self.path.parent


# ---------------------------------------------------------------------------- loading
def _title(path: Path | str, root: Path | str) -> str:
    if isinstance(path, str):  # a URL under the URL root
        parent, base = path.rsplit("/", 1)[0], str(root).rstrip("/")
        rel = parent[len(base) :].strip("/") if parent.startswith(base) else ""
        return rel or parent
    assert isinstance(root, Path)
    base = root if root.is_dir() else root.parent
    try:
        rel = path.parent.resolve().relative_to(base.resolve())
    except ValueError:
        rel = path.parent
    return str(path.parent) if str(rel) == "." else rel.as_posix()


def load_run(path: Path | str, root: Path | str) -> Run:
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

    ``run_dir`` may also be a report file under another name (e.g. a downloaded CI artifact),
    or an fsspec URL (``s3://bucket/run``, ``memory://...``): reports are read through
    Lightning's filesystem layer.
    """
    root: Path | str = str(run_dir) if is_url(run_dir) else Path(run_dir)
    runs: list[Run] = []
    errors: list[str] = []
    paths = find_reports(root) if isinstance(root, str) or not root.is_file() else [root]
    for path in paths:
        try:
            runs.append(load_run(path, root))
        except ReportError as exc:
            errors.append(str(exc))
    return runs, errors


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
            scalars, run.findings, Path(out_dir) / f"{name}.png", title=f"grad_audit: {run.label}"
        )
        written.append(path)
        stream.write(f"wrote {path}\n")
    return written


# ---------------------------------------------------------------------------- commands
def cmd_report(args: argparse.Namespace) -> int:
    """``grad-audit report``."""
    root = args.run_dir if is_url(args.run_dir) else Path(args.run_dir)
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
    if args.steps is not None:
        return int(run_demo(args.out, max_steps=args.steps))
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
        lines += [f"| `{c.code}` | {c.severity} | {md_cell(c.summary)} |" for c in CODES.values()]
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
                Text(c.code), Text(c.severity, style=SEVERITY_STYLE[c.severity]), Text(c.summary)
            )
        console(args.width, sys.stdout).print(table)
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
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (default: two epochs, 32 or 64 steps)",
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

"""How ``grad-audit report`` prints a run: text (rich), markdown and JSON.

Every format says the same things about a run: its status, what the audit cost (the report's
``overhead`` section, each key with its value, whatever the audit measured), each check's steps
checked, time, method and fallback (any field a check adds to its section of the report), why a
check checked no step, and the findings.

Example:
    >>> format_value(0.1234567), format_value({"a": 1, "b": None})
    ('0.1235', 'a=1, b=none')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from grad_callbacks.findings import CODES, SEVERITY_RANK, Finding

if TYPE_CHECKING:
    from grad_callbacks.cli import Run

#: How many parameter names a table cell shows before "+N more".
MAX_PARAMS_SHOWN = 3
#: Console width when stdout is not a terminal (CI logs) and COLUMNS is not set.
DEFAULT_PIPE_WIDTH = 150
#: Below this width findings are printed as blocks instead of a table.
NARROW_WIDTH = 120
#: The fields every check's section of the report has; any other field is printed as it is.
CHECK_FIELDS = frozenset({"name", "state_key", "settings", "steps_checked", "seconds", "findings"})

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


# ---------------------------------------------------------------------------- values
def format_value(value: Any) -> str:
    """A report value as text: floats with 4 significant digits, None as ``none``, mappings as
    ``key=value`` pairs, lists comma-separated.

    Example:
        >>> format_value([1, 2.0]), format_value(True), format_value(1e-7)
        ('1, 2', 'true', '1e-07')
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _share(value: Any) -> str | None:
    return f"{100 * value:.3g}%" if isinstance(value, (int, float)) else None


def _duration(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.2f} s"


# ---------------------------------------------------------------------------- run parts
def params_cell(params: Sequence[str]) -> str:
    """Up to :data:`MAX_PARAMS_SHOWN` names, then ``+N more``."""
    shown = ", ".join(params[:MAX_PARAMS_SHOWN])
    extra = len(params) - MAX_PARAMS_SHOWN
    return shown + (f" +{extra} more" if extra > 0 else "")


def fix_text(finding: Finding) -> str:
    """The fix column: the code's usual fix; for a skipped check, why it skipped."""
    reason = finding.data.get("reason") if finding.code == "check-skipped" else None
    if isinstance(reason, str) and reason:
        return reason
    info = CODES.get(finding.code)
    return info.fix if info is not None else "(unknown code: see the finding's message)"


def sorted_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Worst first, then by first step and code."""
    return sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], f.step, f.code))


def _versions(report: Mapping[str, Any]) -> str:
    versions = report.get("versions") or {}
    if not isinstance(versions, Mapping):
        return str(versions)
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def header_parts(run: Run) -> list[str]:
    """Status, steps, world size and versions of the run."""
    r = run.report
    return [
        f"status: {r.get('status', '?')}",
        f"global_step: {r.get('global_step', '?')}",
        f"world size: {r.get('world_size', '?')}",
        f"versions: {_versions(r)}",
    ]


def cost_summary(report: Mapping[str, Any]) -> str:
    """One sentence on what the audit cost and how much of the run it watched: the steady state
    (what ``max_overhead`` budgets) against the budget, the one-time audit of the first step,
    and the whole run.

    Example:
        >>> cost_summary({"overhead": {"measured": 0.021, "max_overhead": 0.03,
        ...                            "watched_share": 0.25}})
        'cost: the audit took 2.1% of training time (budget 3%); it watched 25% of the batches'
        >>> cost_summary({"overhead": {"measured": 0.5, "max_overhead": 0.03,
        ...     "one_time": {"seconds": 1.2, "training_steps": 150.0},
        ...     "steady_state": {"from_step": 100, "measured": 0.012}}})
        'cost: steady state (from step 100): 1.2% of training time (budget 3%); one-time audit of the first step: 1.20 s = 150 training steps; whole run: the audit took 50% of training time'
        >>> cost_summary({})
        'cost: not measured (no overhead budget: GradientAudit(max_overhead=None) or checks used alone)'
    """  # noqa: E501
    overhead = report.get("overhead")
    if not isinstance(overhead, Mapping) or not overhead:
        return (
            "cost: not measured (no overhead budget: GradientAudit(max_overhead=None) or checks "
            "used alone)"
        )
    parts = []
    budget = _share(overhead.get("max_overhead"))
    within = f" (budget {budget})" if budget is not None else ""
    steady = overhead.get("steady_state")
    if isinstance(steady, Mapping) and "measured" in steady:
        since = f"from step {steady.get('from_step', '?')}"
        share = _share(steady.get("measured"))
        if share is None:
            parts.append(f"steady state ({since}): not reached in this run{within}")
        else:
            parts.append(f"steady state ({since}): {share} of training time{within}")
        within = ""  # the budget is the steady state's
    one_time = overhead.get("one_time")
    if isinstance(one_time, Mapping) and isinstance(one_time.get("seconds"), (int, float)):
        text = f"one-time audit of the first step: {_duration(float(one_time['seconds']))}"
        steps = one_time.get("training_steps")
        if isinstance(steps, (int, float)):
            text += f" = {steps:.3g} training steps"
        parts.append(text)
    measured = _share(overhead.get("measured"))
    if measured is not None:
        whole = "whole run: " if parts else ""
        parts.append(f"{whole}the audit took {measured} of training time{within}")
    watched = _share(overhead.get("watched_share"))
    if watched is not None:
        parts.append(f"it watched {watched} of the batches")
    return "cost: " + ("; ".join(parts) if parts else "see the overhead fields")


def overhead_items(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every field of the report's ``overhead`` section, as ``(key, value)`` text, in order."""
    overhead = report.get("overhead")
    if not isinstance(overhead, Mapping):
        return []
    return [(str(k), format_value(v)) for k, v in overhead.items()]


def check_line(check: Mapping[str, Any]) -> str:
    """One check's line: steps checked, time, any other field of its section, and why it
    checked no step when it did not.

    Example:
        >>> check_line({"name": "AutogradCheck", "steps_checked": 0, "seconds": 0.0001,
        ...             "idle_reason": "no custom Function", "findings": []})
        'AutogradCheck: 0 steps checked, 0.1 ms; why no step: no custom Function'
    """
    steps = check.get("steps_checked", "?")
    seconds = check.get("seconds")
    secs = _duration(seconds) if isinstance(seconds, (int, float)) else "? s"
    noun = "step" if steps == 1 else "steps"
    parts = [f"{check.get('name', '?')}: {steps} {noun} checked, {secs}"]
    for key, value in check.items():
        if key in CHECK_FIELDS or key == "idle_reason":
            continue
        parts.append(f"{key}: {format_value(value)}")
    if steps == 0:
        reason = check.get("idle_reason")
        parts.append(f"why no step: {reason or 'not recorded in this report'}")
    return "; ".join(parts)


def check_lines(run: Run) -> list[str]:
    """:func:`check_line` of every check of the run."""
    return [
        check_line(c) for c in run.report.get("checks", []) or [] if isinstance(c, Mapping)
    ]


# ---------------------------------------------------------------------------- text
def console_width(width: int | None, stream: TextIO) -> int | None:
    """The width to print at: ``width``, the terminal's (None), or ``COLUMNS`` / 150."""
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


def console(width: int | None, stream: TextIO) -> Any:
    """A rich console printing to ``stream`` (no colour codes when it is not a terminal)."""
    from rich.console import Console

    return Console(
        file=stream,
        soft_wrap=False,
        width=console_width(width, stream),
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
    for f in sorted_findings(findings):
        table.add_row(
            Text(f.check),
            Text(f.code),
            Text(f.severity, style=SEVERITY_STYLE.get(f.severity, "")),
            Text(str(f.step)),
            Text(str(f.count)),
            Text(params_cell(f.params)),
            Text(fix_text(f)),
        )
    return table


def _grid(rows: Sequence[tuple[str, str]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(Text(label + ":"), Text(value))
    return grid


def _print_stacked(out: Any, findings: Sequence[Finding]) -> None:
    """The table's content as one block per finding, for consoles too narrow for a table."""
    from rich.padding import Padding
    from rich.text import Text

    for f in sorted_findings(findings):
        out.print(
            Text.assemble((f.severity, SEVERITY_STYLE.get(f.severity, "")), " ", (f.code, "bold"))
        )
        rows = [
            ("check", f.check),
            ("first step", str(f.step)),
            ("count", str(f.count)),
            ("parameters", params_cell(f.params) or "-"),
            ("fix", fix_text(f)),
        ]
        out.print(Padding(_grid(rows), (0, 0, 0, 2), expand=False))


def render_text(
    runs: Sequence[Run], stream: TextIO, width: int | None = None, verbose: bool = False
) -> None:
    """Print every run as a header, its cost, its checks and a rich table (wrapped, never
    truncated).

    Below :data:`NARROW_WIDTH` columns each finding is printed as a block of lines instead.

    Args:
        runs: the loaded runs.
        stream: where to print.
        width: text width; default: the terminal's, or ``COLUMNS`` / 150 when not a terminal.
        verbose: also print each finding's full message.
    """
    from rich.padding import Padding
    from rich.text import Text

    out = console(width, stream)
    for i, run in enumerate(runs):
        if i:
            out.print()
        out.rule(Text(run.title, style="bold"), align="left")
        out.print(Text(" | ".join(header_parts(run))))
        if run.report.get("error"):
            out.print(Text(f"error: {run.report['error']}", style="red"))
        out.print(Text(cost_summary(run.report)))
        for key, value in overhead_items(run.report):
            out.print(Padding(Text(f"{key}: {value}"), (0, 0, 0, 2), expand=False))
        out.print(Text("checks:"))
        for line in check_lines(run):
            out.print(Padding(Text(line), (0, 0, 0, 2), expand=False))
        if not run.findings:
            out.print(Text("No findings.", style="green"))
            continue
        if out.width < NARROW_WIDTH:
            _print_stacked(out, run.findings)
        else:
            out.print(_findings_table(run.findings))
        if verbose:
            for f in sorted_findings(run.findings):
                out.print(Text.assemble((f"[{f.code} @ step {f.step}] ", "bold"), f.message))


# ---------------------------------------------------------------------------- markdown
def md_cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(runs: Sequence[Run], stream: TextIO, verbose: bool = False) -> None:
    """Print every run as a markdown section: header, cost, checks, findings table (and the
    messages if verbose)."""
    out: list[str] = []
    for run in runs:
        out.append(f"## {run.title}")
        out.append("")
        for part in header_parts(run):
            out.append(f"- {part}")
        if run.report.get("error"):
            out.append(f"- error: `{md_cell(str(run.report['error']))}`")
        out.append(f"- {md_cell(cost_summary(run.report))}")
        for key, value in overhead_items(run.report):
            out.append(f"  - {key}: {md_cell(value)}")
        out.append("- checks:")
        for line in check_lines(run):
            out.append(f"  - {md_cell(line)}")
        out.append("")
        if not run.findings:
            out.append("No findings.")
        else:
            out.append("| check | code | severity | first step | count | parameters | fix |")
            out.append("|---|---|---|---|---|---|---|")
            for f in sorted_findings(run.findings):
                out.append(
                    f"| {md_cell(f.check)} | `{f.code}` | {f.severity} | {f.step} | {f.count} "
                    f"| {md_cell(params_cell(f.params))} | {md_cell(fix_text(f))} |"
                )
            if verbose:
                out.append("")
                out += [
                    f"- `{f.code}` @ step {f.step}: {md_cell(f.message)}"
                    for f in sorted_findings(run.findings)
                ]
        out.append("")
    stream.write("\n".join(out))


# ---------------------------------------------------------------------------- json
def render_json(runs: Sequence[Run], stream: TextIO) -> None:
    """Print the loaded reports as a JSON list (each with a ``path`` key added)."""
    payload = [{"path": str(run.path), **run.report} for run in runs]
    stream.write(json.dumps(payload, indent=2, default=str) + "\n")

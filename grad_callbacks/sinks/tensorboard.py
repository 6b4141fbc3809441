"""The TensorBoard sink: findings as a text table, the custom-scalars layout, scalars.

Scalars go through the attached Lightning loggers the audit's ``loggers`` selection names (by
default every one, so CSV and other loggers get them too: :mod:`grad_callbacks.sinks.loggers`);
text and the layout need a selected ``TensorBoardLogger``. Everything is written from global
rank 0 only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from grad_callbacks.findings import Finding
from grad_callbacks.sinks import loggers
from grad_callbacks.sinks.loggers import LoggerSelection

if TYPE_CHECKING:
    import lightning.pytorch as pl

FINDINGS_TAG = "grad_audit/findings"
LAYOUT_TITLE = "Gradient audit"


def tensorboard_writer(trainer: pl.Trainer, selection: LoggerSelection = "all") -> Any | None:
    """The ``SummaryWriter`` of the first selected TensorBoardLogger, on rank 0; else None.

    ``selection``: which of the trainer's loggers the audit writes to
    (:mod:`grad_callbacks.sinks.loggers`).
    """
    if not trainer.is_global_zero:
        return None
    return loggers.tensorboard_writer(loggers.select_loggers(trainer.loggers, selection))


def log_scalars(
    trainer: pl.Trainer,
    metrics: Mapping[str, float],
    step: int,
    selection: LoggerSelection = "all",
) -> None:
    """Send scalars to the selected loggers of the trainer (rank 0 only), stamped with ``step``,
    called as Lightning calls them: ``log_metrics(metrics=..., step=...)``."""
    if not metrics or not trainer.is_global_zero:
        return
    loggers.log_scalars(loggers.select_loggers(trainer.loggers, selection), metrics, step)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def findings_markdown(findings: Iterable[Finding], step: int | None = None) -> str:
    """The findings as markdown for TensorBoard's Text tab: a table of short columns, then each
    finding's message in full, numbered as in the table.

    The table holds only short cells (number, severity, code, check, first step, count), so that
    at the Text tab's default width no column is squeezed into wrapping letter by letter; the
    messages (what happened, where, the fix) follow as a numbered list, whole.

    Args:
        findings: the findings, in the order to show them.
        step: the step the table is written at (counts are as of that step).

    Example:
        >>> findings_markdown([])
        'No findings.'
        >>> from grad_callbacks.findings import make_finding
        >>> f = make_finding("stale-grad", check="ZeroGradCheck", step=3, message="old grad")
        >>> print(findings_markdown([f], step=3))
        | # | severity | code | check | first step | count |
        |---|---|---|---|---|---|
        | 1 | warning | `stale-grad` | ZeroGradCheck | 3 | 1 |
        <BLANKLINE>
        1. **`stale-grad`** (ZeroGradCheck, step 3): old grad
        <BLANKLINE>
        Counts as of step 3; the run's grad_audit.json has the final ones.
    """
    findings = list(findings)
    if not findings:
        return "No findings."
    rows = [
        f"| {i} | {f.severity} | `{f.code}` | {f.check} | {f.step} | {f.count} |"
        for i, f in enumerate(findings, 1)
    ]
    messages = [
        f"{i}. **`{f.code}`** ({f.check}, step {f.step}): {_cell(f.message)}"
        for i, f in enumerate(findings, 1)
    ]
    head = "| # | severity | code | check | first step | count |\n|---|---|---|---|---|---|\n"
    text = head + "\n".join(rows) + "\n\n" + "\n".join(messages)
    if step is not None:
        text += f"\n\nCounts as of step {step}; the run's grad_audit.json has the final ones."
    return text


def findings_signature(findings: Iterable[Finding]) -> frozenset[tuple[str, str, tuple[str, ...]]]:
    """What makes the findings table change: each finding's code, severity and parameters (not
    its count, which grows at every step a bug repeats)."""
    return frozenset((f.code, f.severity, tuple(f.params)) for f in findings)


def text_summary(tag: str, text: str) -> Any:
    """A TensorBoard text summary under exactly ``tag``.

    ``SummaryWriter.add_text`` appends ``/text_summary`` to the tag; the findings table lives
    at :data:`FINDINGS_TAG` itself, so the summary is built here the way torch builds it.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name="text", content=TextPluginData(version=0).SerializeToString()
        )
    )
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def write_findings_text(writer: Any, findings: Iterable[Finding], step: int) -> None:
    """Write the findings table at :data:`FINDINGS_TAG`."""
    summary = text_summary(FINDINGS_TAG, findings_markdown(findings, step=step))
    writer._get_file_writer().add_summary(summary, step)
    writer.flush()


def write_layout(writer: Any, charts: Mapping[str, Iterable[str]]) -> None:
    """Write the custom-scalars layout: one multiline chart per entry of ``charts``.

    Args:
        writer: a ``SummaryWriter``.
        charts: chart title -> tag regexes shown in it.
    """
    layout = {LAYOUT_TITLE: {title: ["Multiline", list(tags)] for title, tags in charts.items()}}
    writer.add_custom_scalars(layout)

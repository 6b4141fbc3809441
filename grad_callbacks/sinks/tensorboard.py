"""The TensorBoard sink: findings as a text table, the custom-scalars layout, scalars.

Scalars go through every attached Lightning logger (so CSV and other loggers get them too);
text and the layout need a ``TensorBoardLogger``. Everything is written from global rank 0 only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from grad_callbacks.findings import Finding

if TYPE_CHECKING:
    import lightning.pytorch as pl

FINDINGS_TAG = "grad_audit/findings"
LAYOUT_TITLE = "Gradient audit"


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoardLogger, on rank 0; else None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger of the trainer (rank 0 only), stamped with ``step``."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def findings_markdown(findings: Iterable[Finding]) -> str:
    """The findings as a markdown table (the Text tab renders markdown).

    Example:
        >>> findings_markdown([])
        'No findings.'
    """
    rows = [
        f"| {f.severity} | `{f.code}` | {f.check} | {f.step} | {f.count} | "
        f"{_cell(', '.join(f.params[:5]) + (' ...' if len(f.params) > 5 else ''))} | "
        f"{_cell(f.message)} |"
        for f in findings
    ]
    if not rows:
        return "No findings."
    head = "| severity | code | check | first step | count | parameters | message |\n"
    return head + "|---|---|---|---|---|---|---|\n" + "\n".join(rows)


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
    summary = text_summary(FINDINGS_TAG, findings_markdown(findings))
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

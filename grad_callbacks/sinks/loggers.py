"""Which of the trainer's loggers the audit writes to, and how it calls them.

The audit's scalars (``grad_audit/...``) go to the loggers a selection names, through
``Logger.log_metrics(metrics=..., step=...)`` with keywords, as Lightning itself calls it; the
TensorBoard extras (findings text, custom-scalars layout, histograms) go to the first selected
``TensorBoardLogger``. A selection is one of:

* ``"all"`` (the default): every logger of the trainer;
* ``"tensorboard"``: the ``TensorBoardLogger`` s only;
* ``None``: none (the report file and ``findings`` only);
* a sequence of logger classes, or of class names (for a YAML config): the loggers that are
  instances of one of them.

Example:
    >>> from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    >>> loggers = [CSVLogger("logs"), TensorBoardLogger("logs")]
    >>> [type(x).__name__ for x in select_loggers(loggers, "tensorboard")]
    ['TensorBoardLogger']
    >>> [type(x).__name__ for x in select_loggers(loggers, ["CSVLogger"])]
    ['CSVLogger']
    >>> select_loggers(loggers, None)
    []
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

#: A choice of loggers (see the module docstring).
LoggerSelection = str | Sequence[str | type] | None
_NAMED = {"all": None, "tensorboard": ("TensorBoardLogger",)}


def check_selection(selection: LoggerSelection) -> LoggerSelection:
    """Validate a selection; returns it (a sequence as a tuple).

    Raises:
        ValueError: for anything but the forms in the module docstring.
    """
    if selection is None:
        return None
    if isinstance(selection, str):
        if selection not in _NAMED:
            raise ValueError(
                f"loggers must be 'all', 'tensorboard', None or a sequence of logger classes "
                f"or class names, got {selection!r}"
            )
        return selection
    items = tuple(selection)
    for item in items:
        if not isinstance(item, (str, type)):
            raise ValueError(
                f"loggers: each item must be a logger class or a class name, got {item!r}"
            )
    return items


def _matches(logger: Logger, kinds: Sequence[str | type]) -> bool:
    names = {klass.__name__ for klass in type(logger).__mro__}
    return any(isinstance(logger, k) if isinstance(k, type) else k in names for k in kinds)


def select_loggers(loggers: Sequence[Logger], selection: LoggerSelection) -> list[Logger]:
    """The loggers of ``loggers`` that ``selection`` names, in their order."""
    if selection is None:
        return []
    kinds = _NAMED[selection] if isinstance(selection, str) else selection
    if kinds is None:
        return list(loggers)
    return [logger for logger in loggers if _matches(logger, kinds)]


def describe(selection: LoggerSelection) -> Any:
    """The selection as plain data, for the report's settings."""
    if selection is None or isinstance(selection, str):
        return selection
    return [k if isinstance(k, str) else k.__name__ for k in selection]


def log_scalars(loggers: Sequence[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to each logger the way Lightning does (keywords)."""
    if not metrics:
        return
    for logger in loggers:
        logger.log_metrics(metrics=dict(metrics), step=step)


def tensorboard_writer(loggers: Sequence[Logger]) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` among ``loggers``; else None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None

"""The audit's clock: wall time without the garbage collector's pauses.

Pure Python. A collection of the older generations stops the process for as long as the whole
heap takes to walk (hundreds of milliseconds beside a ``transformers`` model), wherever an
allocation happens to trigger it. One landing inside an audit hook is not the audit's cost: its
length follows the heap, not the audit. While installed (:func:`install`), a ``gc.callbacks``
entry adds up the collections' time, and :func:`now` is ``time.perf_counter()`` less that sum,
so a section timed with it leaves them out; the training time around it keeps them.

Example:
    >>> import gc
    >>> install()
    >>> start = now()
    >>> _ = gc.collect()
    >>> now() - start < perf_counter() - start  # the collection is left out
    True
    >>> uninstall()
"""

from __future__ import annotations

import gc
from time import perf_counter  # bound at import: a mocked time.perf_counter never sees ours
from typing import Any

#: Seconds the garbage collector has run while the clock was installed (read it inline where a
#: call matters: ``time.perf_counter() - GC_SECONDS[0]`` is :func:`now`).
GC_SECONDS = [0.0]
_started = [0.0]
_users = [0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = perf_counter()
    else:
        GC_SECONDS[0] += perf_counter() - _started[0]


def install() -> None:
    """Start adding up the collections' time (nested calls are counted)."""
    _users[0] += 1
    if _users[0] == 1 and _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def uninstall() -> None:
    """Undo one :func:`install`; the last one removes the callback."""
    if _users[0] > 0:
        _users[0] -= 1
    if _users[0] == 0 and _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)


def now() -> float:
    """``time.perf_counter()`` without the collections' time so far (see the module doc)."""
    return perf_counter() - GC_SECONDS[0]

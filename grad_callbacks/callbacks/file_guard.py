"""Files inside a recomputation: a ``training_step`` run again must not write the user's files a
second time.

While an :func:`~grad_callbacks.callbacks.recompute.isolated` block is open in a thread,
``open()`` (``builtins.open`` and ``io.open``, which ``pathlib`` and ``json.dump(obj, open(...))``
go through) called in that thread for writing only (modes with ``w``, ``a`` or ``x`` and no
``+``) returns an in-memory file whose contents are dropped: the real step already wrote the file,
the recomputation writes nothing. A file opened for reading and writing (``+``) cannot be faked
that way: it is opened as asked, and named in the block's list of changes that could not be
undone (the check then reports ``check-skipped`` naming it and stops recomputing). Other threads
call the original ``open``. Writes that do not go through ``open()`` (``os.open``, C++ writers
such as ``torch.save`` to a path, sockets) are not seen.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "log.txt")
    >>> lost = []
    >>> with files_guarded(lost):
    ...     with open(path, "a") as f:
    ...         _ = f.write("written again")
    >>> os.path.exists(path), lost
    (False, [])
"""

from __future__ import annotations

import builtins
import functools
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
_lock = threading.Lock()
_users = 0
_saved: Any = None


def _mode_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    mode = args[0] if args else kwargs.get("mode", "r")
    return mode if isinstance(mode, str) else "r"


class _Discarded(io.StringIO):
    """A text file whose writes go nowhere (its ``name`` is the file's)."""

    def __init__(self, name: Any) -> None:
        super().__init__()
        self.name = name


class _DiscardedBytes(io.BytesIO):
    def __init__(self, name: Any) -> None:
        super().__init__()
        self.name = name


def _guarded_open(original: Any) -> Any:
    @functools.wraps(original)
    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        stack: list[list[str]] | None = getattr(_local, "stack", None)
        mode = _mode_of(args, kwargs)
        if not stack or not any(c in mode for c in "wax+") or isinstance(file, int):
            return original(file, *args, **kwargs)
        if "+" in mode:
            what = f"the file {os.fspath(file)!r} (opened with mode {mode!r}: written and read)"
            if what not in stack[-1]:
                stack[-1].append(what)
            return original(file, *args, **kwargs)
        return _DiscardedBytes(file) if "b" in mode else _Discarded(file)

    return guarded


@contextmanager
def files_guarded(lost: list[str]) -> Iterator[None]:
    """In this thread, for the block: files opened for writing are in-memory files whose
    contents are dropped; one opened for reading and writing is opened and named in ``lost``."""
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = builtins.open
            builtins.open = io.open = _guarded_open(_saved)
        _users += 1
    stack: list[list[str]] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(lost)
    try:
        yield
    finally:
        stack.pop()
        with _lock:
            _users -= 1
            if _users == 0:
                builtins.open = io.open = _saved
                _saved = None

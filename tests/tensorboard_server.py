"""A ``tensorboard`` server on 127.0.0.1 for tests and the docs' screenshots.

Used by ``tests/test_tensorboard_server.py`` and ``docs/make_screenshots.py``: both start the
real server over a log directory and read its HTTP data API, as the web UI does.

Example:
    >>> with tensorboard_server(Path("runs")) as (server, port):  # doctest: +SKIP
    ...     get_json(port, "/data/runs")
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on :data:`HOST` that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def get_json(port: int, route: str, **query: str) -> Any:
    """The JSON answer of the server on ``port`` to ``route`` (with ``query`` parameters)."""
    url = f"http://{HOST}:{port}{route}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        if response.status != 200:
            raise ConnectionError(f"{url} answered {response.status}")
        return json.loads(response.read().decode("utf-8"))


@contextlib.contextmanager
def tensorboard_server(
    logdir: Path, stderr: IO[bytes] | int = subprocess.DEVNULL
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``tensorboard`` over ``logdir`` on 127.0.0.1 (never another interface).

    Yields the process and its port as soon as it is started (poll :func:`get_json` until the
    runs are served); terminates it on exit.
    """
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "tensorboard.main",
            "--logdir", str(logdir),
            "--host", HOST,
            "--port", str(port),
            "--reload_interval", "1",
            "--load_fast", "false",  # the Python data loader: no extra data server binary
        ],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        yield server, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)

"""Run the server and the worker from an empty, private working directory.

For: ``som serve`` and ``som worker``, which call :func:`enter_empty_cwd` at start, after the
settings are read and their relative paths made absolute. Whatever a parser might resolve against
the working directory (the class of bug where an ONNX file named ``keys/kek.json`` as its
"external data") then finds nothing: the folder is a fresh ``mkdtemp`` (mode 0500, owned by the
service) outside the data directory. This is defence in depth; the parsers themselves never let a
request-controlled path reach the file system (:func:`crypto.he.onnx_import.load_onnx`).

Not for: the library or the tests' in-process apps (they keep the caller's working directory).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from pathlib import Path

from marketplace.settings import Settings

__all__ = ["enter_empty_cwd"]


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url[len(prefix) :] not in ("", ":memory:"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def enter_empty_cwd(settings: Settings) -> Path:
    """Make ``settings``' paths absolute, then ``chdir`` into a new empty private folder; returns it."""
    settings.data_dir = settings.data_dir.resolve()
    if settings.database_url:
        settings.database_url = _absolute_sqlite(settings.database_url)
    empty = Path(tempfile.mkdtemp(prefix="som-cwd-"))
    os.chdir(empty)
    empty.chmod(0o500)  # nothing is ever written here
    atexit.register(_remove, empty)
    return empty


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()

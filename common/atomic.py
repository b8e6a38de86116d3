"""Files that are whole or not there: written aside, synced, renamed, the folder synced.

A crash, a signal or a full disk at any instant leaves the previous version of the file
or the new one, never a part of either: the bytes go to ``<path>.tmp``, which is flushed
and ``fsync``ed before ``os.replace`` puts it in place, and the folder is ``fsync``ed so
that the rename itself survives a power cut. A write that fails removes its temporary
file (on a full disk it holds the space the next write needs) and raises the
``OSError``; the file at ``path`` is then as it was.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, IO


def write_atomic(path: str, fill: Callable[[IO[bytes]], None], *, mode: int = 0o666) -> None:
    """Write ``path`` whole with ``fill(file)`` (binary); a new file gets ``mode`` (less the
    umask: 0o600 for a secret). Raises ``OSError``."""
    tmp = os.fspath(path) + ".tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a signal's exception too: no half-written temporary left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    sync_folder(os.path.dirname(os.fspath(path)) or ".")


def write_bytes_atomic(path: str, data: bytes, *, mode: int = 0o666) -> None:
    write_atomic(path, lambda f: f.write(data), mode=mode)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, data: Any, *, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def sync_folder(folder: str) -> None:
    """``fsync`` a folder (its entries: a rename in it). A file system that cannot
    (some network ones refuse) is left as it is: the rename has happened all the same."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

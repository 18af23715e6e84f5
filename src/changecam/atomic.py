"""Atomic, durable file writes: the one writer behind every file changecam produces.

A crash, a kill or a full disk during a write never leaves a half-written file at the target
path: the data goes to a hidden temporary file beside it, is flushed and fsynced, and is then
renamed over the target with :func:`os.replace` (atomic on POSIX and Windows); the folder is
fsynced too, so the rename itself survives a power cut. On any error the temporary file is
removed and the target is left as it was.

Checkpoints, JSON, CSV, PNG, NPZ and the synthetic dataset (a whole folder, see
:func:`atomic_directory`) all go through here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the file to (re)write; its folder is created if needed.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).

    Yields:
        the open temporary file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling folder; on success it becomes ``path`` (which must not exist).

    Yields:
        the temporary folder to write into. On an error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it before writing it anew")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


__all__ = ["atomic_directory", "atomic_open", "write_bytes", "write_json", "write_text"]

"""Atomic, durable file writes: the one writer behind every file changecam produces.

A crash, a kill or a full disk during a write never leaves a half-written file at the target
path: the data goes to a hidden temporary file beside it
(``.<name>.cc<pid>-<host><random>.tmp``, a name no output glob such as ``*.png`` or ``*.json``
matches), is flushed and fsynced, and is then renamed over the target with :func:`os.replace`
(atomic on POSIX and Windows); the folder is fsynced too, so the rename itself survives a power
cut. On any error the temporary file is removed and the target is left as it was. A killed
process cannot remove its temporary file: :func:`remove_stale_temporaries` does, at the next
start of a command in that folder (only files of this pattern whose process is gone).

A full device or quota (``ENOSPC``, ``EDQUOT``) raises :class:`DiskFullError`, "no space left on
device while writing <path>", also where the OS error is buried in a chained exception (e.g.
``torch.save``'s ``unexpected pos``). JSON is strict: NaN and infinities are written as
``null`` (:func:`strict_json`).

Checkpoints, JSON, JSON lines (:func:`append_json_line`), CSV, PNG (one file, or the files
of one predicted pair together: :func:`write_files`), NPZ and the synthetic
dataset (a whole folder, see :func:`atomic_directory`) all go through here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)
# one host's temporaries are told apart from another's on a shared file system
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_TEMPORARY = re.compile(r"^\..+\.cc(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{6}\.tmp$")


class DiskFullError(OSError):
    """The device or the user's quota is full: nothing more can be written, so the command stops."""

    def __init__(self, path: str | Path, code: int = errno.ENOSPC) -> None:
        super().__init__(code, f"no space left on device while writing {path}")
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # OSError pickles its (errno, strerror) args, which __init__ does not take: a sweep's
        # joblib worker or the CAM worker process could not send the error back
        return type(self), (self.filename, self.errno)


def disk_full_error(err: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` that ``err`` or an exception chained to it is or stands for.

    A :class:`DiskFullError` in the chain wins; else an ``ENOSPC``/``EDQUOT`` :class:`OSError`
    is turned into one (naming its ``filename``); ``None`` when the disk is not the cause.
    """
    chain, seen, raw = [err], set(), None
    while chain:
        current = chain.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS and raw is None:
            raw = current
        chain += [current.__cause__, current.__context__]
    if raw is None:
        return None
    return DiskFullError(raw.filename or "a file (the OS did not say which)", raw.errno)


def _as_disk_full(err: BaseException, path: Path) -> DiskFullError | None:
    """``err`` of a write to ``path`` as a :class:`DiskFullError` naming ``path``, if the disk
    is the cause: an ``ENOSPC``/``EDQUOT`` in its chain, or (for writers such as ``torch.save``
    that report only ``unexpected pos``) a :class:`RuntimeError` on a device with no free block."""
    if isinstance(err, DiskFullError):
        return err
    found = disk_full_error(err)
    if found is not None:
        return DiskFullError(path, found.errno)
    if isinstance(err, RuntimeError):
        try:
            if os.statvfs(path.parent).f_bavail == 0:
                return DiskFullError(path)
        except (AttributeError, OSError):  # no statvfs (Windows) or no folder
            pass
    return None


PROBE_BYTES = 4 << 20  # more than any one tile or strip a GDAL write of ours holds


def probed_disk_full(folder: Path, what: str | Path) -> DiskFullError | None:
    """After a write error that names no cause (GDAL reports a full disk as ``Write error at
    scanline 0``, its ``No space left on device`` only on stderr): whether ``folder``'s device
    or quota is full now, found by writing :data:`PROBE_BYTES` there and removing them; a
    :class:`DiskFullError` naming ``what``, or ``None``."""
    probe = temporary_path(Path(folder) / "disk-probe")
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return DiskFullError(what, err.errno) if err.errno in DISK_FULL_ERRNOS else None
    try:
        chunk = bytes(1 << 20)
        for _ in range(PROBE_BYTES // len(chunk)):
            os.write(descriptor, chunk)
        os.fsync(descriptor)  # file systems that allocate at write-back say so here
    except OSError as err:
        return DiskFullError(what, err.errno) if err.errno in DISK_FULL_ERRNOS else None
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)
    return None


def _name_prefix(name: str) -> str:
    """The start of ``name`` a temporary name keeps: at most 180 bytes of UTF-8, whole
    characters (a name of 255 bytes, the usual limit, leaves room for the token)."""
    # os.fsencode: a name that is not UTF-8 (Latin-1 bytes, held as surrogates) encodes too
    return os.fsencode(name)[:180].decode("utf-8", errors="ignore")


def temporary_path(path: Path) -> Path:
    """A fresh hidden temporary name beside ``path`` that matches no output glob."""
    token = f"cc{os.getpid()}-{_HOST}{secrets.token_hex(3)}"
    return path.with_name(f".{_name_prefix(path.name)}.{token}.tmp")


def _process_is_gone(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows: assume it runs
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def remove_stale_temporaries(folder: str | Path, max_depth: int = 3) -> list[Path]:
    """Remove the temporary files killed changecam processes left in ``folder`` (and its
    sub-folders down to ``max_depth``): files of :func:`temporary_path`'s pattern written on
    this host by a process that no longer runs. Other files are never touched.

    Returns:
        the files removed.
    """
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for current, dirs, files in os.walk(root):
        if len(Path(current).relative_to(root).parts) >= max_depth:
            dirs.clear()
        for name in files:
            match = _TEMPORARY.match(name)
            if match and match["host"] == _HOST and _process_is_gone(int(match["pid"])):
                path = Path(current) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _fsync_path(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        _fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | Path) -> None:
    """Make a file's data, written and closed by another writer (GDAL), durable."""
    # Windows flushes (FlushFileBuffers) only through a handle that may write
    _fsync_path(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)


def fsync_directory(folder: str | Path) -> None:
    """Make the renames inside ``folder`` durable (fsync the folder itself; POSIX only)."""
    _fsync_dir(Path(folder))


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; each folder it creates is fsynced into its own parent, so that
    a file made durable in it, and a log that lists it, do not outlive it after a power cut."""
    made, folder = [], path.parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for created in reversed(made):
            try:
                _fsync_dir(created.parent)
            except PermissionError:  # a folder we may write in but not read: as before
                pass
    except OSError as err:
        full = _as_disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err


# text files name input files, whose names on Linux are bytes: a name that is not UTF-8 is
# written as those bytes (Python holds them as surrogates), not refused after the work is done
TEXT_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the file to (re)write; its folder is created if needed.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).

    Yields:
        the open temporary file.

    Raises:
        DiskFullError: the device or quota is full (the temporary file is removed).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    _make_parent(path)
    tmp = temporary_path(path)
    exclusive = mode.replace("w", "x")  # never write into another writer's file
    try:
        with open(tmp, exclusive, **({} if "b" in mode else TEXT_ENCODING)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = _as_disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_files(contents: Mapping[str | Path, bytes]) -> None:
    """Write several files as one step: every file goes to its temporary (flushed and fsynced)
    first, then all are renamed in a row. An error (a full disk) while writing leaves none of
    them; a kill leaves at most the few renamed in the microseconds between two renames.

    Raises:
        DiskFullError: the device or quota is full (naming the file being written).
    """
    staged: list[tuple[Path, Path]] = []
    renamed: list[Path] = []
    current = Path()
    try:
        for target, data in contents.items():
            current = Path(target)
            _make_parent(current)
            staged.append((temporary_path(current), current))
            with open(staged[-1][0], "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, current in staged:
            os.replace(tmp, current)
            renamed.append(current)
    except BaseException as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for path in renamed:  # a rename failed midway
            path.unlink(missing_ok=True)
        full = _as_disk_full(err, current)
        if full is None or full is err:
            raise
        raise full from err
    for folder in dict.fromkeys(path.parent for _, path in staged):
        _fsync_dir(folder)


def strict_json(data: Any) -> Any:
    """``data`` with what strict JSON cannot hold made plain: non-finite floats become ``None``;
    NumPy and torch scalars and arrays become Python numbers and lists; tuples become lists."""
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    if isinstance(data, float):  # also np.float64, a float subclass
        return float(data) if math.isfinite(data) else None
    if isinstance(data, (str, int, bool)) or data is None:
        return data
    if callable(getattr(data, "tolist", None)):  # NumPy / torch scalars and arrays
        return strict_json(data.tolist())
    return data  # json.dumps names the type it cannot encode


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted, strict JSON atomically (NaN/inf as ``null``)."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    write_text(path, text + "\n")


def append_json_line(path: str | Path, data: Any) -> None:
    """Append ``data`` as one strict JSON line to ``path`` (a JSON-lines log) and fsync it.

    A line is written whole or not at all: on an error (a full disk) the file is cut back to
    its previous length. A kill during the write can leave a partial last line, which
    :func:`changecam.run_log.read_json_lines` skips; the next line starts on a line of its
    own, not joined to it (where the log can be read: a write-only one is appended to as it is).

    Raises:
        DiskFullError: the device or quota is full.
    """
    path = Path(path)
    line = (json.dumps(strict_json(data), sort_keys=True, allow_nan=False) + "\n").encode()
    _make_parent(path)
    created = not path.exists()
    try:
        try:
            fd, readable = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666), True
        except PermissionError:  # a log we may append to but not read
            fd, readable = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666), False
    except OSError as err:  # creating it on a full device
        full = _as_disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err
    start = os.fstat(fd).st_size
    try:
        if readable and start and os.pread(fd, 1, start - 1) != b"\n":  # a killed append's
            line = b"\n" + line  # partial line: this one starts a line of its own
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException as err:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        full = _as_disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling folder; on success it becomes ``path`` (which must not exist).

    The folder has :func:`temporary_path`'s name, so that processes writing the same ``path``
    at once (a sweep's jobs, DDP ranks) do not share one; those a killed process left are
    removed first.

    Yields:
        the temporary folder to write into. On an error it is removed and ``path`` is untouched.

    Raises:
        FileExistsError: ``path`` exists, before or (written by another process) after the
            folder was filled.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it before writing it anew")
    _make_parent(path)
    for stale in path.parent.iterdir():
        match = _TEMPORARY.match(stale.name)
        if (
            stale.name.startswith(f".{_name_prefix(path.name)}.cc")
            and match
            and match["host"] == _HOST
            and _process_is_gone(int(match["pid"]))
        ):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_path(path)
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(path)
        except OSError as err:
            if path.exists():
                raise FileExistsError(f"{path} was written by another process meanwhile") from err
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _as_disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err
    _fsync_dir(path.parent)


__all__ = [
    "DiskFullError",
    "append_json_line",
    "atomic_directory",
    "atomic_open",
    "disk_full_error",
    "fsync_directory",
    "fsync_file",
    "probed_disk_full",
    "remove_stale_temporaries",
    "strict_json",
    "temporary_path",
    "write_bytes",
    "write_files",
    "write_json",
    "write_text",
]

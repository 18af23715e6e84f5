"""The JSON-lines logs that let a killed run resume: predict.py's log of finished pairs and a
GeoTIFF scene's log of finished blocks. Both start with a ``started`` line holding the run's
settings and grow by :func:`changecam.atomic.append_json_line`; this module reads them back
(:func:`read_json_lines`), names what a resume changed (:func:`settings_changes`), lets a
log older than a recorded key resume (:func:`as_logged`), and records the files a run reads so
that a resume tells when one was replaced (:func:`file_record`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_ABSENT = object()
VALUE_CHARS = 60  # a value longer than this is cut in a message


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The log's records (JSON objects), in order; ``[]`` when there is no log.

    A line that is not a whole JSON object (a kill during the append leaves a partial last
    line) is skipped with a warning, once per process for the file as it is (a run reads its
    log in several places).
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
            continue
        seen = (str(path.resolve()), number, line)
        if seen not in _WARNED:
            _WARNED.add(seen)
            log.warning("%s line %d is incomplete (a killed write); ignored", path, number)
    return records


# (file, line number, line) of the incomplete lines warned about in this process
_WARNED: set[tuple[str, int, str]] = set()


# keys a resume record gained after some logs were written: the network the weights went into,
# an input file's content sample, the checkpoint's size and content sample, the ROI mask's file,
# what predict.py's PNG pairs explain (the pairs it changes are predicted again)
RECORDED_SINCE = frozenset(
    {
        "network",
        "sample_sha256",
        "checkpoint_size",
        "checkpoint_sample_sha256",
        "roi_file",
        "explained_prediction",
    }
)


def as_logged(record: Any, logged: Any, added: frozenset[str] = RECORDED_SINCE) -> Any:
    """``record`` without the keys of ``added`` that ``logged`` (the settings an earlier run
    logged) lacks, at any depth: a log written before changecam recorded them resumes as it
    did then."""
    if isinstance(record, dict) and isinstance(logged, dict):
        return {
            key: as_logged(value, logged.get(key), added)
            for key, value in record.items()
            if key in logged or key not in added
        }
    if isinstance(record, list) and isinstance(logged, list) and len(record) == len(logged):
        return [as_logged(r, g, added) for r, g in zip(record, logged, strict=True)]
    return record


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def settings_changes(before: Any, after: Any, key: str = "") -> list[str]:
    """Where two JSON settings records differ, one ``key: before -> after`` per leaf.

    Keys are dotted (``scene.threshold``), list items indexed (``post.sources[1].size``); a key
    only one side has (a log written by an older version) is shown as ``(absent)`` there.
    Lists of different lengths are one change.
    """
    if isinstance(before, dict) and isinstance(after, dict):
        prefix = f"{key}." if key else ""
        return [
            change
            for name in sorted(set(before) | set(after))
            for change in settings_changes(
                before.get(name, _ABSENT), after.get(name, _ABSENT), f"{prefix}{name}"
            )
        ]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            change
            for index, (old, new) in enumerate(zip(before, after, strict=True))
            for change in settings_changes(old, new, f"{key}[{index}]")
        ]
    if before == after:
        return []
    return [f"{key or '(settings)'}: {_shown(before)} -> {_shown(after)}"]


SAMPLE_CHUNKS, SAMPLE_CHUNK_BYTES = 16, 4096


def content_sample(path: Path, size: int) -> str:
    """A hash of 16 chunks of 4 KiB spread evenly over the file (the whole of a file up to
    64 KiB): another file of the same size (a scene, a checkpoint), copied in with the old
    modification time (``cp -p``, ``rsync -a``, ``tar``), differs there, while a change of metadata only (chmod,
    a hard link, a backup's attributes) keeps it. An edit of a few pixels in place that keeps
    the size and the modification time can fall between the chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES:
            digest.update(f.read())
        else:
            for i in range(SAMPLE_CHUNKS):
                f.seek((size - SAMPLE_CHUNK_BYTES) * i // (SAMPLE_CHUNKS - 1))
                digest.update(f.read(SAMPLE_CHUNK_BYTES))
    return digest.hexdigest()[:16]


def file_record(path: Path) -> dict[str, Any]:
    """Path, size, modification time and :func:`content_sample` of a file a run reads (an
    input scene, the checkpoint): what a resume compares to tell that it was replaced."""
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sample_sha256": content_sample(path, stat.st_size),
    }


__all__ = [
    "RECORDED_SINCE",
    "as_logged",
    "content_sample",
    "file_record",
    "read_json_lines",
    "settings_changes",
]

"""Reading an offline W&B run without syncing it: its history records."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768  # the .wandb transaction log is a LevelDB-style log of 32 KiB blocks
HEADER = 7
# wandb.finish() can return before the W&B service has written the run's last records (the
# service outlives the run inside pytest), so a reader waits for the closing ``exit`` record.
COMPLETE_WAIT_S = 60.0


def records(path: Path) -> list:
    """The complete records of a ``.wandb`` log as written so far (a torn tail is left out)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    pos, chunks, out = HEADER, [], []
    while pos + HEADER <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + HEADER])
        pos += HEADER
        if pos + length > len(buf):
            break  # still being written
        chunks.append(buf[pos : pos + length])
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            try:
                record.ParseFromString(b"".join(chunks))
            except DecodeError:
                break
            chunks = []
            out.append(record)
    return out


def complete_records(run_dir: Path) -> list:
    """The records of an offline run once its log is complete (ends with its ``exit``)."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + COMPLETE_WAIT_S
    while True:
        found = records(path)
        if found and found[-1].WhichOneof("record_type") == "exit":
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{path} has no exit record {COMPLETE_WAIT_S:.0f} s after wandb.finish() "
                f"({len(found)} records)"
            )
        time.sleep(0.1)


def exit_code(run_dir: Path) -> int:
    """The exit code an offline run was finished with (W&B shows one other than 0 as failed)."""
    return complete_records(run_dir)[-1].exit.exit_code


def history(run_dir: Path) -> list[dict]:
    """Every ``run.log`` call of an offline run, as {key: decoded value}, once the run's log
    is complete (ends with its ``exit`` record)."""
    found = complete_records(run_dir)
    return [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in found
        if r.WhichOneof("record_type") == "history"
    ]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _latest_updates(run_dir: Path, kind: str) -> dict:
    """The values the ``kind`` records (``summary``, ``config``) of an offline run set, the
    latest per key, once the run's log is complete."""
    values: dict = {}
    for r in complete_records(run_dir):
        if r.WhichOneof("record_type") == kind:
            for item in getattr(r, kind).update:
                values[_key(item)] = json.loads(item.value_json)
    return values


def summary(run_dir: Path) -> dict:
    """The values an offline run's ``run.summary`` was given (``summary.update`` calls, the
    latest per key). W&B shows a key's last logged value for the keys not among them."""
    return _latest_updates(run_dir, "summary")


def job_type(run_dir: Path) -> str:
    """The ``job_type`` an offline run was started with (its ``run`` record)."""
    runs = [r.run for r in complete_records(run_dir) if r.WhichOneof("record_type") == "run"]
    return runs[0].job_type


def config(run_dir: Path) -> dict:
    """An offline run's config, as {top-level key: value} (the latest value of each)."""
    return _latest_updates(run_dir, "config")

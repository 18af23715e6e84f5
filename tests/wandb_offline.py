"""Reading an offline W&B run without syncing it: its history records and media files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768  # the .wandb transaction log is a LevelDB-style log of 32 KiB blocks
HEADER = 7


def history(run_dir: Path) -> list[dict]:
    """Every ``run.log`` call of an offline run, as {key: decoded value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    buf = path.read_bytes()
    pos, chunks, rows = HEADER, [], []
    while pos + HEADER <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + HEADER])
        pos += HEADER
        chunks.append(buf[pos : pos + length])
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return rows

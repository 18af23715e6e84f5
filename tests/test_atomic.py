"""The one atomic writer: a failed write leaves the old file (or nothing) and no temporary file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from changecam.atomic import atomic_directory, atomic_open, write_json, write_text
from changecam.data.io import read_label, write_png


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"b": 1, "a": 2.5})
    assert path.read_text() == '{\n  "a": 2.5,\n  "b": 1\n}\n'
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "per_image.csv"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path, "w") as f:
            f.write("half of the ne")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["per_image.csv"]
    with pytest.raises(TypeError):  # json cannot encode it: nothing is written at all
        write_json(tmp_path / "new.json", {"x": object()})
    assert not (tmp_path / "new.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_png_goes_through_the_atomic_writer(tmp_path):
    label = np.zeros((5, 7), np.uint8)
    label[1:3, 2:6] = 255
    write_png(tmp_path / "label.png", label)
    assert read_label(tmp_path / "label.png").tolist() == (label > 0).astype(np.uint8).tolist()
    with pytest.raises(OSError, match="could not encode"):
        write_png(tmp_path / "bad.png", np.zeros((2, 2, 5), np.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label.png"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "dataset"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            write_text(tmp / "a.txt", "a")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        write_json(tmp / "spec.json", {"n": 1})
    assert json.loads((target / "spec.json").read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass


def test_a_full_disk_is_found_by_a_probe_where_a_library_names_no_cause(tmp_path, monkeypatch):
    """GDAL reports a full disk as a write error at a scanline (helper-76): writing a probe
    there tells, and leaves nothing behind either way."""
    import errno

    import changecam.atomic as atomic

    assert atomic.probed_disk_full(tmp_path, tmp_path / "change.tif") is None
    real_write, calls = os.write, []

    def full(descriptor, data):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(atomic.os, "write", full)
    found = atomic.probed_disk_full(tmp_path, tmp_path / "change.tif")
    assert isinstance(found, atomic.DiskFullError) and found.errno == errno.ENOSPC
    assert str(found) == f"no space left on device while writing {tmp_path / 'change.tif'}"
    assert list(tmp_path.iterdir()) == []


def test_names_of_many_bytes_get_temporaries_the_file_system_takes(tmp_path):
    """80 three-byte characters: a legal 244-byte name whose temporary, cut at 180 characters,
    was 268 bytes (helper-76)."""
    from changecam.atomic import write_bytes

    path = tmp_path / ("変" * 80 + ".png")
    write_bytes(path, b"x")
    assert path.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_files_leaves_none_when_a_rename_fails_midway(tmp_path, monkeypatch):
    import errno

    import changecam.atomic as atomic

    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(atomic.DiskFullError):
        atomic.write_files({tmp_path / "m" / "a.png": b"a", tmp_path / "p" / "a.png": b"b"})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_creating_a_log_on_a_full_device_is_a_full_disk(tmp_path, monkeypatch):
    import errno

    import changecam.atomic as atomic

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "open", no_space)
    with pytest.raises(atomic.DiskFullError, match=f"while writing {tmp_path / 'log.jsonl'}"):
        atomic.append_json_line(tmp_path / "log.jsonl", {"status": "started"})


def test_folders_a_write_creates_are_fsynced_into_their_parents(tmp_path, monkeypatch):
    """A file fsynced in a folder the write created, with the folder's own entry not durable,
    could vanish after a power cut while a log listing it stayed (helper-76)."""
    import changecam.atomic as atomic

    synced = []
    monkeypatch.setattr(atomic, "_fsync_dir", lambda folder: synced.append(folder))
    atomic.write_bytes(tmp_path / "run" / "masks" / "a.png", b"a")
    assert synced[:2] == [tmp_path, tmp_path / "run"], "each new folder's parent, outermost first"
    synced.clear()
    atomic.write_bytes(tmp_path / "run" / "masks" / "b.png", b"b")
    assert synced == [tmp_path / "run" / "masks"], "existing folders: only the renamed entry"


def test_names_that_are_not_utf8_still_get_temporaries(tmp_path):
    """A Latin-1 name from input.dir (held as surrogates) broke the byte count (helper-77)."""
    import os

    from changecam.atomic import temporary_path, write_bytes

    path = tmp_path / os.fsdecode(b"caf\xe9.png")
    write_bytes(path, b"x")
    assert path.read_bytes() == b"x" and temporary_path(path).name.startswith(".caf")


def test_disk_full_error_crosses_a_process_boundary():
    """A sweep's joblib worker and the CAM worker process send their errors back pickled:
    OSError pickles (errno, strerror), which DiskFullError's constructor does not take."""
    import errno
    import pickle

    from changecam.atomic import DiskFullError

    sent = DiskFullError("/runs/a/change.tif", errno.EDQUOT)
    back = pickle.loads(pickle.dumps(sent))
    assert type(back) is DiskFullError
    assert (back.errno, back.filename, str(back)) == (sent.errno, sent.filename, str(sent))

"""Killed and full-disk runs (issue 17, defect 4) and strict JSON: what changecam refuses, what it
leaves behind.

Every case checks three things: the exit status (or exception), that the message names the
file, and that nothing that looks finished is left (no file matching an output glob that is not
whole, no ``predictions.json`` of an unfinished run, no temporary file). A full device is
simulated in-process by files whose writes fail with ``ENOSPC``/``EDQUOT`` after a few bytes;
the slow suite kills ``predict.py`` with SIGKILL and fills a real tmpfs.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import logging
import logging.config
import math
import os
import queue
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import changecam.atomic
import changecam.cli.predict as predict_module
import changecam.training.callbacks.cam_worker as cam_worker
from changecam.atomic import (
    DiskFullError,
    append_json_line,
    atomic_directory,
    disk_full_error,
    remove_stale_temporaries,
    temporary_path,
    write_bytes,
    write_files,
    write_json,
    write_text,
)
from changecam.cli.common import compose_config
from changecam.cli.config_checks import ConfigError
from changecam.cli.predict import LOG_FILE, REPORT_FILE, PredictionError, predict
from changecam.cli.train import train
from changecam.data.io import read_image, write_png
from changecam.models import SiameseUNet
from changecam.run_log import read_json_lines
from changecam.training.checkpoint_io import atomic_torch_save
from helpers import REPO, compose_train, kill_when_logged, paused_after, tiny_overrides
from test_cam_panels import cam_settings, tiny_samples
from test_checkpoint import make_lightning_checkpoint

OUTPUT_GLOBS = ("*.png", "*.json", "*.jsonl", "*.ckpt", "*.npz", "*.csv", "*.txt")
FAST = [
    "device=cpu",
    "sliding_window.window=32",
    "explain.faithfulness.steps=2",
    "explain.faithfulness.batch_size=3",
]
NO_EXPLAIN = ["explain.enabled=false"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    """A tiny (width 4, depth 2) checkpoint trained for a few steps."""
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("faults_ckpt") / "best.ckpt", tiny_synthetic, steps=2
    )


@pytest.fixture()
def pairs(tmp_path) -> Path:
    """A folder of three 32 px pairs a, b, c."""
    rng = np.random.default_rng(0)
    for name in "abc":
        for date in "AB":
            write_png(
                tmp_path / "in" / date / f"{name}.png", rng.integers(0, 256, (32, 32, 3), np.uint8)
            )
    return tmp_path / "in"


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def outputs(folder: Path) -> list[str]:
    """Files matching an output glob, relative to ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in OUTPUT_GLOBS)
    )


# --- a full device, in-process ------------------------------------------------------------


class _FullFile(io.FileIO):
    """A file on a device that takes ``room`` bytes, then fails with ``code``."""

    room = 0
    code = errno.ENOSPC

    def write(self, data) -> int:
        if self.tell() + memoryview(data).nbytes > self.room:
            raise OSError(self.code, os.strerror(self.code))
        return super().write(data)


def target_of(path: str | Path) -> str:
    """The file a temporary file of the atomic writer stands for (other paths: themselves)."""
    path = Path(path)
    if changecam.atomic._TEMPORARY.match(path.name):
        return str(path.with_name(path.name[1:].rsplit(".", 2)[0]))
    return str(path)


def fill_device(monkeypatch, where: str, code: int = errno.ENOSPC, room: int = 16) -> None:
    """Make the writes to files whose path ends with ``where`` (through the atomic writer's
    temporary files or its JSON-lines appends) fail like a full device after ``room`` bytes."""
    real_open, real_os_open, real_write = open, os.open, os.write
    full = type("Full", (_FullFile,), {"room": room, "code": code})
    appends: set[int] = set()

    def hit(path) -> bool:
        return target_of(path).endswith(os.sep + where)

    def fake_open(path, mode="r", *args, encoding=None, **kwargs):
        if not hit(path) or not set(mode) & set("wxa"):
            return real_open(path, mode, *args, encoding=encoding, **kwargs)
        buffered = io.BufferedWriter(full(path, mode.replace("b", "")))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding)

    def fake_os_open(path, flags, *args, **kwargs):
        fd = real_os_open(path, flags, *args, **kwargs)
        (appends.add if hit(path) else appends.discard)(fd)
        return fd

    def fake_write(fd, data):
        if fd in appends:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(changecam.atomic, "open", fake_open, raising=False)
    monkeypatch.setattr(changecam.atomic.os, "open", fake_os_open)
    monkeypatch.setattr(changecam.atomic.os, "write", fake_write)


def _npz(path: Path) -> None:
    with changecam.atomic.atomic_open(path, "wb") as f:
        np.savez_compressed(f, x=np.arange(10_000))


def _dataset(path: Path) -> None:
    with atomic_directory(path) as tmp:
        write_png(tmp / "A" / "x.png", np.zeros((64, 64, 3), np.uint8))


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    # name: (target file, how it is written)
    "bytes": ("x.bin", lambda p: write_bytes(p, b"0" * 1000)),
    "text": ("per_image.csv", lambda p: write_text(p, "name,f1\n" * 100)),
    "json": ("metrics.json", lambda p: write_json(p, {"val/f1": [0.5] * 100})),
    "png": ("mask.png", lambda p: write_png(p, np.full((64, 64), 255, np.uint8))),
    "torch.save": ("best.ckpt", lambda p: atomic_torch_save({"w": torch.zeros(10_000)}, p)),
    "npz": ("maps.npz", _npz),
    "pair files": (
        "masks/a.png",
        lambda p: write_files({p.with_name("z.png"): b"1", p: b"0" * 999}),
    ),
    "json line": ("predictions.jsonl", lambda p: append_json_line(p, {"name": "a"})),
    "folder": ("dataset/A/x.png", lambda p: _dataset(p.parents[1])),
}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_device_raises_disk_full_naming_the_file_and_leaves_nothing(
    tmp_path, monkeypatch, writer, code
):
    target, write = WRITERS[writer]
    path = tmp_path / target
    fill_device(monkeypatch, path.name, code)
    with pytest.raises(DiskFullError) as caught:
        write(tmp_path / target)
    if writer == "folder":  # written inside the staged folder, .dataset.cc<pid>-<host>….tmp/A/
        staged = Path(caught.value.filename).parents[1].name
        assert re.fullmatch(rf"\.dataset\.cc{os.getpid()}-[0-9a-f]{{10}}\.tmp", staged), staged
        path = tmp_path / staged / "A" / "x.png"
    assert str(caught.value) == f"no space left on device while writing {path}"
    assert caught.value.errno == code and caught.value.filename == str(path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ([target] if writer == "json line" else []), "no temporary, no partial file"
    if writer == "json line":
        assert path.read_bytes() == b"", "the failed line was cut off again"
    if writer == "torch.save":  # torch reports only 'unexpected pos'; ENOSPC is chained to it
        chain, err = [], caught.value
        while err is not None:
            chain, err = [*chain, str(err)], err.__cause__ or err.__context__
        assert any("unexpected pos" in text for text in chain), chain


def test_a_failed_append_keeps_the_earlier_lines(tmp_path, monkeypatch):
    log = tmp_path / LOG_FILE
    append_json_line(log, {"status": "started"})
    before = log.read_bytes()
    fill_device(monkeypatch, LOG_FILE)
    with pytest.raises(DiskFullError, match=f"while writing {log}"):
        append_json_line(log, {"status": "done", "pair": {"name": "a" * 1000}})
    assert log.read_bytes() == before


def test_an_append_after_a_killed_one_starts_a_line_of_its_own(tmp_path, caplog):
    """A kill during an append leaves a partial last line: the next record is not joined to it
    (and lost with it), and the partial line alone is skipped."""
    log = tmp_path / LOG_FILE
    append_json_line(log, {"status": "started"})
    with open(log, "a") as f:
        f.write('{"block": 1, "pre_mass": 0.00')  # what the kill left
    append_json_line(log, {"block": 2})
    with caplog.at_level(logging.WARNING):
        assert read_json_lines(log) == [{"status": "started"}, {"block": 2}]
    assert "line 2 is incomplete" in caplog.text


@pytest.mark.parametrize(
    ("error", "names"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/a.log"), "/x/a.log"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "a file (the OS did not say which)"),
        (DiskFullError("/x/best.ckpt"), "/x/best.ckpt"),
        (OSError(errno.EACCES, "Permission denied", "/x/a.log"), None),
        (RuntimeError("unexpected pos 704 vs 598"), None),
    ],
    ids=["ENOSPC", "EDQUOT", "DiskFullError", "EACCES", "plain RuntimeError"],
)
@pytest.mark.parametrize("chained", ["cause", "context"])
def test_disk_full_is_found_in_the_exception_chain(error, names, chained):
    try:  # as Lightning and torch re-raise: the disk error is the cause or context of another
        try:
            raise error
        except Exception as inner:
            if chained == "cause":
                raise RuntimeError("checkpoint saving failed") from inner
            raise RuntimeError("checkpoint saving failed")  # noqa: B904 (the implicit context)
    except RuntimeError as outer:
        assert (outer.__cause__ is error) == (chained == "cause")
        found = disk_full_error(outer)
    if names is None:
        assert found is None
    else:
        assert str(found) == f"no space left on device while writing {names}"


# --- strict JSON --------------------------------------------------------------------------

STRICT = [
    (float("nan"), None),
    (float("inf"), None),
    (-math.inf, None),
    (np.float32("nan"), None),
    (np.float64(0.25), 0.25),
    (np.int64(3), 3),
    (np.bool_(True), True),
    (torch.tensor(float("nan")), None),
    (torch.tensor([0.5, float("inf")]), [0.5, None]),
    (np.array([[1.0, np.nan]]), [[1.0, None]]),
    ({"val/loss": float("nan"), "n": (1, 2)}, {"val/loss": None, "n": [1, 2]}),
    ("NaN", "NaN"),
]


@pytest.mark.parametrize(("value", "expected"), STRICT, ids=[repr(v)[:30] for v, _ in STRICT])
def test_json_is_strict_with_null_where_a_value_is_undefined(tmp_path, value, expected):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    write_json(tmp_path / "metrics.json", {"value": value})
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text, parse_constant=refuse) == {"value": expected}
    append_json_line(tmp_path / "log.jsonl", {"value": value})
    assert (
        json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=refuse)["value"] == expected
    )


# --- temporary files ----------------------------------------------------------------------


def test_temporary_names_match_no_output_glob(tmp_path):
    names = {
        temporary_path(tmp_path / "masks" / f"a{ext}").name for ext in (".png", ".json", ".ckpt")
    }
    for name in names:
        assert name.startswith(".") and name.endswith(".tmp")
        assert not any(fnmatch.fnmatch(name, g) for g in OUTPUT_GLOBS), name
    assert temporary_path(tmp_path / "a.png") != temporary_path(tmp_path / "a.png"), "random"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_changecams_stale_temporaries_are_removed(tmp_path):
    dead = _dead_pid()
    host = changecam.atomic._HOST
    other_host = "0000" if host != "0000" else "ffff"
    files = {  # name: removed?
        f"masks/.a.png.cc{dead}-{host}abc123.tmp": True,
        f".metrics.json.cc{dead}-{host}000000.tmp": True,
        f"checkpoints/.last.ckpt.cc{os.getpid()}-{host}abc123.tmp": False,  # its writer runs
        f"masks/.b.png.cc{dead}-{other_host}abc123.tmp": False,  # another machine's
        f"a/b/c/d/.deep.png.cc{dead}-{host}abc123.tmp": False,  # below max_depth (3)
        ".notes.tmp": False,
        "masks/a.png.tmp": False,
        "masks/.a.png.tmp": False,
        "masks/a.png": False,
    }
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(tmp_path / n for n, gone in files.items() if gone)
    for name, gone in files.items():
        assert (tmp_path / name).exists() != gone, name


def test_file_names_that_are_not_utf8_are_written_and_logged(tmp_path):
    """Linux file names are bytes: a Latin-1 name in eval.py's per_image.csv failed the write
    after the whole split was scored (no metrics.json either), and the log file lost its lines
    (helper-148). Text files hold the name's bytes; the log file escapes them."""
    name = os.fsdecode(b"caf\xe9")
    write_text(tmp_path / "per_image.csv", f"name\n{name}_0000_0000\n")
    assert (tmp_path / "per_image.csv").read_bytes() == b"name\ncaf\xe9_0000_0000\n"
    cfg = compose_config("eval", [], tmp_path)
    spec = OmegaConf.to_container(cfg.hydra.job_logging.handlers.file, resolve=False)
    spec.pop("formatter")
    spec["filename"] = str(tmp_path / "eval.log")
    handler = logging.config.DictConfigurator({}).configure_handler(spec)
    logger = logging.getLogger("changecam.test_non_utf8")
    logger.addHandler(handler)
    try:
        logger.warning("pair %s: faithfulness gap 0.1", name)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "eval.log").read_text() == "pair caf\\udce9: faithfulness gap 0.1\n"


# --- predict: killed and full-disk runs ---------------------------------------------------


def run_predict(tmp_path: Path, overrides: list[str]) -> dict:
    return predict(compose_train(tmp_path, [*FAST, *overrides], "predict"))


def count_pairs(monkeypatch) -> list[str]:
    """The names of the pairs predict computes (not those it resumes)."""
    seen: list[str] = []
    real = predict_module.predict_pair

    def counted(net, pair, *args, **kwargs):
        seen.append(pair.name)
        return real(net, pair, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_pair", counted)
    return seen


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]


PREDICT_FULL = {  # case: (the path that cannot be written, the pairs finished before the stop)
    "mask of the 2nd pair": ("masks/b.png", ["a"]),
    "panel of the 2nd pair": ("panels/b.png", ["a"]),
    "log line of the 2nd pair": (LOG_FILE, ["a"]),
    "predictions.json": (REPORT_FILE, ["a", "b", "c"]),
}


@pytest.mark.parametrize("case", PREDICT_FULL)
def test_predict_stops_at_once_on_a_full_disk_and_resumes(
    tmp_path, ckpt, pairs, monkeypatch, capsys, case
):
    where, finished = PREDICT_FULL[case]
    run = tmp_path / "run"
    computed = count_pairs(monkeypatch)
    if where == LOG_FILE:  # the header and a's line go through; b's line does not
        real = predict_module.PredictionLog.done

        def done(self, row, stamps):
            if row["name"] == "b":
                fill_device(monkeypatch, LOG_FILE)
            real(self, row, stamps)

        monkeypatch.setattr(predict_module.PredictionLog, "done", done)
    else:
        fill_device(monkeypatch, where.replace("/", os.sep))
    explain = [] if "panel" in case else NO_EXPLAIN
    with pytest.raises(SystemExit) as caught:
        run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *explain])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    message = f"no space left on device while writing {run / where}"
    assert err.count(message) == 1, err
    assert computed == (["a", "b"] if len(finished) == 1 else ["a", "b", "c"]), "stopped at once"
    assert not (run / REPORT_FILE).exists() and temporaries(run) == []
    done = [r["pair"]["name"] for r in log_lines(run) if r["status"] == "done"]
    assert done == finished
    per_pair = {
        f"{k}/{n}.png"
        for n in finished
        for k in ("masks", "probabilities", *(["panels"] if explain == [] else []))
    }
    assert set(outputs(run)) == per_pair | {LOG_FILE}, "only the finished pairs' files"

    monkeypatch.undo()  # space is free again
    computed = count_pairs(monkeypatch)
    report = run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *explain, "predict.resume=true"]
    )
    assert computed == [n for n in "abc" if n not in finished]
    assert [p["name"] for p in report["pairs"]] == ["a", "b", "c"] and report["failed"] == []
    assert json.loads((run / REPORT_FILE).read_text()) == report


def test_a_killed_run_is_resumed_and_its_stale_temporaries_removed(
    tmp_path, ckpt, pairs, monkeypatch
):
    run = tmp_path / "run"
    first = run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    # what SIGKILL while writing c leaves: no predictions.json, c not logged (a partial line),
    # c's temporary file and half of its files
    (run / REPORT_FILE).unlink()
    lines = (run / LOG_FILE).read_text().splitlines()
    (run / LOG_FILE).write_text("\n".join(lines[:3]) + '\n{"status": "done", "pair": {"na')
    (run / "probabilities" / "c.png").unlink()
    stale = run / "probabilities" / f".c.png.cc{_dead_pid()}-{changecam.atomic._HOST}abcdef.tmp"
    stale.write_bytes(b"half")
    a_mask = (run / "masks" / "a.png").stat().st_mtime_ns

    computed = count_pairs(monkeypatch)
    report = run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN, "predict.resume=true"]
    )
    assert computed == ["c"]
    assert report["pairs"] == first["pairs"]
    assert (run / "masks" / "a.png").stat().st_mtime_ns == a_mask, "a was not rewritten"
    assert not stale.exists() and temporaries(run) == []
    assert [r["status"] for r in log_lines(run)] == ["started", "done", "done", "done"]


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("threshold=0.7", "threshold: 0.5 -> 0.7"),
        ("sliding_window.overlap=0.5", "sliding_window.overlap: "),
    ],
)
def test_resume_refuses_other_settings_and_changes_nothing(
    tmp_path, ckpt, pairs, override, changed
):
    run = tmp_path / "run"
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    before = {p: (run / p).read_bytes() for p in outputs(run)}
    with pytest.raises(
        ConfigError, match=rf"{run / LOG_FILE} was started with other settings \({changed}"
    ):
        run_predict(
            tmp_path,
            [
                f"ckpt_path={ckpt}",
                f"input.dir={pairs}",
                *NO_EXPLAIN,
                override,
                "predict.resume=true",
            ],
        )
    assert {p: (run / p).read_bytes() for p in outputs(run)} == before


def test_resume_refuses_a_plain_state_dict_loaded_into_another_network(tmp_path, pairs):
    """``model.fusion=diff`` and ``absdiff`` take the same weights: only the record of the
    network tells the resumed run's pairs from the first run's."""
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(SiameseUNet(3, base_channels=4, depth=2, fusion="diff").state_dict(), weights)
    model = ["model=siamese_unet", "model.base_channels=4", "model.depth=2"]
    common = [f"ckpt_path={weights}", f"input.dir={pairs}", *NO_EXPLAIN, *model]
    run_predict(tmp_path, [*common, "model.fusion=diff"])
    run = tmp_path / "run"
    before = {p: (run / p).read_bytes() for p in outputs(run)}
    with pytest.raises(
        ConfigError, match=r"started with other settings \(network.fusion: \"diff\" -> \"absdiff\""
    ):
        run_predict(tmp_path, [*common, "model.fusion=absdiff", "predict.resume=true"])
    assert {p: (run / p).read_bytes() for p in outputs(run)} == before


def test_resume_refuses_another_checkpoint_given_the_old_ones_modification_time(tmp_path, pairs):
    """Weights of the same network copied over the checkpoint with its old time (``cp -p``,
    ``rsync -a``): the checkpoint's content sample tells them apart."""
    weights = tmp_path / "weights.pt"
    model = ["model=siamese_unet", "model.base_channels=4", "model.depth=2"]
    common = [f"ckpt_path={weights}", f"input.dir={pairs}", *NO_EXPLAIN, *model]
    torch.manual_seed(0)
    torch.save(SiameseUNet(3, base_channels=4, depth=2).state_dict(), weights)
    run_predict(tmp_path, common)
    run = tmp_path / "run"
    before = {p: (run / p).read_bytes() for p in outputs(run)}
    stat = weights.stat()
    torch.manual_seed(1)
    torch.save(SiameseUNet(3, base_channels=4, depth=2).state_dict(), weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size  # the same path, size and time
    with pytest.raises(
        ConfigError, match=r"started with other settings \(checkpoint_sample_sha256: "
    ):
        run_predict(tmp_path, [*common, "predict.resume=true"])
    assert {p: (run / p).read_bytes() for p in outputs(run)} == before


def test_a_checkpoint_swapped_while_it_is_read_is_recorded_as_read(tmp_path, pairs, monkeypatch):
    """The checkpoint is recorded before it is loaded: other weights copied over it just after
    the load (the instant a record taken afterwards would have described) are refused by a
    resume, since the finished pairs were predicted with the first ones."""
    weights = tmp_path / "weights.pt"
    model = ["model=siamese_unet", "model.base_channels=4", "model.depth=2"]
    common = [f"ckpt_path={weights}", f"input.dir={pairs}", *NO_EXPLAIN, *model]
    torch.manual_seed(0)
    torch.save(SiameseUNet(3, base_channels=4, depth=2).state_dict(), weights)
    real_load = predict_module.load_model

    def load_then_swap(cfg):
        loaded = real_load(cfg)
        torch.manual_seed(1)
        torch.save(SiameseUNet(3, base_channels=4, depth=2).state_dict(), weights)
        return loaded

    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "load_model", load_then_swap)
        run_predict(tmp_path, common)
    with pytest.raises(
        ConfigError, match=r"started with other settings .*checkpoint_sample_sha256"
    ):
        run_predict(tmp_path, [*common, "predict.resume=true"])


@pytest.mark.parametrize("resume", [True, False])
def test_pair_files_a_killed_run_did_not_log_are_removed(
    tmp_path, ckpt, pairs, resume, monkeypatch
):
    """A kill between a pair's renames and its log line leaves some or all of its files; the
    next run in the folder removes those no logged pair lists (the pair may be gone from the
    inputs, or the run may make no panels), and keeps those it resumes."""
    common = [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN]
    run_predict(tmp_path, common)
    run = tmp_path / "run"
    write_png(run / "masks" / "gone.png", np.zeros((32, 32), np.uint8))  # what the kill left
    write_png(run / "panels" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (run / "masks" / "not_ours.png").mkdir()  # a folder is never removed
    computed = count_pairs(monkeypatch)
    report = run_predict(tmp_path, [*common, *(["predict.resume=true"] if resume else [])])
    assert [p["name"] for p in report["pairs"]] == ["a", "b", "c"]
    assert computed == ([] if resume else ["a", "b", "c"])
    assert not (run / "masks" / "gone.png").exists()
    assert not list((run / "panels").glob("*.png"))
    assert (run / "masks" / "a.png").is_file() and (run / "masks" / "not_ours.png").is_dir()


def test_resume_refuses_another_roi_mask_under_the_same_name(tmp_path, ckpt, pairs):
    """``explain.target=roi``: the mask is recorded by its content, so another one copied over
    it (its old time given back) is not taken for the one the finished pairs were explained
    with."""
    roi = tmp_path / "roi.png"
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    write_png(roi, mask)
    explain = [
        "explain.target=roi",
        f"explain.roi={roi}",
        "explain.faithfulness.enabled=false",
    ]
    common = [f"ckpt_path={ckpt}", f"input.dir={pairs}", *explain]
    run_predict(tmp_path, common)
    run = tmp_path / "run"
    before = {p: (run / p).read_bytes() for p in outputs(run)}
    stat = roi.stat()
    write_png(roi, 255 - mask)  # the other half
    os.utime(roi, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(
        ConfigError, match=r"started with other settings \(roi_file\.sample_sha256: "
    ):
        run_predict(tmp_path, [*common, "predict.resume=true"])
    assert {p: (run / p).read_bytes() for p in outputs(run)} == before


def test_a_log_from_before_the_network_was_recorded_still_resumes(
    tmp_path, ckpt, pairs, monkeypatch
):
    run = tmp_path / "run"
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    lines = (run / LOG_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    assert header["settings"].pop("network")["_target_"].endswith("SiameseUNet")
    for key in ("checkpoint_size", "checkpoint_sample_sha256"):  # recorded since, too
        assert header["settings"].pop(key)
    (run / LOG_FILE).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    computed = count_pairs(monkeypatch)
    report = run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN, "predict.resume=true"]
    )
    assert computed == [] and [p["name"] for p in report["pairs"]] == ["a", "b", "c"]


def test_a_log_whose_pairs_explained_the_whole_images_prediction_redoes_those_that_differ(
    tmp_path, ckpt, monkeypatch, caplog
):
    """explain.target=predicted explained the whole image's own prediction before it explained
    the mask written; a log of then (no explained_prediction) resumes, its explained pairs of
    another size than one window predicted again (their explanation may differ, helper-156,
    helper-157), a pair of exactly one window kept (the same either way)."""
    rng = np.random.default_rng(0)
    sizes = {"window": (32, 32), "small": (24, 32), "large": (32, 48)}
    for name, size in sizes.items():
        for date in "AB":
            write_png(
                tmp_path / "in" / date / f"{name}.png", rng.integers(0, 256, (*size, 3), np.uint8)
            )
    run = tmp_path / "run"
    base = [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"]
    run_predict(tmp_path, base)
    lines = (run / LOG_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    assert header["settings"].pop("explained_prediction") == "written_mask"
    (run / LOG_FILE).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    computed = count_pairs(monkeypatch)
    with caplog.at_level("INFO"):
        report = run_predict(tmp_path, [*base, "predict.resume=true"])
    assert sorted(computed) == ["large", "small"]
    assert [p["name"] for p in report["pairs"]] == ["large", "small", "window"]
    assert "pair small: logged when predict.py explained the whole image's own prediction" in (
        caplog.text
    )
    header = json.loads((run / LOG_FILE).read_text().splitlines()[0])
    assert header["settings"]["explained_prediction"] == "written_mask"
    # without explanations nothing was explained otherwise, and nothing is recorded
    computed.clear()
    run_predict(tmp_path, [*base, *NO_EXPLAIN])
    header = json.loads((run / LOG_FILE).read_text().splitlines()[0])
    assert "explained_prediction" not in header["settings"]
    run_predict(tmp_path, [*base, *NO_EXPLAIN, "predict.resume=true"])
    assert computed == ["large", "small", "window"]  # the first run only


def test_without_resume_an_earlier_run_starts_over(tmp_path, ckpt, pairs):
    run = tmp_path / "run"
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    for date in "AB":
        (pairs / date / "c.png").unlink()
    report = run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    assert [p["name"] for p in report["pairs"]] == ["a", "b"]
    expected = {f"{k}/{n}.png" for n in "ab" for k in ("masks", "probabilities")}
    assert set(outputs(run)) == expected | {LOG_FILE, REPORT_FILE}, "c's old files are gone"
    assert [r["status"] for r in log_lines(run)] == ["started", "done", "done"]


def test_a_resume_predicts_a_pair_again_when_its_files_changed(tmp_path, ckpt, pairs, monkeypatch):
    """A replaced input file (same name) is predicted again; a pair no longer in the inputs
    loses its files, which would otherwise look like this run's."""
    run = tmp_path / "run"
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    before = (run / "probabilities" / "a.png").read_bytes()
    rng = np.random.default_rng(1)
    write_png(pairs / "B" / "a.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    for date in "AB":
        (pairs / date / "c.png").unlink()
    (run / "probabilities" / "c.png").unlink()  # c's log line no longer complete: still goes
    computed = count_pairs(monkeypatch)
    report = run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN, "predict.resume=true"]
    )
    assert computed == ["a"]
    assert [p["name"] for p in report["pairs"]] == ["a", "b"]
    # an input that cannot even be stat()ed (a dangling link) fails its pair alone
    for date in "AB":
        (pairs / date / "d.png").symlink_to(pairs / date / "gone.png")
    with pytest.raises(PredictionError, match=r"1 of 3 pair\(s\) failed.*\(d\)"):
        run_predict(
            tmp_path,
            [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN, "predict.resume=true"],
        )
    assert (run / "probabilities" / "a.png").read_bytes() != before
    expected = {f"{k}/{n}.png" for n in "ab" for k in ("masks", "probabilities")}
    assert set(outputs(run)) == expected | {LOG_FILE, REPORT_FILE}, "c's old files are gone"


def test_a_resume_through_another_path_to_the_same_files_predicts_nothing_again(
    tmp_path, ckpt, pairs, monkeypatch, caplog
):
    """The same folder given through a symlink or relative to the working folder is the same
    input: every pair was predicted again, logged as changed (helper-148)."""
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    linked = tmp_path / "linked"
    linked.symlink_to(pairs)
    monkeypatch.chdir(pairs.parent)
    computed = count_pairs(monkeypatch)
    for given in (linked, Path(pairs.name)):
        with caplog.at_level("INFO"):
            report = run_predict(
                tmp_path,
                [f"ckpt_path={ckpt}", f"input.dir={given}", *NO_EXPLAIN, "predict.resume=true"],
            )
        assert computed == [] and len(report["pairs"]) == 3
    assert "input files changed" not in caplog.text
    # another folder of the same names is another input
    other = tmp_path / "other"
    shutil.copytree(pairs, other)
    run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={other}", *NO_EXPLAIN, "predict.resume=true"]
    )
    assert computed == ["a", "b", "c"]
    # started with a path relative to one working folder, resumed from another with its own
    # relative path to the same files (helper-161: the logged one was resolved against the new)
    monkeypatch.chdir(pairs.parent)
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs.name}", *NO_EXPLAIN])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    computed.clear()
    report = run_predict(
        tmp_path,
        [f"ckpt_path={ckpt}", f"input.dir=../{pairs.name}", *NO_EXPLAIN, "predict.resume=true"],
    )
    assert computed == [] and len(report["pairs"]) == 3


def test_a_resume_follows_a_pairs_last_log_line(tmp_path, ckpt, pairs, monkeypatch):
    """A pair predicted again has two done lines: the last one counts, and when its files are
    not all there the pair is predicted again, never taken from the earlier line."""
    run = tmp_path / "run"
    run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN])
    lines = log_lines(run)
    again = json.loads(json.dumps(lines[1]))  # a's line, as a later prediction of a wrote it
    again["pair"]["files"]["panel"] = "panels/a.png"  # a file that is gone
    with open(run / LOG_FILE, "a") as log:
        log.write(json.dumps(again) + "\n")
    computed = count_pairs(monkeypatch)
    run_predict(
        tmp_path, [f"ckpt_path={ckpt}", f"input.dir={pairs}", *NO_EXPLAIN, "predict.resume=true"]
    )
    assert computed == ["a"]


# --- train: a full disk -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["last.ckpt", "metrics.json"])
def test_train_stops_on_a_full_disk_naming_the_file(
    tmp_path, tiny_synthetic, monkeypatch, capsys, where
):
    fill_device(monkeypatch, where)
    cfg = compose_train(
        tmp_path,
        [
            "experiment=quickstart",
            "trainer.max_epochs=1",
            "logger=none",
            "test=false",
            "callbacks.cam_panels=null",
            *tiny_overrides(tiny_synthetic),
        ],
    )
    with pytest.raises(SystemExit) as caught:
        train(cfg)
    assert caught.value.code == 1
    path = tmp_path / "run" / ("checkpoints" if where.endswith("ckpt") else "") / where
    err = capsys.readouterr().err
    assert err.count(f"no space left on device while writing {path}") == 1, err
    assert "unexpected pos" not in err
    assert not path.exists() and not (tmp_path / "run" / "metrics.json").exists()
    assert temporaries(tmp_path / "run") == []


class ProcessQueueStandIn(queue.Queue):
    """A thread queue with the one extra method the process body calls on its result queue."""

    def cancel_join_thread(self) -> None:
        pass


def test_the_cam_panel_process_reports_a_full_disk_as_disk_full(tmp_path, monkeypatch):
    """The background CAM-panel process's full disk reaches training as the same one message."""
    monkeypatch.setattr(cam_worker, "_yield_to_training", lambda pid=None: None)  # no renice
    fill_device(monkeypatch, "pair_0.png")
    net = SiameseUNet(3, 4, 2)
    jobs, results = queue.Queue(), ProcessQueueStandIn()
    jobs.put((3, 17, cam_worker.weights_snapshot(net)))
    jobs.put(None)
    settings = (cam_settings(steps=2, dpi=30), tmp_path, False)
    cam_worker._worker_main(
        net.config(), tiny_samples(), settings, (torch.get_num_threads(), "cpu"), jobs, results
    )
    path = tmp_path / "epoch_003" / "pair_0.png"
    assert results.queue[0] == ("disk_full", str(path))
    worker = object.__new__(cam_worker.BackgroundExplainer)  # its receiving end, no process
    worker._results, worker._outstanding = results, 1
    with pytest.raises(DiskFullError, match=f"^no space left on device while writing {path}$"):
        worker.poll()
    assert temporaries(tmp_path) == [] and not path.exists()


# --- slow: a real SIGKILL and a real full tmpfs --------------------------------------------


def predict_command(ckpt: Path, folder: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "predict.py"),
        f"ckpt_path={ckpt}",
        f"input.dir={folder}",
        *FAST,
        f"hydra.run.dir={run}",
        *extra,
    ]


def script_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def assert_whole_pairs(run: Path) -> set[str]:
    """Every pair's files are all there or none is; returns the names the log lists as done."""
    done = {r["pair"]["name"] for r in log_lines(run)[1:] if r.get("status") == "done"}
    names = {p.stem for p in run.glob("*/*.png")}
    for name in names:
        kinds = {p.parent.name for p in run.glob(f"*/{name}.png")}
        assert kinds == {"masks", "probabilities", "panels"}, (name, kinds)
        read_image(run / "panels" / f"{name}.png")  # decodable
    assert done <= names and len(names - done) <= 1, "at most the pair being renamed"
    return done


@pytest.mark.slow
def test_kill_9_then_resume_completes_the_run(tmp_path, ckpt, levir256_tiny):
    run = tmp_path / "run"
    proc = subprocess.Popen(  # waits after its third pair until it is killed
        paused_after(
            "changecam.cli.predict:PredictionLog.done", 3, predict_command(ckpt, levir256_tiny, run)
        ),
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when_logged(proc, run / LOG_FILE, '"done"')
    assert not (run / REPORT_FILE).exists(), "a killed run has no predictions.json"
    done = assert_whole_pairs(run)
    assert len(done) == 3  # killed in the pause after the third pair
    kept = {n: (run / "masks" / f"{n}.png").stat().st_mtime_ns for n in done}

    resumed = subprocess.run(
        predict_command(ckpt, levir256_tiny, run, "predict.resume=true"),
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((run / REPORT_FILE).read_text())
    assert len(report["pairs"]) == 11 and report["failed"] == []
    assert {n: (run / "masks" / f"{n}.png").stat().st_mtime_ns for n in done} == kept
    assert temporaries(run) == []
    assert_whole_pairs(run)


def _tmpfs_available() -> str | None:
    """Why a private tmpfs cannot be mounted here (``None`` when it can)."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"
    return None


def run_on_tmpfs(mount: Path, size_k: int, command: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run ``command`` with a fresh ``size_k`` KiB tmpfs at ``mount`` (a private mount
    namespace); returns its exit status, its stderr and ``find``'s listing of the tmpfs."""
    mount.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount -t tmpfs -o size={size_k}k tmpfs {mount} || exit 99\n"
        f'"$@" 2> {cwd}/stderr.txt; echo $? > {cwd}/rc.txt\n'
        f"cd {mount} && find . -type f -printf '%s %p\\n' > {cwd}/listing.txt\n"
    )
    subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command],
        cwd=cwd,
        env=script_env(),
        timeout=600,
        check=True,
    )
    return (
        int((cwd / "rc.txt").read_text()),
        (cwd / "stderr.txt").read_text(),
        (cwd / "listing.txt").read_text(),
    )


@pytest.mark.slow
def test_a_real_full_tmpfs_stops_predict_with_the_path(tmp_path, ckpt, levir256_tiny):
    reason = _tmpfs_available()
    if reason:
        pytest.skip(reason)
    mount = tmp_path / "small"
    rc, err, listing = run_on_tmpfs(
        mount, 1000, predict_command(ckpt, levir256_tiny, mount / "run"), tmp_path
    )
    assert rc == 1, err[-3000:]
    lines = [line for line in err.splitlines() if "no space left on device while writing" in line]
    assert len(lines) == 1 and f"while writing {mount / 'run'}/" in lines[0], err[-3000:]
    assert "failed:" not in err and "Logging error" not in err, "no further pair was tried"
    files = dict(reversed(line.split(" ", 1)) for line in listing.splitlines())
    assert not [f for f in files if f.endswith(".tmp")], listing
    assert f"./run/{REPORT_FILE}" not in files
    assert all(int(size) > 0 for f, size in files.items() if f.endswith(".png")), listing
    stems = {
        k: {Path(f).stem for f in files if f.startswith(f"./run/{k}/")}
        for k in ("masks", "probabilities", "panels")
    }
    assert stems["masks"] == stems["probabilities"] == stems["panels"] != set(), listing


@pytest.mark.slow
def test_a_real_full_tmpfs_stops_train_with_the_path(tmp_path, tiny_synthetic):
    reason = _tmpfs_available()
    if reason:
        pytest.skip(reason)
    mount = tmp_path / "small"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=quickstart",
        "trainer.max_epochs=1",
        "logger=none",
        "test=false",
        "callbacks.cam_panels=null",
        f"hydra.run.dir={mount}/run",
        *tiny_overrides(tiny_synthetic),
    ]
    rc, err, listing = run_on_tmpfs(mount, 200, command, tmp_path)
    assert rc == 1, err[-3000:]
    assert err.count("no space left on device while writing") == 1, err[-3000:]
    assert "unexpected pos" not in err
    assert f"while writing {mount / 'run' / 'checkpoints'}/" in err
    files = dict(reversed(line.split(" ", 1)) for line in listing.splitlines())
    # best.ckpt (whole, written first) may be there; the run has no metrics.json: unfinished
    assert not [f for f in files if f.endswith((".tmp", "metrics.json"))], listing
    assert all(int(size) > 0 for size in files.values()), listing

"""The background block writer: blocks on disk before the log lists them, in order, and an
error in either of its threads (writer, tracer) raised in the caller's."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from changecam.geo.grid import Grid
from changecam.geo.polygons import RegionTracer
from changecam.geo.windows import Block
from changecam.geo.write import SceneFiles
from changecam.geo.writer import BlockWriter

GRID = Grid(rasterio.crs.CRS.from_epsg(32650), from_origin(0, 32, 0.5, 0.5), 64, 32)
BLOCKS = [Block(i, 0, 32 * i, 32, 32, 0, 32 * i, 32, 32, (0,), (0,)) for i in range(2)]


def scene_files(tmp_path) -> SceneFiles:
    files = SceneFiles(tmp_path, explain=False, tile=16)
    files.create(GRID, {})
    return files


def test_each_block_is_on_disk_before_the_log_lists_it(tmp_path):
    files = scene_files(tmp_path)
    first = np.full((32, 32), 0.9, np.float32)
    first[:, :8] = 0.1
    second = np.full((32, 32), 0.8, np.float32)
    valid = np.ones((32, 32), bool)
    logged = []

    def done(record):
        with rasterio.open(files.partial("change")) as src:
            record["on_disk"] = src.read(1, window=BLOCKS[record["block"]].window).tolist()
        logged.append(record)

    tracer = RegionTracer(GRID)
    with BlockWriter(files, tracer, 0.5, done) as writer:
        for block, probability in zip(BLOCKS, (first, second), strict=True):
            writer.submit(block, probability, valid, None)
    assert [r["block"] for r in logged] == [0, 1]
    assert [r["on_disk"] for r in logged] == [
        (first > 0.5).astype(np.uint8).tolist(),
        (second > 0.5).astype(np.uint8).tolist(),
    ]
    assert [r["changed"] for r in logged] == [24 * 32, 32 * 32]
    # one region across the inner edge: the two blocks' pieces joined, their sums added
    (feature,) = tracer.features()
    assert feature["properties"]["pixels"] == 56 * 32
    expected = (24 * 32 * round(0.9 * 65535) + 32 * 32 * round(0.8 * 65535)) / 65535 / (56 * 32)
    assert feature["properties"]["mean_probability"] == pytest.approx(
        expected, rel=1e-6
    )  # float32 values


def test_an_error_in_the_writer_is_raised_in_the_caller_and_nothing_after_it_is_logged(
    tmp_path, monkeypatch
):
    files = scene_files(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SceneFiles, "write_block", broken)
    logged = []
    probability, valid = np.zeros((32, 32), np.float32), np.ones((32, 32), bool)
    with pytest.raises(OSError, match="disk full"):
        with BlockWriter(files, RegionTracer(GRID), 0.5, logged.append) as writer:
            for block in BLOCKS:
                writer.submit(block, probability, valid, None)
    assert logged == []


def test_an_error_in_the_tracer_is_raised_in_the_caller(tmp_path, monkeypatch):
    files = scene_files(tmp_path)

    def broken(self, *args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(RegionTracer, "add_block", broken)
    logged = []
    probability, valid = np.full((32, 32), 0.9, np.float32), np.ones((32, 32), bool)
    with pytest.raises(RuntimeError, match="tracing failed"):
        with BlockWriter(files, RegionTracer(GRID), 0.5, logged.append) as writer:
            for block in BLOCKS:
                writer.submit(block, probability, valid, None)
    # written and logged before tracing: a resume traces logged blocks from the rasters
    assert [r["block"] for r in logged][:1] == [0]


def test_blocks_still_waiting_when_the_caller_fails_are_neither_written_nor_logged(
    tmp_path, monkeypatch
):
    import threading
    import time

    files = scene_files(tmp_path)
    real = SceneFiles.write_block
    writing = threading.Event()
    writers: list[BlockWriter] = []

    def slow(self, block, *args, **kwargs):
        writing.set()
        deadline = time.monotonic() + 120  # a hang guard: the caller's failure ends the wait
        while not writers[0].stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)  # block 0 finishes only once the caller has failed
        return real(self, block, *args, **kwargs)

    monkeypatch.setattr(SceneFiles, "write_block", slow)
    logged = []
    probability = np.full((32, 32), 0.9, np.float32)
    valid = np.ones((32, 32), bool)
    with pytest.raises(RuntimeError, match="the network failed"):
        with BlockWriter(files, None, 0.5, logged.append) as writer:
            writers.append(writer)
            writer.submit(BLOCKS[0], probability, valid, None)
            assert writing.wait(120)
            writer.submit(BLOCKS[1], probability, valid, None)  # waits in the queue
            raise RuntimeError("the network failed")
    assert [r["block"] for r in logged] == [0], "the block being written finishes; no other"
    with rasterio.open(files.partial("change")) as src:
        assert (src.read(1, window=BLOCKS[1].window) != 1).all(), "block 1 never written"

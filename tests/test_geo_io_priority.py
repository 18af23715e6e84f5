"""predict.io_priority: the reader and writer threads at Linux's SCHED_IDLE, the same outputs."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import rasterio
import torch

from changecam.geo import SceneError, SceneSettings, predict_scene
from changecam.geo.io_priority import apply_io_priority, check_io_priority
from changecam.geo.polygons import RegionTracer
from changecam.geo.windows import prefetched
from changecam.geo.write import SceneFiles
from changecam.geo.writer import BlockWriter
from changecam.models import SiameseUNet
from changecam.models.sliding_window import SlidingWindow
from geo_scenes import synthetic_pair, write_scene
from test_geo_writer import BLOCKS, GRID

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's"
)


def policy_in_new_thread(priority: str) -> int:
    seen = []

    def run() -> None:
        assert apply_io_priority(priority)
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


@linux_only
def test_idle_applies_to_the_calling_thread_only():
    assert policy_in_new_thread("idle") == os.SCHED_IDLE
    assert policy_in_new_thread("normal") == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller keeps its priority"


def test_an_unknown_priority_is_refused_by_name():
    with pytest.raises(ValueError, match=r"predict.io_priority='low' is not one of normal, idle"):
        check_io_priority("low")
    with pytest.raises(SceneError, match="predict.io_priority='low'"):
        SceneSettings(io_priority="low")  # type: ignore[arg-type]


@linux_only
def test_the_reader_and_the_writer_run_at_the_priority_asked_for(tmp_path):
    policies: dict[str, int] = {}

    def read(block):
        policies["reader"] = os.sched_getscheduler(0)
        return block

    assert list(prefetched(BLOCKS, read, priority="idle")) == BLOCKS
    files = SceneFiles(tmp_path, explain=False, tile=16)
    files.create(GRID, {})

    def done(record):
        policies["writer"] = os.sched_getscheduler(0)

    probability = np.full((32, 32), 0.9, np.float32)
    with BlockWriter(files, RegionTracer(GRID), 0.5, done, priority="idle") as writer:
        writer.submit(BLOCKS[0], probability, np.ones((32, 32), bool), None)
    assert policies == {"reader": os.SCHED_IDLE, "writer": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_idle_threads_write_the_same_scene(tmp_path):
    torch.manual_seed(0)
    net = SiameseUNet(base_channels=4, depth=2).eval()
    pre, post = synthetic_pair(96)
    pre_tif, post_tif = (
        write_scene(tmp_path / "pre.tif", pre),
        write_scene(tmp_path / "post.tif", post),
    )
    spec = SlidingWindow(window=32, batch_size=8)
    outputs = {}
    for priority in ("normal", "idle"):
        settings = SceneSettings(block_size=64, progress=False, io_priority=priority)
        out = tmp_path / priority
        report = predict_scene(net, pre_tif, post_tif, out, spec, settings)
        assert report["io_priority"] == priority
        outputs[priority] = []
        for name in ("change", "probability"):
            with rasterio.open(out / f"{name}.tif") as src:
                outputs[priority].append(src.read())
        outputs[priority].append((out / "change.geojson").read_text())
    for normal, idle in zip(outputs["normal"], outputs["idle"], strict=True):
        assert np.array_equal(normal, idle) if isinstance(normal, np.ndarray) else normal == idle

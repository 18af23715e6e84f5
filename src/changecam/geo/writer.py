"""Write each predicted block in a background thread while the network computes the next one.

The network's thread hands a finished block to :class:`BlockWriter` and goes on; the writer
thread writes it to the partial rasters (:meth:`changecam.geo.write.SceneFiles.write_block`,
GDAL compresses without the GIL), traces its changed regions
(:class:`changecam.geo.polygons.RegionTracer`) and only then records it as done in the scene's
log, so a block the log lists is on disk. It takes turns with the reader thread for GDAL
(:mod:`changecam.geo.gdal_lock`). Blocks are written in the order they are handed over.
At most ``depth`` blocks wait, so memory stays bounded; an error in the thread is raised in the
network's thread at the next hand-over or when the writer is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from changecam.geo.gdal_lock import GDAL_LOCK
from changecam.geo.polygons import RegionTracer
from changecam.geo.windows import Block
from changecam.geo.write import SceneFiles

_DONE = object()


class BlockWriter:
    """A background thread writing blocks (see the module docstring); a context manager.

    Args:
        files: the scene's partial rasters.
        tracer: collects the changed regions of the written blocks.
        threshold: probability above which a pixel is change.
        done: called in the writer thread with each written block's log record.
        depth: blocks that may wait for the writer.
    """

    def __init__(
        self,
        files: SceneFiles,
        tracer: RegionTracer,
        threshold: float,
        done: Callable[[dict[str, Any]], None],
        depth: int = 1,
    ) -> None:
        self.files, self.tracer, self.threshold, self.done = files, tracer, threshold, done
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="changecam-scene-writer", daemon=True)

    def __enter__(self) -> BlockWriter:
        self.thread.start()
        return self

    def submit(
        self,
        block: Block,
        probability: np.ndarray,
        valid: np.ndarray,
        explanation: np.ndarray | None,
    ) -> None:
        """Hand one block over (waits while ``depth`` blocks are waiting already)."""
        while True:
            self._raise()
            try:
                self.jobs.put((block, probability, valid, explanation), timeout=0.1)
                return
            except queue.Full:
                continue

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None:  # the blocks still waiting are not written (nor logged)
            self.stop.set()
        while self.thread.is_alive():
            try:
                self.jobs.put(_DONE, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        if kind is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                job = self.jobs.get()
                if job is _DONE:
                    return
                self._write(*job)
        except BaseException as err:  # handed to the network's thread
            self.error = err
            self.stop.set()

    def _write(
        self,
        block: Block,
        probability: np.ndarray,
        valid: np.ndarray,
        explanation: np.ndarray | None,
    ) -> None:
        with GDAL_LOCK:  # the reader thread uses GDAL too (geo.gdal_lock)
            written = self.files.write_block(block, probability, valid, self.threshold, explanation)
            self.tracer.add_block(block, written.change, written.probability, written.explanation)
        changed = written.change == 1
        record: dict[str, Any] = {
            "block": block.index,
            "valid": int(valid.sum()),
            "changed": int(changed.sum()),
        }
        if explanation is not None:
            record["pre_mass"] = float(np.clip(explanation[0], 0, None)[changed].sum())
            record["post_mass"] = float(np.clip(explanation[1], 0, None)[changed].sum())
        self.done(record)


__all__ = ["BlockWriter"]

"""Write and trace each predicted block in background threads while the network computes the
next one.

The network's thread hands a finished block to :class:`BlockWriter` and goes on; the writer
thread writes it to the partial rasters (:meth:`changecam.geo.write.SceneFiles.write_block`,
GDAL compresses without the GIL), records it as done in the scene's log (so a block the log
lists is on disk) and hands what it wrote to the tracer thread, which traces its changed
regions (:class:`changecam.geo.polygons.RegionTracer`) while the writer writes the next block.
A killed run's resume traces the blocks its log lists from the rasters, so a block logged but
not yet traced is not lost. Both take turns with the reader thread for GDAL
(:mod:`changecam.geo.gdal_lock`). Blocks are written and traced in the order they are handed
over. At most ``depth`` blocks wait at each thread, so memory stays bounded; an error in either
thread is raised in the network's thread at the next hand-over or when the writer is closed.
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
    """Background threads writing and tracing blocks (see the module docstring); a context
    manager.

    Args:
        files: the scene's partial rasters.
        tracer: collects the changed regions of the written blocks (in the tracer thread);
            ``None``: no polygons, no tracer thread.
        threshold: probability above which a pixel is change.
        done: called in the writer thread with each written block's log record.
        depth: blocks that may wait for the writer, and for the tracer.
    """

    def __init__(
        self,
        files: SceneFiles,
        tracer: RegionTracer | None,
        threshold: float,
        done: Callable[[dict[str, Any]], None],
        depth: int = 1,
    ) -> None:
        self.files, self.tracer, self.threshold, self.done = files, tracer, threshold, done
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.traces: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="changecam-scene-writer", daemon=True)
        self.tracer_thread = threading.Thread(
            target=self._trace, name="changecam-scene-tracer", daemon=True
        )

    def __enter__(self) -> BlockWriter:
        self.thread.start()
        if self.tracer is not None:
            self.tracer_thread.start()
        return self

    def submit(
        self,
        block: Block,
        probability: np.ndarray,
        valid: np.ndarray,
        explanation: np.ndarray | None,
    ) -> None:
        """Hand one block over (waits while ``depth`` blocks are waiting already)."""
        self._raise()
        if not self._put(self.jobs, (block, probability, valid, explanation)):
            self._raise()

    def _put(self, jobs: queue.Queue, item: Any) -> bool:
        """Put ``item`` on ``jobs`` unless the threads stop first (then ``False``)."""
        while not self.stop.is_set():
            try:
                jobs.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

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
        self.thread.join()  # it hands the end on to the tracer thread
        if self.tracer is not None:
            self.tracer_thread.join()
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
            self._fail(err)
        finally:
            if self.tracer is not None:
                self._put(self.traces, _DONE)

    def _trace(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    job = self.traces.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is _DONE:
                    return
                block, written = job
                assert self.tracer is not None  # the thread runs only with a tracer
                self.tracer.add_block(
                    block, written.change, written.probability, written.explanation
                )
        except BaseException as err:  # handed to the network's thread
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
        self.stop.set()

    def _write(
        self,
        block: Block,
        probability: np.ndarray,
        valid: np.ndarray,
        explanation: np.ndarray | None,
    ) -> None:
        with GDAL_LOCK:  # the reader and tracer threads use GDAL too (geo.gdal_lock)
            written = self.files.write_block(block, probability, valid, self.threshold, explanation)
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
        if self.tracer is not None:
            self._put(self.traces, (block, written))


__all__ = ["BlockWriter"]

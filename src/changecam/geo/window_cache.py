"""The window outputs that neighbouring scene blocks share, held in memory only while the
current block row needs them.

Blocks run row by row, so the windows on the edge between two block rows are computed by the
upper block and used again by the block below, a whole row of blocks later: a row of windows
across the scene's width waits in between, and held in memory it would make the peak grow with
the scene's width. :class:`WindowCache` keeps such windows in a temporary file instead
(:meth:`WindowCache.spill`; plain ``pwrite``/``pread``, so they sit in the kernel's page cache,
not in the process), in fixed slots that are reused once their window is dropped. Reading them
back gives the same bytes, so a scene still blends exactly like its whole image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Key = tuple[int, int]


class WindowCache(MutableMapping[Key, Tensor]):
    """Window outputs by their start in scene pixels: in memory, or in a temporary file once
    :meth:`spill` moved them there. Every stored output has one shape and dtype.

    Args:
        folder: where the temporary file is made (deleted on :meth:`close`).
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = folder
        self.memory: dict[Key, Tensor] = {}
        self.slots: dict[Key, int] = {}  # spilled window -> slot in the file
        self.free: list[int] = []
        self.used = 0  # slots ever made (the file's length in slots)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.numpy_dtype: np.dtype | None = None
        self.slot_bytes = 0  # bytes of one window in the file
        self.fd: int | None = None
        self.peak_in_memory = 0  # most windows held in memory at once
        self.peak_on_disk = 0  # ... and in the temporary file

    # MutableMapping
    def __getitem__(self, key: Key) -> Tensor:
        if key in self.memory:
            return self.memory[key]
        slot = self.slots[key]
        assert self.fd is not None and self.shape is not None
        data = os.pread(self.fd, self.slot_bytes, slot * self.slot_bytes)
        if len(data) != self.slot_bytes:
            raise OSError(f"window {key}: read {len(data)} of {self.slot_bytes} bytes back")
        array = np.frombuffer(bytearray(data), dtype=self.numpy_dtype).reshape(self.shape)
        return torch.from_numpy(array).to(self.device)

    def __setitem__(self, key: Key, value: Tensor) -> None:
        if self.shape is None:
            self.shape, self.dtype, self.device = tuple(value.shape), value.dtype, value.device
            self.numpy_dtype = torch.empty((), dtype=value.dtype).numpy().dtype
            self.slot_bytes = int(np.prod(self.shape)) * self.numpy_dtype.itemsize
        elif tuple(value.shape) != self.shape or value.dtype != self.dtype:
            raise ValueError(
                f"window {key}: {tuple(value.shape)} {value.dtype} differs from the cache's "
                f"{self.shape} {self.dtype}"
            )
        self._drop_slot(key)
        self.memory[key] = value
        self.peak_in_memory = max(self.peak_in_memory, len(self.memory))

    def __delitem__(self, key: Key) -> None:
        if key in self.memory:
            del self.memory[key]
        elif key in self.slots:
            self._drop_slot(key)
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[Key]:
        yield from list(self.memory)
        yield from list(self.slots)

    def __len__(self) -> int:
        return len(self.memory) + len(self.slots)

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.slots

    # spilling
    @property
    def in_memory(self) -> int:
        """Windows held in memory."""
        return len(self.memory)

    @property
    def on_disk(self) -> int:
        """Windows held in the temporary file."""
        return len(self.slots)

    def spill(self, keys: Iterable[Key]) -> None:
        """Move these windows (those in memory) to the temporary file."""
        for key in keys:
            value = self.memory.pop(key, None)
            if value is None:
                continue
            if self.fd is None:
                handle, name = tempfile.mkstemp(prefix=".windows-", suffix=".part", dir=self.folder)
                os.unlink(name)  # the file lives as long as its descriptor, even if killed
                self.fd = handle
            slot = self.free.pop() if self.free else self._new_slot()
            data = value.detach().cpu().contiguous().numpy().tobytes()
            if os.pwrite(self.fd, data, slot * self.slot_bytes) != len(data):
                raise OSError(f"window {key}: the temporary file took less than {len(data)} bytes")
            self.slots[key] = slot
            self.peak_on_disk = max(self.peak_on_disk, len(self.slots))

    def record(self) -> dict[str, int | None]:
        """The peaks, in windows and MiB (``scene.json``'s ``window_cache``)."""
        size = self.slot_bytes
        return {
            "peak_in_memory": self.peak_in_memory,
            "peak_on_disk": self.peak_on_disk,
            "peak_in_memory_mib": round(self.peak_in_memory * size / 2**20, 1),
            "peak_on_disk_mib": round(self.peak_on_disk * size / 2**20, 1),
        }

    def close(self) -> None:
        """Forget every window and delete the temporary file."""
        self.memory.clear()
        self.slots.clear()
        self.free.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WindowCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_slot(self) -> int:
        self.used += 1
        return self.used - 1

    def _drop_slot(self, key: Key) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.free.append(slot)


__all__ = ["WindowCache"]

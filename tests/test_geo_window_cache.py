"""The scene runner's window cache: spilled windows come back bit for bit, slots are reused,
and nothing is left on disk."""

from __future__ import annotations

import pytest
import torch

from changecam.geo.window_cache import WindowCache


def test_spilled_windows_come_back_exactly_and_reuse_their_slots(tmp_path):
    torch.manual_seed(0)
    windows = {(r, c): torch.randn(1, 3, 8, 8) for r in (0, 6) for c in (0, 6, 12)}
    with WindowCache(tmp_path) as cache:
        for key, value in windows.items():
            cache[key] = value
        cache.spill([(6, 0), (6, 6), (6, 12)])
        assert (cache.in_memory, cache.on_disk, len(cache)) == (3, 3, 6)
        assert set(cache) == set(windows) and (6, 6) in cache
        for key, value in windows.items():
            assert torch.equal(cache[key], value)
        assert list(tmp_path.iterdir()) == [], "the temporary file has no name"
        del cache[(6, 0)], cache[(0, 0)]
        assert (6, 0) not in cache and (0, 0) not in cache
        cache[(12, 0)] = torch.full((1, 3, 8, 8), 7.0)
        cache.spill([(12, 0)])
        assert cache.used == 3, "the freed slot is reused"
        assert torch.equal(cache[(12, 0)], torch.full((1, 3, 8, 8), 7.0))
        assert torch.equal(cache[(6, 6)], windows[(6, 6)])
        cache[(6, 6)] = torch.zeros(1, 3, 8, 8)  # a window stored again lives in memory
        assert cache.on_disk == 2 and torch.equal(cache[(6, 6)], torch.zeros(1, 3, 8, 8))
        with pytest.raises(KeyError):
            del cache[(99, 99)]
        with pytest.raises(ValueError, match=r"window \(0, 12\): \(1, 1, 8, 8\)"):
            cache[(0, 12)] = torch.zeros(1, 1, 8, 8)
    assert len(cache) == 0 and cache.fd is None

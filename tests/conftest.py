"""Fixtures and hooks; the plain helpers and constants they use live in ``helpers.py``.

``helpers`` is imported first: it sets the test environment (W&B offline, ...) before anything
imports the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SAMPLES, TINY_SPEC


def pytest_configure(config: pytest.Config) -> None:
    """At most two torch threads in the test process (CI machines are small)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not (SAMPLES / "A").is_dir():
        pytest.fail(f"real LEVIR-CD samples not found at {SAMPLES} (set CHANGECAM_SAMPLES)")
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px synthetic set in the official LEVIR-CD layout (4/2/2 pairs)."""
    from changecam.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "tiny", TINY_SPEC)

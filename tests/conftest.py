"""Fixtures and hooks; the plain helpers and constants they use live in ``helpers.py``.

``helpers`` is imported first: it sets the test environment (W&B offline, ...) before anything
imports the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import LEVIR256_TINY, SAMPLES, TINY_SPEC


def pytest_configure(config: pytest.Config) -> None:
    """At most two torch threads in the test process (CI machines are small)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real LEVIR-CD-256 samples (read-only); the tests that need them skip without them."""
    if not (SAMPLES / "A").is_dir():
        pytest.skip(
            f"real LEVIR-CD samples not found at {SAMPLES}; set CHANGECAM_SAMPLES or provide "
            "../shared/data/levir-cd-256-samples next to the repository"
        )
    return SAMPLES


@pytest.fixture(scope="session")
def levir256_tiny() -> Path:
    """The committed flat LEVIR-CD-256 fixture: the real samples at 64 px (read-only: copy it
    to ``tmp_path`` before changing anything)."""
    assert (LEVIR256_TINY / "A").is_dir(), f"{LEVIR256_TINY} is missing: run make_fixtures.py"
    return LEVIR256_TINY


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px synthetic set in the official LEVIR-CD layout (4/2/2 pairs)."""
    from changecam.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "tiny", TINY_SPEC)

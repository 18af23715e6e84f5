"""Finding, reading, augmenting and generating bi-temporal change data."""

from typing import Any

from changecam.data.dataset import ChangeDetectionDataset
from changecam.data.layout import (
    DatasetNotFoundError,
    LayoutError,
    Triplet,
    find_triplets,
    pair_folder,
)
from changecam.data.sampler import ImageGroupedSampler
from changecam.data.synthetic import SyntheticSpec, generate

__all__ = [
    "ChangeDetectionDataModule",
    "ChangeDetectionDataset",
    "DatasetNotFoundError",
    "ImageGroupedSampler",
    "LayoutError",
    "SyntheticSpec",
    "Triplet",
    "find_triplets",
    "generate",
    "pair_folder",
]


def __getattr__(name: str) -> Any:
    # The datamodule imports Lightning (seconds); reading and explaining data must not need it,
    # e.g. in the background CAM-panel process.
    if name == "ChangeDetectionDataModule":
        from changecam.data.datamodule import ChangeDetectionDataModule

        return ChangeDetectionDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

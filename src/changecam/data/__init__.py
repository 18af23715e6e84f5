"""Finding, reading, augmenting and generating bi-temporal change data."""

from changecam.data.datamodule import ChangeDetectionDataModule
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

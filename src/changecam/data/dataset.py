"""A map-style dataset of (pre, post, mask) samples under four sampling protocols.

* ``tiles``: non-overlapping ``patch_size`` tiles of each image, row-major (LEVIR-CD's
  standard 1024 -> 16 x 256 protocol); a remainder narrower than a tile is dropped.
* ``random_crop``: ``crops_per_image`` random ``patch_size`` crops per image (training); with
  ``change_crops`` > 0, that fraction of the crops is placed around a randomly chosen changed
  pixel (small real sets where most crops would hold no change).
* ``resize``: each whole image resized to ``patch_size`` (the seed notebook's protocol; the
  mask by the majority of each area, :func:`resize_triplet`).
* ``full``: each whole image as it is.

Decoded triplets are kept in a small per-process LRU cache, so with the tile protocol a
1024 x 1024 image is decoded once per worker rather than once per tile as long as its tiles
are drawn close together -- which :class:`changecam.data.sampler.ImageGroupedSampler`
arranges for training while still shuffling. The cache costs ``cache_images x H x W x 7``
bytes per process (uint8 pre and post RGB plus the mask): 56 MiB for the default 8 LEVIR-CD
1024² triplets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, get_args

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from changecam.data.io import ImageReadError, image_size, read_image, read_label
from changecam.data.layout import Triplet
from changecam.data.transforms import PairTransform, image_to_tensor, mask_to_tensor
from changecam.values import is_count

Protocol = Literal["tiles", "random_crop", "resize", "full"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)


def resize_triplet(
    pre: np.ndarray, post: np.ndarray, mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``resize`` protocol: both images area-averaged to ``size``², and the mask (0/1, as
    :func:`~changecam.data.io.read_label` gives it) where the average of its pixels over the
    same area is at least one half. OpenCV's nearest
    neighbour would take each area's top-left pixel, shifting the mask (1.5 px of a 1024²
    image at 256²) against the images it labels."""
    pre, post = (area_resize(x, size) for x in (pre, post))
    share = area_resize(mask.astype(np.float32), size)
    return pre, post, (share >= 0.5).astype(mask.dtype)


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized to ``size``² by OpenCV's ``INTER_AREA``, one axis at a time where one
    side shrinks and the other grows: ``INTER_AREA`` averages areas only when both shrink, and
    otherwise samples the shrinking axis at points (every third column of change, 96 px
    wide, became change everywhere at 32 px)."""
    height, width = image.shape[:2]
    if (height - size) * (width - size) < 0:
        shrunk = (width, size) if height > size else (size, height)  # OpenCV: (width, height)
        image = cv2.resize(image, shrunk, interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def check_crop_count(count: object) -> None:
    """Refuse a ``crops_per_image`` count that is not ``None`` or a whole number >= 1 (0 would
    silently mean "as many as tiles", a negative count none at all)."""
    if count is not None and not is_count(count):
        raise ValueError(
            f"data.crops_per_image={count!r} must be a whole number of crops >= 1 "
            "(null: as many as the image has tiles)"
        )


class ChangeDetectionDataset(Dataset):
    """Samples ``{"pre", "post", "mask", "name"}`` from labelled triplets.

    Args:
        triplets: the files, e.g. from :func:`changecam.data.layout.find_triplets`.
        protocol: sampling protocol (see module docstring).
        patch_size: tile/crop side, or the target side for ``resize``.
        transform: augmentation; ``None`` for evaluation.
        crops_per_image: samples per image per epoch for ``random_crop``
            (default: as many as there are tiles); a sequence gives each triplet its own
            count (``None`` entries: that image's tile count).
        cache_images: decoded triplets kept per process.
        change_crops: probability that a ``random_crop`` crop contains a changed pixel chosen
            uniformly among the image's changed pixels (at a random place in the crop); the
            other crops are uniform. Images without change always get uniform crops.
        fixed_crops: draw each ``random_crop`` crop from the sample's index when no seed is
            given (evaluation: the same pixels at every epoch and in every run).
    """

    def __init__(
        self,
        triplets: Sequence[Triplet],
        protocol: Protocol = "tiles",
        patch_size: int = 256,
        transform: PairTransform | None = None,
        crops_per_image: int | Sequence[int | None] | None = None,
        cache_images: int = 8,
        change_crops: float = 0.0,
        fixed_crops: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"data protocol {protocol!r} is not allowed; expected one of {PROTOCOLS}"
            )
        if not triplets:
            raise ValueError("no samples: the triplet list is empty")
        self.triplets = list(triplets)
        self.protocol: Protocol = protocol
        self.patch_size = patch_size
        self.transform = transform
        self.cache_images = max(1, cache_images)
        if not 0.0 <= change_crops <= 1.0:
            raise ValueError(f"data.change_crops={change_crops} must be a probability in [0, 1]")
        self.change_crops = change_crops
        self.fixed_crops = fixed_crops
        self._changed: dict[int, np.ndarray] = {}  # flat indices of the changed pixels per image
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self.index: list[tuple[int, int, int]] = []  # (image, row, col) of each sample
        if crops_per_image is None or isinstance(crops_per_image, int):
            crops = [crops_per_image] * len(self.triplets)
        else:
            crops = list(crops_per_image)
            if len(crops) != len(self.triplets):
                raise ValueError(
                    f"crops_per_image has {len(crops)} counts for {len(self.triplets)} triplets"
                )
        for count in crops:
            check_crop_count(count)
        if protocol in ("tiles", "random_crop"):
            for i, t in enumerate(self.triplets):
                height, width = image_size(t.pre)
                rows, cols = height // patch_size, width // patch_size
                if rows == 0 or cols == 0:
                    raise ValueError(
                        f"{t.pre} is {height}x{width}, smaller than data.patch_size={patch_size}"
                    )
                if protocol == "tiles":
                    self.index += [
                        (i, r * patch_size, c * patch_size)
                        for r in range(rows)
                        for c in range(cols)
                    ]
                else:
                    self.index += [(i, -1, -1)] * (rows * cols if crops[i] is None else crops[i])
        else:
            self.index = [(i, 0, 0) for i in range(len(self.triplets))]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sample_images(self) -> list[int]:
        """Index into :attr:`triplets` of the image each sample comes from."""
        return [i for i, _, _ in self.index]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded (pre, post, mask) of image ``i``, through the per-process cache."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        t = self.triplets[i]
        pre, post = read_image(t.pre), read_image(t.post)
        if t.label is None:
            raise ValueError(
                f"{t.name} has no label file; a training/evaluation dataset needs labels"
            )
        mask = read_label(t.label)
        if pre.shape != post.shape or pre.shape[:2] != mask.shape:
            raise ImageReadError(
                f"size mismatch for {t.name}: {t.pre} is {pre.shape[:2]}, {t.post} is {post.shape[:2]}, "
                f"{t.label} is {mask.shape}"
            )
        self._cache[i] = (pre, post, mask)
        if len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return pre, post, mask

    def _crop_origin(self, i: int, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a random crop of image ``i`` (see ``change_crops``)."""
        ps, (height, width) = self.patch_size, mask.shape
        if self.change_crops > 0 and rng.random() < self.change_crops:
            if i not in self._changed:
                self._changed[i] = np.flatnonzero(mask)
            changed = self._changed[i]
            if changed.size:
                y, x = divmod(int(changed[rng.integers(changed.size)]), width)
                row = y - int(rng.integers(0, ps))
                col = x - int(rng.integers(0, ps))
                return min(max(row, 0), height - ps), min(max(col, 0), width - ps)
        return int(rng.integers(0, height - ps + 1)), int(rng.integers(0, width - ps + 1))

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Sample ``index``, or ``(index, seed)`` with its augmentation seed (a sampler's, see
        :class:`~changecam.data.sampler.ImageGroupedSampler`)."""
        given = None
        if isinstance(index, tuple):
            index, given = index
        i, row, col = self.index[index]
        pre, post, mask = self.load(i)
        name = self.triplets[i].name
        # All randomness of one sample comes from one seed: the sampler's, or one draw of
        # torch's generator, so runs are reproducible under seed_everything.
        random = self.transform is not None or self.protocol == "random_crop"
        if not random:
            seed = 0
        elif given is not None:
            seed = int(given)
        elif self.fixed_crops:  # an evaluation scores the same pixels every time
            seed = index
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        ps = self.patch_size
        if self.protocol == "random_crop":
            row, col = self._crop_origin(i, mask, np.random.default_rng(seed))
        if self.protocol in ("tiles", "random_crop"):
            pre, post, mask = (a[row : row + ps, col : col + ps] for a in (pre, post, mask))
            name = f"{name}_{row:04d}_{col:04d}"  # a sample's panel and row are its own
        elif self.protocol == "resize" and pre.shape[:2] != (ps, ps):
            pre, post, mask = resize_triplet(pre, post, mask, ps)
        if self.transform is not None:
            pre, post, mask = self.transform(pre, post, mask, seed)
        return {
            "pre": image_to_tensor(pre),
            "post": image_to_tensor(post),
            "mask": mask_to_tensor(mask),
            "name": name,
        }

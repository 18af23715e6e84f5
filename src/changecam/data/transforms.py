"""Augmentations that keep pre, post and mask aligned, and the image -> tensor convention.

Geometry (flips, 90-degree rotations) is drawn once per sample, each of its three parts on
its own, and applied with NumPy to both dates and the mask alike. Photometric jitter
(albumentations' ``ColorJitter``) is drawn independently per date (it mimics the nuisance change between
acquisitions). A date swap exchanges pre and post; the change label is symmetric for
appear/vanish, so the mask stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from changecam.environment import configure_environment


def _albumentations() -> ModuleType:
    """albumentations, imported on first use with its network update check off (it would
    query PyPI at import otherwise)."""
    configure_environment()
    import albumentations

    return albumentations


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x C`` -> float ``C x H x W`` in [0, 1]: the one input convention."""
    return bands_to_tensor(image.transpose(2, 0, 1))  # made contiguous there, once


def bands_to_tensor(bands: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``C x H x W`` (band first, as GDAL reads it) -> float ``C x H x W`` in [0, 1]: the
    same convention as :func:`image_to_tensor`, without a transposed copy. With ``device``, the
    uint8 values are moved there first and converted there (a quarter of the bytes to copy,
    and no float work on the CPU for a GPU); the result is the same."""
    data = torch.from_numpy(np.ascontiguousarray(bands))
    if device is not None:
        data = data.to(device)
    return data.float().div_(255.0)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """{0,1} ``H x W`` -> float ``1 x H x W``."""
    return torch.from_numpy(np.ascontiguousarray(mask))[None].float()


def flip_rotate(image: np.ndarray, hflip: bool, vflip: bool, k: int) -> np.ndarray:
    """``image`` (H x W or H x W x C) flipped left-right, up-down, then turned ``k`` quarter
    turns (contiguous, as the loaders' tensors need)."""
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1]
    return np.ascontiguousarray(np.rot90(image, k, axes=(0, 1)))


@dataclass
class PairTransform:
    """Random, identical geometry for (pre, post, mask) plus per-date jitter and date swap.

    Args:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rot90: probability of a random multiple-of-90-degree rotation.
        jitter: strength of per-date brightness/contrast/saturation jitter (0 disables).
        jitter_p: probability of applying the jitter to each date.
        date_swap: probability of exchanging pre and post.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    jitter: float = 0.0
    jitter_p: float = 0.5
    date_swap: float = 0.0

    def __post_init__(self) -> None:
        for key in ("hflip", "vflip", "rot90", "jitter_p", "date_swap"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.augment.{key}={value} must be a probability in [0, 1]")
        if not 0.0 <= self.jitter < float("inf"):  # a negative strength would mean "off"
            raise ValueError(f"data.augment.jitter={self.jitter} must be a strength >= 0 (0: off)")
        self.photometric = None
        if self.jitter > 0:
            A = _albumentations()  # noqa: N806 (the library's usual alias)
            j = self.jitter
            self.photometric = A.Compose(
                [A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=self.jitter_p)]
            )

    def __call__(
        self, pre: np.ndarray, post: np.ndarray, mask: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply the augmentation with all randomness drawn from ``seed``.

        The flips and the rotation are drawn here, each on its own: albumentations'
        ``Compose.set_random_seed`` hands every child the same seed, so its flips and rotation
        fired together and no reflection was ever drawn. The stream is a child of ``seed``
        (``(seed, 1)``): the crop drawn from ``seed`` itself stays independent of it.
        """
        rng = np.random.default_rng((seed, 1))
        hflip, vflip, rotate = (rng.random() < p for p in (self.hflip, self.vflip, self.rot90))
        k = int(rng.integers(4)) if rotate else 0  # as RandomRotate90: 0, 90, 180 or 270 degrees
        if k % 2 and pre.shape[0] != pre.shape[1]:  # a quarter turn would change the shape
            k = (k + 1) % 4  # (data.train_protocol=full): 0 or 180 degrees, each half the time
        pre, post, mask = (flip_rotate(a, hflip, vflip, k) for a in (pre, post, mask))
        if self.photometric is not None:
            self.photometric.set_random_seed(int(rng.integers(2**31)))
            pre = self.photometric(image=pre)["image"]
            post = self.photometric(image=post)["image"]
        if rng.random() < self.date_swap:
            pre, post = post, pre
        return pre, post, mask

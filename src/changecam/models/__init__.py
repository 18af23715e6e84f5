"""Change-detection networks."""

from changecam.models.siamese_unet import SiameseUNet, seed_siamese_unet
from changecam.models.taps import Tap, find_taps

__all__ = ["SiameseUNet", "Tap", "find_taps", "seed_siamese_unet"]

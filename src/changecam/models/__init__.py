"""Change-detection networks: the protocol they share, the architectures, taps, sliding windows.

A new architecture is one module here (a :class:`ChangeNetwork` subclass with taps) plus its
``conf/model/<name>.yaml``.
"""

from changecam.models.protocol import ChangeNetwork, build_network, network_config, size_multiple
from changecam.models.siamese_unet import SEED_ARCHITECTURE, SiameseUNet, seed_siamese_unet
from changecam.models.sliding_window import SlidingWindow, SlidingWindowNet
from changecam.models.taps import Tap, find_taps

__all__ = [
    "SEED_ARCHITECTURE",
    "ChangeNetwork",
    "SiameseUNet",
    "SlidingWindow",
    "SlidingWindowNet",
    "Tap",
    "build_network",
    "find_taps",
    "network_config",
    "seed_siamese_unet",
    "size_multiple",
]

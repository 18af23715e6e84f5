"""Change-detection networks: the protocol they share, the architectures, taps, sliding windows.

A new architecture is one module here (a :class:`ChangeNetwork` subclass with taps) plus its
``conf/model/<name>.yaml``. A network written elsewhere is explained through
:class:`LayerTaps` (its layers declared by module path), or :class:`ExternalModel`
(``model=external``) for the commands.
"""

from changecam.models.external import ExternalModel, LayerTaps, is_external
from changecam.models.protocol import ChangeNetwork, build_network, network_config, size_multiple
from changecam.models.siamese_unet import SEED_ARCHITECTURE, SiameseUNet, seed_siamese_unet
from changecam.models.sliding_window import SlidingWindow, SlidingWindowNet
from changecam.models.taps import Tap, TapError, find_taps

__all__ = [
    "SEED_ARCHITECTURE",
    "ChangeNetwork",
    "ExternalModel",
    "LayerTaps",
    "SiameseUNet",
    "SlidingWindow",
    "SlidingWindowNet",
    "Tap",
    "TapError",
    "build_network",
    "find_taps",
    "is_external",
    "network_config",
    "seed_siamese_unet",
    "size_multiple",
]

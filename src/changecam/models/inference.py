"""The network as the inference commands run it (predict.py, explain.py).

Eval mode, on the device, with its convolution weights in the channels-last memory format: the
inputs stay ordinary ``N x C x H x W`` tensors and the activations follow the weights into
NHWC, where PyTorch's CPU convolutions are faster (for the quickstart U-Net 1.3-1.5x for
prediction and for HiResCAM's forward and backward: ``benchmarks/memory_format.py``). The
values agree with the default format to float rounding. Training keeps the default format (a
quick measurement of a width-8 training step at 2 threads found it slower there).
"""

from __future__ import annotations

import torch
from torch import nn


def inference_network(net: nn.Module, device: torch.device | str) -> nn.Module:
    """``net`` in eval mode on ``device``, channels-last (see the module docstring)."""
    return net.to(device=torch.device(device), memory_format=torch.channels_last).eval()


__all__ = ["inference_network"]

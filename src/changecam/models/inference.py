"""The network as the inference commands run it (predict.py, explain.py).

Eval mode, on the device, with its convolution weights (changecam's own networks; an external
model keeps its format) in the channels-last memory format: the
inputs stay ordinary ``N x C x H x W`` tensors and the activations follow the weights into
NHWC, where PyTorch's CPU convolutions are faster (for the quickstart U-Net 1.3-1.5x for
prediction and for HiResCAM's forward and backward: ``benchmarks/memory_format.py``). The
values agree with the default format to float rounding. Training keeps the default format (a
quick measurement of a width-8 training step at 2 threads found it slower there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from changecam.models.external import LayerTaps


def inference_network(net: nn.Module, device: torch.device | str) -> nn.Module:
    """``net`` in eval mode on ``device``, channels-last (see the module docstring), but a
    network changecam did not write (:class:`~changecam.models.external.LayerTaps`), whose
    forward may ``view`` its activations, which channels-last tensors refuse."""
    if isinstance(net, LayerTaps):
        return net.to(device=torch.device(device)).eval()
    return net.to(device=torch.device(device), memory_format=torch.channels_last).eval()


class NonFiniteLogits(ValueError):
    """The network's change logits are NaN or infinite where they are used."""


def check_finite_logits(
    logits: Tensor,
    what: str,
    valid: Tensor | None = None,
    error: type[ValueError] = NonFiniteLogits,
) -> None:
    """Refuse logits that are not finite (where ``valid``): weights that overflow on these
    images (e.g. in half precision) would otherwise be read as no change, as NaN > threshold
    is false, and written so (eval.py refuses them as a divergence).

    Raises:
        error: naming ``what`` and how many logits are not finite.
    """
    bad = ~torch.isfinite(logits)
    if valid is not None:
        bad &= valid
    count = int(bad.sum())
    if count:
        total = logits.numel() if valid is None else int(valid.sum())
        raise error(
            f"{what}: {count} of the network's {total} change logits are not finite (NaN or "
            "infinite: weights that overflow on these images, e.g. in half precision); nothing "
            "is written for it"
        )


__all__ = ["NonFiniteLogits", "check_finite_logits", "inference_network"]

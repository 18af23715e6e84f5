"""The network as predict.py and explain.py run it: eval mode, channels-last weights, and the
same logits and HiResCAM maps as the default memory format (to float rounding)."""

from __future__ import annotations

import copy

import torch

from changecam.explain import ExplainSettings, FaithfulnessSettings, explain_tensors
from changecam.models import SiameseUNet
from changecam.models.inference import inference_network


def test_channels_last_network_gives_the_same_logits_and_maps():
    torch.manual_seed(0)
    default = SiameseUNet(base_channels=4, depth=2).eval()
    fast = inference_network(copy.deepcopy(default).train(), "cpu")
    assert not fast.training
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    pre, post = torch.rand(2, 2, 3, 32, 32).unbind(0)
    with torch.no_grad():
        torch.testing.assert_close(fast(pre, post), default(pre, post), rtol=1e-5, atol=1e-6)
    settings = ExplainSettings(
        taps=("enc1",),
        methods=("hirescam",),
        threshold=0.5,
        faithfulness=FaithfulnessSettings(enabled=False),
    )
    ours, theirs = (
        explain_tensors(net, pre, post, settings, upsample=True).explanation.upsampled["hirescam"]
        for net in (fast, default)
    )
    for key in ("pre/enc1", "post/enc1"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)

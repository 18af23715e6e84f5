"""Cost of a full explanation: one-pass engine vs plain forward+backward vs captum per tap.

The quickstart network (``SiameseUNet(3, 8, 4)``, shared encoder, concat) on a batch of 8
random 256² pairs, in eval mode:

* ``forward_backward``: ``model(pre, post)``, BCE against a mask, ``loss.backward()``
  (parameter gradients), the cost of one training step without the optimiser;
* ``explain``: :func:`changecam.explain.explain_batch` — every tap (18), both dates,
  HiResCAM + Grad-CAM, maps upsampled to 256² (target: all pixels);
* ``naive``: the same maps the usual way — captum's ``LayerGradientXActivation`` and
  ``LayerGradCam`` called once per tap (each date's tap separately), each call a forward and a
  backward, plus one forward for the target mask and the same upsampling.

Within each repetition the runs alternate side by side; figures are ratios of medians.

``zoo``: the same explain / forward+backward ratio for every architecture of ``conf/model/``
(at ``base_channels=8``, every tap, both methods; ``--zoo-reps`` alternating repetitions).

    python benchmarks/explain_cost.py [--reps 7] [--naive-reps 3] [--device cpu] [--tiny]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation
from common import emit, machine, median, timed

from changecam.explain import explain_batch, target_mask
from changecam.explain.hirescam import upsample_maps
from changecam.models import SiameseUNet, build_network, find_taps, size_multiple

# Every pixel's logit: a non-empty target on a random network (the cost does not depend on it).
TARGET = "all"


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def forward_backward(model: torch.nn.Module, pre, post, mask) -> None:
    loss = F.binary_cross_entropy_with_logits(model(pre, post), mask)
    loss.backward()
    model.zero_grad(set_to_none=True)


def naive(model: torch.nn.Module, pre, post) -> dict[str, dict[str, torch.Tensor]]:
    """Every tap's HiResCAM and Grad-CAM with one captum call per tap and method."""
    with torch.no_grad():
        mask = target_mask(model(pre, post), TARGET)

    def score(a, b):
        return (model(a, b) * mask).sum((1, 2, 3))

    raw: dict[str, dict[str, torch.Tensor]] = {"hirescam": {}, "gradcam": {}}
    for name, tap in find_taps(model).items():
        gxa = LayerGradientXActivation(score, tap).attribute((pre, post))
        raw["hirescam"][name] = gxa.sum(1).detach()
        gcam = LayerGradCam(score, tap).attribute((pre, post), relu_attributions=False)
        raw["gradcam"][name] = gcam[:, 0].detach()
    return upsample_maps(raw, tuple(pre.shape[-2:]))


def zoo_ratio(name: str, device: torch.device, batch: int, size: int, width: int, reps: int):
    """explain / forward+backward of ``conf/model/<name>.yaml`` at ``width``."""
    from common import REPO
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    config["base_channels"] = width
    torch.manual_seed(0)
    model = build_network(config).to(device).eval()
    side = -(-size // size_multiple(model)) * size_multiple(model)
    pre, post = torch.rand(2, batch, 3, side, side, device=device).unbind(0)
    mask = (torch.rand(batch, 1, side, side, device=device) > 0.9).float()
    fb = synchronized(lambda: forward_backward(model, pre, post, mask), device)
    explain = synchronized(lambda: explain_batch(model, pre, post, target=TARGET), device)
    fb(), explain()  # warm-up
    fb_s, explain_s = [], []
    for _ in range(reps):
        fb_s.append(timed(fb)[0])
        explain_s.append(timed(explain)[0])
    return {
        "ratio_vs_forward_backward": median(explain_s) / median(fb_s),
        "forward_backward_s": median(fb_s),
        "explain_s": median(explain_s),
        "taps": len(explain().taps),
    }


def zoo_ratios(
    device: torch.device, batch: int, size: int, width: int, reps: int
) -> dict[str, dict[str, Any]]:
    """:func:`zoo_ratio` of every ``conf/model`` architecture."""
    from zoo import architectures

    out: dict[str, dict[str, Any]] = {}
    for name in architectures():
        out[name] = zoo_ratio(name, device, batch, size, width, reps)
        print(
            f"zoo {name}: explain / forward+backward = {out[name]['ratio_vs_forward_backward']:.2f}"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps", type=int, default=7, help="repetitions of forward+backward and explain"
    )
    parser.add_argument("--naive-reps", type=int, default=3, help="repetitions of the naive way")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--zoo-reps", type=int, default=3, help="repetitions per zoo architecture")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    base, depth, size, batch = (4, 2, 32, 2) if args.tiny else (8, 4, 256, 8)
    reps, naive_reps = (1, 1) if args.tiny else (args.reps, max(1, args.naive_reps))

    torch.manual_seed(0)
    model = SiameseUNet(3, base, depth, "concat", shared_encoder=True).to(device).eval()
    pre = torch.rand(batch, 3, size, size, device=device)
    post = torch.rand(batch, 3, size, size, device=device)
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()

    def run_fb():
        return forward_backward(model, pre, post, mask)

    def run_explain():
        # the model's own taps, like the naive way (taps=None adds the input layer)
        return explain_batch(model, pre, post, taps=list(find_taps(model)), target=TARGET)

    fb = synchronized(run_fb, device)
    explain = synchronized(run_explain, device)
    slow = synchronized(lambda: naive(model, pre, post), device)
    for fn in (fb, explain):  # warm-up (allocator, kernels); the naive way runs the same kernels
        fn()
    fb_s, explain_s, naive_s = [], [], []
    for _ in range(reps):
        fb_s.append(timed(fb)[0])
        explain_s.append(timed(explain)[0])
    reference: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(naive_reps):
        seconds, reference = timed(slow)
        naive_s.append(seconds)
        fb_s.append(timed(fb)[0])
        explain_s.append(timed(explain)[0])

    exp = explain()
    max_diff = max(
        (exp.upsampled[m][t] - reference[m][t]).abs().max().item()
        for m in reference
        for t in reference[m]
    )
    n_taps = len(exp.taps)
    figures = {
        "ratio_vs_forward_backward": median(explain_s) / median(fb_s),
        "speedup_vs_naive": median(naive_s) / median(explain_s),
        "forward_backward_s": median(fb_s),
        "explain_s": median(explain_s),
        "naive_s": median(naive_s),
        "max_abs_diff_vs_captum": max_diff,
        "setup": {
            "model": f"SiameseUNet(3, {base}, {depth}), shared encoder, concat, eval mode",
            "input": f"{batch} x 3 x {size} x {size}",
            "device": str(device),
            "taps": n_taps,
            "methods": ["hirescam", "gradcam"],
            "target": TARGET,
            "naive_captum_calls": 2 * n_taps,
            "reps": len(fb_s),
            "naive_reps": naive_reps,
        },
        "machine": machine(),
    }
    zoo = zoo_ratios(device, batch, size, 4 if args.tiny else 8, 1 if args.tiny else args.zoo_reps)
    figures["zoo"] = zoo
    figures["zoo_max_ratio_vs_forward_backward"] = max(
        r["ratio_vs_forward_backward"] for r in zoo.values()
    )
    print(
        f"{n_taps} taps x 2 methods, batch {batch} at {size}²: forward+backward {median(fb_s):.3f} s, "
        f"explanation {median(explain_s):.3f} s (x{figures['ratio_vs_forward_backward']:.2f}), "
        f"captum per tap {median(naive_s):.3f} s (engine {figures['speedup_vs_naive']:.1f}x faster); "
        f"max |engine - captum| = {max_diff:.2e}"
    )
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

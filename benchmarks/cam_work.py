"""Where the CAM-panel callback's work goes: explaining the fixed samples vs drawing their panels.

One validation epoch's work of ``callbacks.cam_panels`` (:func:`explain_samples` with the
callback's default settings, ``conf/explain/callback.yaml``): ``k`` fixed samples explained at
every tap with both methods, the short deletion curves, then the 2×4 panels drawn and written as
PNG files. Measured on the training device (the GPU when there is one, as ``mode=inline`` runs
it), for ``k = 8`` pairs of 256² and the quickstart network by default (``--width 32``: the
full-scale setting, about a minute per epoch on a 2-core CPU). The figure is the drawing's share
of the work, measured in the same runs; the explanation runs on the device, the drawing always
on one CPU core.

    python benchmarks/cam_work.py [--width 8] [--k 8] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from common import emit, machine, median

from changecam.models import SiameseUNet
from changecam.training.callbacks.cam_panels import DEFAULT_EXPLAIN
from changecam.training.callbacks.cam_worker import explain_samples


def samples(k: int, size: int, seed: int = 0) -> dict[str, Any]:
    """``k`` random pairs with a square of change each (the drawing does not depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    pre = torch.rand(k, 3, size, size, generator=generator)
    post = torch.rand(k, 3, size, size, generator=generator)
    mask = torch.zeros(k, 1, size, size)
    mask[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
    return {"pre": pre, "post": post, "mask": mask, "name": [f"pair_{i}" for i in range(k)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8, help="base_channels of the U-Net")
    parser.add_argument("--k", type=int, default=8, help="fixed samples")
    parser.add_argument("--size", type=int, default=256, help="sample side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after one warm-up")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.width, args.k, args.size, args.repeats = 4, 2, 32, 1

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = SiameseUNet(3, args.width, 4).eval().to(device)
    chosen = samples(args.k, args.size)
    busy, drawing = [], []
    with tempfile.TemporaryDirectory() as out:
        for epoch in range(args.repeats + 1):
            result = explain_samples(net, chosen, DEFAULT_EXPLAIN, out, epoch, epoch)
            if epoch:  # the first one builds the panel layout and warms the device up
                busy.append(result.busy_s)
                drawing.append(result.draw_s)
    work, draw = median(busy), median(drawing)
    figures = {
        "benchmark": "cam_work",
        "machine": machine(),
        "device": device.type,
        "width": args.width,
        "k": args.k,
        "size": args.size,
        "repeats": args.repeats,
        "dpi": DEFAULT_EXPLAIN.dpi,
        "cam_work_s": round(work, 3),
        "cam_explain_s": round(work - draw, 3),
        "cam_draw_s": round(draw, 3),
        "cam_draw_s_per_panel": round(draw / args.k, 4),
        "cam_draw_share": round(draw / work, 3),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

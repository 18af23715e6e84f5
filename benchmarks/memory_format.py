"""Inference in the channels-last memory format vs the default, for every architecture.

What :func:`changecam.models.inference.inference_network` does for predict.py and explain.py:
the same network, freshly initialised (seed 0) at ``base_channels`` 8 from its
``conf/model/<name>.yaml``, run side by side in its default (NCHW) and its channels-last copy
on the same batch of random 256² pairs (``--batch`` 4, the sliding window's windows per
forward pass):

* ``predict``: a forward pass without gradients;
* ``explain``: :func:`changecam.explain.explain_tensors` with HiResCAM at the deepest per-date
  layer, what predict.py's GeoTIFF path runs per batch of windows.

Runs alternate within each repetition; the figures are ratios of medians (default seconds /
channels-last seconds: above 1 means channels-last is faster), plus the largest difference of
the logits and of the post maps, relative to their largest magnitude and absolute. (A freshly
initialised FC-Siam network's maps cancel to about 1e-7 at its deepest layer, so there the
relative figure is the rounding of sums that nearly cancel: read the absolute one.)

    python benchmarks/memory_format.py [--reps 5] [--threads 0] [--tiny]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch
from common import emit, machine, median, timed
from zoo import architectures

from changecam.explain import ExplainSettings, FaithfulnessSettings, explain_tensors
from changecam.explain.hirescam import choose_layer, per_date_layers, resolve_taps
from changecam.models import size_multiple
from changecam.models.inference import inference_network


def compare(name: str, batch: int, size: int, width: int, reps: int) -> dict[str, Any]:
    """Default vs channels-last of ``conf/model/<name>.yaml`` (see the module docstring)."""
    from zoo import published_network

    torch.manual_seed(0)
    default = published_network(name, width).eval()
    fast = inference_network(published_network(name, width), "cpu")
    fast.load_state_dict(default.state_dict())
    side = -(-size // size_multiple(default)) * size_multiple(default)
    pre, post = torch.rand(2, batch, 3, side, side).unbind(0)
    layer = choose_layer(per_date_layers(resolve_taps(default, None)), None, "layer")
    settings = ExplainSettings(
        taps=(layer,),
        methods=("hirescam",),
        threshold=0.5,
        faithfulness=FaithfulnessSettings(enabled=False),
    )

    def predict(net: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return net(pre, post)

    def explain(net: torch.nn.Module) -> Any:
        return explain_tensors(net, pre, post, settings, upsample=True)

    seconds: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    for task, fn in (("predict", predict), ("explain", explain)):
        for fmt, net in (("default", default), ("channels_last", fast)):
            results[task, fmt] = fn(net)  # warm-up, and the values compared below
        for _ in range(reps):
            for fmt, net in (("default", default), ("channels_last", fast)):
                seconds.setdefault(f"{task}_{fmt}", []).append(timed(partial(fn, net))[0])

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    maps = [
        results["explain", fmt].explanation.upsampled["hirescam"]
        for fmt in ("channels_last", "default")
    ]
    key = f"post/{layer}"
    return {
        "predict_speedup": median(seconds["predict_default"])
        / median(seconds["predict_channels_last"]),
        "explain_speedup": median(seconds["explain_default"])
        / median(seconds["explain_channels_last"]),
        "seconds": {k: round(median(v), 4) for k, v in seconds.items()},
        "logits_max_relative_difference": relative(
            results["predict", "channels_last"], results["predict", "default"]
        ),
        "map_max_relative_difference": relative(maps[0][key], maps[1][key]),
        "map_max_abs_difference": float((maps[0][key] - maps[1][key]).abs().max()),
        "map_max_abs": float(maps[1][key].abs().max()),
        "layer": layer,
        # what was compared: the fast network's 4-d weights in channels-last, the other's not
        "channels_last_weights": {
            fmt: all(
                p.is_contiguous(memory_format=torch.channels_last)
                for p in net.parameters()
                if p.ndim == 4
            )
            for fmt, net in (("default", default), ("channels_last", fast))
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    parser.add_argument("--batch", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, width, reps, names = (
        (32, 4, 1, ["siamese_unet"]) if args.tiny else (256, 8, args.reps, architectures())
    )
    per_model = {}
    for name in names:
        per_model[name] = compare(name, args.batch, size, width, reps)
        print(
            f"{name}: predict {per_model[name]['predict_speedup']:.2f}x, "
            f"explain {per_model[name]['explain_speedup']:.2f}x",
            flush=True,
        )
    figures = {
        "models": {
            name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for name, row in per_model.items()
        },
        "siamese_unet_predict_speedup": round(per_model["siamese_unet"]["predict_speedup"], 3),
        "siamese_unet_explain_speedup": round(per_model["siamese_unet"]["explain_speedup"], 3),
        "min_predict_speedup": round(min(r["predict_speedup"] for r in per_model.values()), 3),
        "batch": args.batch,
        "size": size,
        "base_channels": width,
        "reps": reps,
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

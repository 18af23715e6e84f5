"""The model zoo side by side: size, step cost, quickstart scores and where each looks, per date.

For every architecture in ``conf/model/`` (except ``external``, which needs a user's model):

* ``params``: parameters at the published width (the config's defaults);
* ``step_s``: wall-clock seconds (on the CPU) of one training step (forward, BCE backward, AdamW step) at batch
  8 × 256² and the quickstart width, median of ``--step-reps`` after one warm-up (the
  published widths cost 2–160 s a step on two cores);
* ``val_f1``/``test_f1``: ``train.py experiment=quickstart model=<name>`` for ``--epochs`` epochs
  at quickstart width (``model.base_channels`` = ``--width``, 8 like ``make train``), the best
  checkpoint on the synthetic val and test splits;
* ``post_share``: the mean HiResCAM post share ``P_post / (P_pre + P_post)`` of that checkpoint
  on the val images (target: predicted change), for each per-date layer, ``input`` included
  (gradient × input); images whose target is empty are left out.

All architectures share one synthetic dataset, seed and budget. It is not part of ``make bench``
(training every architecture takes longer than that whole run); ``make bench-zoo`` runs it and
writes ``benchmarks/zoo.md``.

    python benchmarks/zoo.py [--epochs 3] [--width 8] [--only fc_ef bit] [--tiny]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import REPO, TINY_QUICKSTART, emit, machine, median, quickstart_config, timed
from omegaconf import OmegaConf

from changecam.atomic import write_text
from changecam.cli.common import close_wandb
from changecam.cli.train import train
from changecam.data.io import read_image
from changecam.data.layout import find_triplets
from changecam.data.transforms import image_to_tensor
from changecam.explain import explain_batch, per_date_layers
from changecam.models import build_network, find_taps, size_multiple
from changecam.training.checkpoint import load_network

MODEL_DIR = REPO / "conf" / "model"
NOT_IN_ZOO = ("external",)


def architectures() -> list[str]:
    """Every ``conf/model/<name>.yaml`` that describes a network on its own."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if p.stem not in NOT_IN_ZOO)


def published_network(name: str, width: int | None = None) -> torch.nn.Module:
    """The network of ``conf/model/<name>.yaml`` (optionally at another ``base_channels``)."""
    config = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"), resolve=True)
    if width is not None:
        config["base_channels"] = width
    return build_network(config)


def step_seconds(net: torch.nn.Module, batch: int, size: int, reps: int) -> float:
    """Median seconds of one training step of ``net`` on random data."""
    size = math.ceil(size / size_multiple(net)) * size_multiple(net)
    pre, post = torch.rand(2, batch, 3, size, size).unbind(0)
    target = (torch.rand(batch, 1, size, size) > 0.95).float()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(net(pre, post), target).backward()
        optimizer.step()

    step()  # warm-up
    return median([timed(step)[0] for _ in range(reps)])


def mean_post_shares(
    net: torch.nn.Module, root: Path, limit: int | None
) -> dict[str, float | None]:
    """Mean post share per per-date layer of ``net`` over the val images of ``root``."""
    net.eval()
    shares: dict[str, list[float]] = {}
    triplets = find_triplets(root, "val", "levir")[:limit]
    layers = per_date_layers(find_taps(net))
    taps = ["input", *layers]
    for triplet in triplets:
        pre = image_to_tensor(read_image(triplet.pre))[None]
        post = image_to_tensor(read_image(triplet.post))[None]
        exp = explain_batch(net, pre, post, taps=taps, methods=("hirescam",), upsample=False)
        for layer in exp.layers:
            value = float(exp.post_share(layer)[0])
            if not math.isnan(value):
                shares.setdefault(layer, []).append(value)
    return {
        layer: (float(np.mean(shares[layer])) if shares.get(layer) else None)
        for layer in ["input", *layers]
    }


def quickstart_row(name: str, epochs: int, width: int, tmp: Path, tiny: bool) -> dict[str, Any]:
    """Train ``experiment=quickstart model=<name>``; scores and post shares of its best checkpoint."""
    run_root = tmp / name
    overrides = [
        f"model={name}",
        f"trainer.max_epochs={epochs}",
        f"data.root={tmp / 'synthetic'}",  # one dataset, generated once, for every architecture
        "logger=none",
        "callbacks.cam_panels=null",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_progress_bar=false",
        *(TINY_QUICKSTART if tiny else []),
        f"model.base_channels={width}",
    ]
    overrides = [o for o in overrides if o != "model.depth=2"]  # not every network has a depth
    cfg = quickstart_config(run_root, overrides)
    cfg.print_config = False
    seconds, metrics = timed(lambda: train(cfg))
    close_wandb()
    best = next((run_root / "run" / "checkpoints").glob("best*.ckpt"))
    shares = mean_post_shares(load_network(best), tmp / "synthetic", 2 if tiny else None)
    return {
        "val_f1": metrics.get("val/f1"),
        "test_f1": metrics.get("test/f1"),
        "train_s": seconds,
        "post_share": shares,
    }


def markdown(rows: dict[str, dict[str, Any]], epochs: int, width: int) -> str:
    """The README table."""

    def fmt(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"| model | params (published width) | s/step, 8 × 256², width {width} | val F1 | test F1 | "
        "post share, input | post share per layer (shallow → deep) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        shares = dict(row["post_share"])
        input_share = shares.pop("input", None)
        layers = ", ".join(f"{k} {fmt(v, 2)}" for k, v in shares.items())
        lines.append(
            f"| `{name}` | {row['params'] / 1e6:.2f} M | {fmt(row['step_s'], 2)} | "
            f"{fmt(row['val_f1'])} | {fmt(row['test_f1'])} | {fmt(input_share, 2)} | {layers} |"
        )
    lines.append(
        f"\nQuickstart at `model.base_channels={width}`, {epochs} epochs each (`make train` trains "
        "20), same seed and synthetic data; the step cost at that width, CPU. Measured by "
        "`make bench-zoo` (benchmarks/zoo.py)."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="quickstart epochs per architecture")
    parser.add_argument("--width", type=int, default=8, help="quickstart model.base_channels")
    parser.add_argument("--step-reps", type=int, default=3, help="timed training steps")
    parser.add_argument("--only", nargs="+", default=None, help="architecture names")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "zoo.md")
    parser.add_argument("--tiny", action="store_true", help="a smoke run (tests)")
    args = parser.parse_args(argv)
    names = args.only or architectures()
    epochs, width = (1, 4) if args.tiny else (args.epochs, args.width)
    batch, size, reps = (2, 32, 1) if args.tiny else (8, 256, args.step_reps)
    torch.manual_seed(0)

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="changecam-zoo-") as tmp:
        for name in names:
            net = published_network(name, width)
            row = {
                "params": sum(p.numel() for p in published_network(name).parameters()),
                "step_s": step_seconds(net, batch, size, reps),
            }
            del net
            row.update(quickstart_row(name, epochs, width, Path(tmp), args.tiny))
            rows[name] = row
            print(f"{name}: {row}", flush=True)
    table = markdown(rows, epochs, width)
    if not args.tiny:
        write_text(args.out, table)
    print(table)
    figures = {
        "architectures": rows,
        "setup": {"epochs": epochs, "quickstart_width": width, "step_batch": batch, "size": size},
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

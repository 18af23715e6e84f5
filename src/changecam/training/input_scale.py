"""The pixel scale a network was trained at: recorded in its checkpoint, checked where it runs.

Under ``data.train_protocol=resize`` (the seed notebook's recipe, ``experiment=
siamese_unet_seed``) every whole training image is resized to ``patch_size``², so a network
trained on 1024² LEVIR-CD images saw each of its pixels cover 4 x 4 image pixels. Run on images
at their own resolution (predict.py, explain.py, or eval.py with another ``eval_protocol``) it
sees buildings four times larger than it learned them, and its output can be poor without any
error. The other protocols (tiles, random crops, whole images) keep the images' own scale.

``train.py`` records the training data's protocol in every checkpoint (:func:`record_data`,
key :data:`DATA_KEY`); :func:`scale_warning` compares it with the scale a command runs the
network at. Checkpoints written before the record, and plain state dicts, carry none: nothing
can be said about them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

DATA_KEY = "data_protocol"


def record_data(checkpoint: dict[str, Any], datamodule: Any) -> None:
    """Record ``datamodule``'s training protocol in a checkpoint about to be saved (nothing for
    a datamodule that has no ``train_protocol``, e.g. a user's own)."""
    protocol = getattr(datamodule, "train_protocol", None)
    if protocol is None or getattr(datamodule, "patch_size", None) is None:
        return
    record: dict[str, Any] = {
        "train_protocol": str(protocol),
        "patch_size": int(datamodule.patch_size),
    }
    sizes = getattr(datamodule, "image_sizes", None)
    if protocol == "resize" and sizes is not None:
        record["image_sizes"] = [list(size) for size in sizes("train")]
    checkpoint[DATA_KEY] = record


def resize_factors(patch_size: int, sizes: Iterable[Iterable[int]]) -> list[float]:
    """Network pixels per image pixel of ``resize`` to ``patch_size``², per distinct image side
    (smallest first)."""
    return sorted({patch_size / side for size in sizes for side in size})


def training_factors(record: Mapping[str, Any] | None) -> list[float] | None:
    """Network pixels per image pixel the checkpoint's network was trained at (``[1.0]``: the
    images' own scale), or ``None`` when the checkpoint records nothing."""
    if not isinstance(record, Mapping) or "train_protocol" not in record:
        return None
    if record["train_protocol"] != "resize":
        return [1.0]
    return resize_factors(int(record["patch_size"]), record.get("image_sizes") or [])


def describe_factors(factors: list[float]) -> str:
    """``1/4`` for ``[0.25]``; ``1/4 to 1/2`` for several."""

    def one(factor: float) -> str:
        return f"1/{1 / factor:.3g}" if factor < 1 else f"{factor:.3g}"

    return one(factors[0]) if len(factors) == 1 else f"{one(factors[0])} to {one(factors[-1])}"


def describe_protocol(
    stage: Literal["train", "eval"], protocol: str, patch_size: int, sizes: Iterable[Iterable[int]]
) -> str:
    """How ``data.<stage>_protocol`` feeds the images to the network, with its scale, for a
    message."""
    if protocol != "resize":
        return f"images at their own resolution (data.{stage}_protocol={protocol}, scale 1)"
    sizes = [tuple(size) for size in sizes]
    factors = resize_factors(patch_size, sizes)
    shown = ", ".join(f"{h}x{w}" for h, w in sizes) or "whole"
    cover = f", each network pixel covering {1 / factors[0]:.3g}x{1 / factors[0]:.3g} image pixels"
    return (
        f"{shown} images resized to {patch_size}x{patch_size} (data.{stage}_protocol=resize, "
        f"scale {describe_factors(factors)}{cover if len(factors) == 1 and factors[0] < 1 else ''})"
    )


def scale_warning(
    record: Mapping[str, Any] | None,
    path: Any,
    command: str,
    remedy: str,
    run_factors: list[float] | None = None,
    run_protocol: str | None = None,
) -> str | None:
    """The warning for running the checkpoint at ``path`` at a scale it was not trained at, or
    ``None`` (the same scale, or nothing recorded).

    Args:
        record: the checkpoint's :data:`DATA_KEY` record.
        path: the checkpoint (for the message).
        command: who runs it, e.g. ``predict.py``.
        remedy: what to do instead (the message's last sentence).
        run_factors: network pixels per image pixel the command runs at (default ``[1.0]``:
            the images' own resolution).
        run_protocol: how the command feeds the images (:func:`describe_protocol` of the
            ``eval`` stage), default: at their own resolution.
    """
    trained = training_factors(record)
    run = run_factors or [1.0]
    if not trained or all(any(abs(t - r) < 1e-9 for t in trained) for r in run):
        return None  # every scale it runs at is one it was trained at
    assert record is not None  # training_factors found a record
    how = describe_protocol(
        "train",
        record["train_protocol"],
        int(record["patch_size"]),
        record.get("image_sizes") or [],
    )
    where = run_protocol or "images at their own resolution (scale 1)"
    return (
        f"{path} was trained on {how}, but {command} runs it on {where}: a scale it never saw, "
        f"so its output may be poor without any error. {remedy}"
    )


def eval_remedy(record: Mapping[str, Any], sizes: list[tuple[int, int]], windows: bool) -> str:
    """What eval.py (or another scorer of a data module's split) should be given to score the
    checkpoint at its training scale: ``sizes`` are the split's image sizes, ``windows`` whether
    sliding windows replace the data module's protocol."""
    off = " sliding_window.enabled=false" if windows else ""
    and_off = ", and set sliding_window.enabled=false" if windows else ""
    factors = training_factors(record) or [1.0]
    if record.get("train_protocol") != "resize" or factors == [1.0]:
        return (
            "Score it at the images' own resolution: data.eval_protocol=tiles (or full, or "
            "sliding_window.enabled=true)."
        )
    sides = {side for size in sizes for side in size}
    if len(factors) == 1 and len(sides) == 1:
        patch = sides.pop() * factors[0]
        if abs(patch - round(patch)) < 1e-9:
            return (
                f"Score it at its training scale: data.eval_protocol=resize "
                f"data.patch_size={round(patch)}{off}."
            )
    return (
        f"Score it at its training scale ({describe_factors(factors)}): data.eval_protocol=resize "
        f"with data.patch_size the images' side times that scale{and_off}."
    )


__all__ = [
    "DATA_KEY",
    "describe_factors",
    "describe_protocol",
    "eval_remedy",
    "record_data",
    "resize_factors",
    "scale_warning",
    "training_factors",
]

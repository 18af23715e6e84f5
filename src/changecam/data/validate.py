"""Checking the splits a run will use before any work: lists, files, headers, sizes.

:class:`~changecam.data.ChangeDetectionDataModule` runs this at its first set-up, for every
split the run will use (``data.validate``):

* ``headers`` (default): every file of every triplet is opened and its header read (size,
  mode, bit depth; no pixels decoded), and its length checked against what the header
  promises (:func:`changecam.data.io.read_header`). The pre, post and label of a triplet must
  agree in size, the images must be 8-bit RGB or grey, the labels single-band, and the sizes
  must suit the sampling protocol, ``data.patch_size`` and the network's size multiple.
  Labels stored as RGB or palette images are decoded too (grey in those modes is fine; a
  colour label is only visible in its pixels).
  637 LEVIR-CD-sized triplets take well under a second (``benchmarks/validate_data.py``).
* ``full``: the same, then every file is decoded once as the loaders will decode it, with a
  progress bar (label values, transparency and corrupt compressed data are only visible there).
* ``none``: only the split lists and the pairing of files are checked.

The lists and the pairing (:func:`changecam.data.layout.find_triplets`) raise on their first
problem; the per-file checks collect every problem and raise one
:class:`DataValidationError` listing them. Two things are warned about instead (on global rank
zero): a val or test split whose ``tiles`` leave border strips unscored
(:func:`warn_unscored_borders`), and a pair of files in two splits or repeated in one
(:func:`warn_shared_pairs`, which the data module calls).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from changecam.data.io import (
    ImageHeader,
    layout_problem,
    read_header,
    read_image,
    read_label,
)
from changecam.data.layout import Triplet

Validation = Literal["headers", "full", "none"]
VALIDATIONS: tuple[str, ...] = get_args(Validation)
SHOWN_PROBLEMS = 12  # problems spelled out in one error; the rest are counted
# label modes that may hold colour: decoded even by the header check (grey LEVIR labels are "L")
COLOUR_CAPABLE_LABEL_MODES = frozenset({"RGB", "P"})

log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """Files of the splits a run uses cannot be used as they are (all problems are listed)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:SHOWN_PROBLEMS])
        more = len(self.problems) - SHOWN_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"the data cannot be used as it is ({len(self.problems)} problem(s), found before "
            f"any training or evaluation):\n  {shown}{tail}"
        )


@dataclass(frozen=True)
class SplitUse:
    """One split and how the run samples it.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        triplets: its files.
        protocol: its sampling protocol (``tiles``, ``random_crop``, ``resize``, ``full``).
        protocol_key: the config key of the protocol (``data.train_protocol`` ...).
        batch_size: samples per batch.
        batch_key: the config key of the batch size.
    """

    split: str
    triplets: Sequence[Triplet]
    protocol: str
    protocol_key: str
    batch_size: int
    batch_key: str


@dataclass(frozen=True)
class NetworkFit:
    """What the sizes must suit: the network's ``size_multiple`` and words naming it."""

    multiple: int = 1
    description: str = "the network"
    hint: str = ""  # how to change the multiple, e.g. "a lower model.depth"


def network_fit(net: Any) -> NetworkFit:
    """The size multiple of a network (its ``size_multiple`` attribute, the models protocol's
    one; 1 when it has none, e.g. a sliding-window wrapper) and a description for messages."""
    multiple = getattr(net, "size_multiple", 1)
    multiple = multiple if isinstance(multiple, int) and multiple >= 1 else 1
    name = type(net).__name__
    depth = getattr(net, "depth", None)
    if isinstance(depth, int) and not isinstance(depth, bool):
        return NetworkFit(multiple, f"{name}, model.depth={depth}", "a lower model.depth")
    return NetworkFit(multiple, name, "another model")


def check_mode(mode: str) -> Validation:
    """``mode`` if it is a known ``data.validate`` value, else a :class:`ValueError`."""
    if mode not in VALIDATIONS:
        raise ValueError(
            f"data.validate={mode!r} is not allowed; expected one of {', '.join(VALIDATIONS)}"
        )
    return mode  # type: ignore[return-value]


def validate_splits(
    uses: Sequence[SplitUse],
    patch_size: int,
    network: NetworkFit = NetworkFit(),
    mode: Validation = "headers",
) -> None:
    """Check the files of every split in ``uses`` (see the module docstring).

    Raises:
        DataValidationError: listing every problem found.
    """
    check_mode(mode)
    if mode == "none":
        return
    start = time.perf_counter()
    problems: list[str] = []
    for use in uses:
        sizes: dict[Triplet, tuple[int, int]] = {}
        for triplet in use.triplets:
            size, found = triplet_headers(triplet)
            problems += found
            if size is not None:
                sizes[triplet] = size
        problems += protocol_problems(use, sizes, patch_size, network)
        warn_unscored_borders(use, sizes, patch_size)
    count = sum(len(use.triplets) for use in uses)
    log.debug("checked the headers of %d triplets in %.2f s", count, time.perf_counter() - start)
    if not problems and mode == "full":
        problems += decode_all(t for use in uses for t in use.triplets)
    if problems:
        raise DataValidationError(problems)


def triplet_headers(triplet: Triplet) -> tuple[tuple[int, int] | None, list[str]]:
    """The (height, width) of a triplet from its headers and the problems found (size
    ``None`` when a file cannot be read)."""
    problems: list[str] = []
    headers: dict[str, ImageHeader] = {}
    files = {"pre": triplet.pre, "post": triplet.post}
    if triplet.label is not None:
        files["label"] = triplet.label
    for role, path in files.items():
        try:
            headers[role] = read_header(path)
        except (OSError, ValueError) as err:
            problems.append(str(err))
    unfit = {
        role: layout_problem(h.path, h.mode, h.bits, "label" if role == "label" else "image")
        for role, h in headers.items()
    }
    problems += [problem for problem in unfit.values() if problem]
    label = headers.get("label")
    if label is not None and not unfit["label"] and label.mode in COLOUR_CAPABLE_LABEL_MODES:
        try:  # grey saved as RGB or a palette is fine; a colour label shows only in its pixels
            read_label(label.path)
        except (OSError, ValueError) as err:
            problems.append(str(err))
    if len(headers) < len(files):
        return None, problems
    size = headers["pre"].size
    for role in ("post", "label"):
        other = headers.get(role)
        if other is not None and other.size != size:
            problems.append(
                f"triplet {triplet.name!r}: {other.path} is {other.height}x{other.width} but "
                f"{triplet.pre} is {size[0]}x{size[1]} (height x width); pre, post and label "
                "must have the same size"
            )
    return size, problems


def warn_shared_pairs(splits: Mapping[str, Sequence[Triplet]], new: Sequence[str]) -> None:
    """Warn where a split of ``new`` holds the same pair of image files (pre and post: a link,
    hard or symbolic, is the file it names) as another split of ``splits``, or twice itself: a
    name listed in two split lists, or a folder given twice (``data.extra_train`` holding
    ``data.root``), trains on or selects by what a later split scores, or trains on some pairs
    more often than the others. Each pair of splits once; on global rank zero only."""
    if rank_zero_only.rank != 0:
        return
    pairs = {split: _pair_ids(found) for split, found in splits.items()}
    for i, split in enumerate(new):
        repeated = sum(1 for paths in pairs[split].values() if len(paths) > 1)
        if repeated:
            log.warning(
                "the %s split holds %d of its pairs more than once (%s): they weigh more than "
                "the others",
                split,
                repeated,
                "a folder given twice, e.g. data.extra_train holding data.root"
                if split == "train"
                else "a name listed twice, or linked files",
            )
        for other in splits:
            if other == split or other in new[i:]:
                continue  # each pair once: a new split is compared with those before it
            shared = pairs[split].keys() & pairs[other].keys()
            if shared:
                first = min(pairs[split][key][0] for key in shared)
                log.warning(
                    "the %s split shares %d of its %d pairs with the %s split (e.g. %s): its "
                    "scores are not held out from it",
                    split,
                    len(shared),
                    len(splits[split]),
                    other,
                    first,
                )


def _pair_ids(triplets: Sequence[Triplet]) -> dict[tuple[int, ...], list[Path]]:
    """The pre images of ``triplets`` by the identity (device, inode) of their pre and post
    files; a file that cannot be read is left out (the loader names it)."""
    ids: dict[tuple[int, ...], list[Path]] = {}
    for t in triplets:
        try:
            pre, post = os.stat(t.pre), os.stat(t.post)
        except OSError:
            continue
        ids.setdefault((pre.st_dev, pre.st_ino, post.st_dev, post.st_ino), []).append(Path(t.pre))
    return ids


def warn_unscored_borders(
    use: SplitUse, sizes: dict[Triplet, tuple[int, int]], patch_size: int
) -> float:
    """Warn where ``tiles`` leaves part of a scored split (val, test) unscored: the border
    strips beyond the last whole tile of sides that are not a multiple of ``patch_size``.
    Returns the share of the split's pixels its tiles cover (1.0 when all, or not tiles)."""
    if use.protocol != "tiles" or use.split == "train" or not sizes:
        return 1.0
    total = sum(h * w for h, w in sizes.values())
    covered = sum((h // patch_size) * (w // patch_size) for h, w in sizes.values()) * patch_size**2
    if covered == total or rank_zero_only.rank != 0:  # each rank of a DDP run checks them
        return covered / total
    cut = [(t, s) for t, s in sizes.items() if s[0] % patch_size or s[1] % patch_size]
    t, (h, w) = cut[0]
    log.warning(
        "%s=tiles scores %.1f %% of the %s split's pixels: %s %s sides that are not a "
        "multiple of data.patch_size=%d (e.g. %s is %dx%d), and the strip beyond the last whole "
        "tile is never scored; score whole images with %s=full or eval.py's "
        "sliding_window.enabled=true",
        use.protocol_key,
        100 * covered / total,
        use.split,
        _count(cut, use),
        "have" if len(cut) > 1 else "has",
        patch_size,
        t.pre,
        h,
        w,
        use.protocol_key,
    )
    return covered / total


def protocol_problems(
    use: SplitUse, sizes: dict[Triplet, tuple[int, int]], patch_size: int, network: NetworkFit
) -> list[str]:
    """What keeps a split's sampling protocol from producing batches the network takes."""
    multiple, problems = network.multiple, []
    fit = (
        f"the network's size multiple {multiple} ({network.description})"
        if multiple > 1
        else "the network's size multiple"
    )
    if use.protocol in ("tiles", "random_crop"):
        small = [(t, s) for t, s in sizes.items() if s[0] < patch_size or s[1] < patch_size]
        if small:
            t, (h, w) = small[0]
            problems.append(
                f"{_count(small, use)} of the {use.split} split are smaller than "
                f"data.patch_size={patch_size}, e.g. {t.pre} is {h}x{w}; lower data.patch_size "
                f"or set {use.protocol_key}=resize"
            )
    if use.protocol in ("tiles", "random_crop", "resize") and patch_size % multiple:
        problems.append(
            f"data.patch_size={patch_size} is not a multiple of {fit}, so no {use.split} "
            f"sample ({use.protocol_key}={use.protocol}) can pass through it; use a "
            f"data.patch_size that is a multiple of {multiple} ({_near(patch_size, multiple)}) "
            f"or {network.hint}"
        )
    if use.protocol == "full":
        odd = [(t, s) for t, s in sizes.items() if s[0] % multiple or s[1] % multiple]
        if odd:
            t, (h, w) = odd[0]
            problems.append(
                f"{use.protocol_key}=full feeds whole images to the network, and "
                f"{_count(odd, use)} of the {use.split} split have sides that are not a multiple "
                f"of {fit}, e.g. {t.pre} is {h}x{w}; use {use.protocol_key}=tiles or "
                f"random_crop with a data.patch_size that is a multiple of {multiple}, "
                f"{use.protocol_key}=resize, or {network.hint}"
            )
        distinct = sorted(set(sizes.values()))
        if use.batch_size > 1 and len(distinct) > 1:
            first = {s: t for t, s in reversed(list(sizes.items()))}
            (a, b) = distinct[:2]
            problems.append(
                f"{use.protocol_key}=full batches whole images, and the {use.split} split holds "
                f"{len(distinct)} different sizes (e.g. {first[a].pre} is {a[0]}x{a[1]}, "
                f"{first[b].pre} is {b[0]}x{b[1]}), which cannot share a batch; set "
                f"{use.batch_key}=1"
            )
    return problems


def decode_all(triplets: Iterable[Triplet]) -> list[str]:
    """Decode every file once as the loaders do (with a progress bar); the problems found."""
    from tqdm import tqdm

    triplets = list(triplets)
    problems: list[str] = []
    for t in tqdm(triplets, desc="data.validate=full: decoding", unit="triplet"):
        try:
            pre, post = read_image(t.pre), read_image(t.post)
            label = read_label(t.label) if t.label is not None else None
        except (OSError, ValueError) as err:
            problems.append(str(err))
            continue
        if pre.shape != post.shape or (label is not None and label.shape != pre.shape[:2]):
            problems.append(
                f"triplet {t.name!r}: decoded sizes differ: {t.pre} {pre.shape[:2]}, "
                f"{t.post} {post.shape[:2]}"
                + (f", {t.label} {label.shape}" if label is not None else "")
            )
    return problems


def _count(items: Sequence[Any], use: SplitUse) -> str:
    n = len(items)
    return f"{n} of the {len(use.triplets)} images" if n > 1 else "1 image"


def _near(value: int, multiple: int) -> str:
    """Multiples of ``multiple`` close to ``value``: 'e.g. 96 or 112'."""
    low = max(multiple, value // multiple * multiple)
    high = low + multiple if low <= value else low
    return f"e.g. {low} or {high}" if low != high else f"e.g. {low}"

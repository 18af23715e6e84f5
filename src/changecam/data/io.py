"""Reading images and labels with checks that name the offending file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from changecam.atomic import write_bytes

if TYPE_CHECKING:
    from changecam.data.layout import Triplet

cv2.setNumThreads(0)  # decoding runs inside DataLoader workers; no nested thread pools


class ImageReadError(ValueError):
    """An image or label file is unreadable or has unexpected content."""


def _decode(path: Path, kind: str) -> np.ndarray:
    """Decode a file as it is stored (no colour conversion), or say what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageReadError(
            f"{path} could not be decoded as an image (corrupt or unsupported format)"
        )
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as uint8 ``H x W x 3``.

    Grayscale inputs are replicated to three bands; RGBA inputs are accepted only when fully
    opaque (the alpha channel is dropped). Anything else raises :class:`ImageReadError`.
    """
    path = Path(path)
    image = _decode(path, "image")
    if image.dtype != np.uint8:
        raise ImageReadError(f"{path} has dtype {image.dtype}; expected 8-bit RGB")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        if image[..., 3].min() < 255:
            raise ImageReadError(
                f"{path} is RGBA with transparent pixels; expected an opaque RGB image"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] != 3:
        raise ImageReadError(f"{path} has {image.shape[2]} channels; expected RGB")
    # OpenCV decodes BGR; cvtColor swaps in one pass (30x faster than a reversed-stride copy)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """Read a change mask as uint8 ``H x W`` in {0, 1} (files may hold 0/255 or 0/1)."""
    path = Path(path)
    label = _decode(path, "label")
    if label.ndim == 3:
        if not (label == label[..., :1]).all():
            raise ImageReadError(
                f"{path} is a colour image; expected a single-band 0/255 change mask"
            )
        label = label[..., 0]
    # Counting beats np.unique (a sort of every pixel) by an order of magnitude on 1024² masks.
    zeros = np.count_nonzero(label == 0)
    if zeros + np.count_nonzero(label == 255) == label.size:
        return (label > 0).astype(np.uint8)
    if zeros + np.count_nonzero(label == 1) == label.size:
        return label.astype(np.uint8)
    values = np.unique(label)
    raise ImageReadError(
        f"{path} holds label values {values[:10].tolist()}; expected a binary mask of 0/255 or 0/1"
    )


def encode_png(array: np.ndarray, path: str | Path) -> bytes:
    """uint8 RGB (``H x W x 3``), single-band (``H x W``) or 16-bit single-band data as the
    bytes of a PNG file (``path``, its destination, names it in errors)."""
    data = array[..., ::-1] if array.ndim == 3 else array
    try:
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(data))
    except cv2.error as err:
        raise OSError(
            f"could not encode {path} as PNG ({array.dtype} {array.shape}): {err}"
        ) from err
    if not ok:
        raise OSError(f"could not encode {path} as PNG ({array.dtype} {array.shape})")
    return encoded.tobytes()


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write uint8 RGB (``H x W x 3``), single-band (``H x W``) or 16-bit single-band data to a
    PNG file, atomically (:mod:`changecam.atomic`)."""
    write_bytes(path, encode_png(array, path))


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image, read from its header where possible."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as err:  # PIL raises several types for corrupt files
        raise ImageReadError(f"{path} could not be opened as an image: {err}") from err
    return height, width


def pair_size(pair: Triplet) -> tuple[int, int]:
    """(height, width) of a pair from its file headers (no pixels decoded).

    Raises:
        ValueError: the two dates, or the label and the dates, differ in size.
    """
    size, post = image_size(pair.pre), image_size(pair.post)
    if post != size:
        raise ValueError(
            f"pair {pair.name!r}: {pair.pre} is {size[0]}x{size[1]} but {pair.post} is "
            f"{post[0]}x{post[1]} (height x width); both dates must have the same size"
        )
    if pair.label is not None and image_size(pair.label) != size:
        raise ValueError(
            f"pair {pair.name!r}: label {pair.label} is {image_size(pair.label)} but the images "
            f"are {size}"
        )
    return size

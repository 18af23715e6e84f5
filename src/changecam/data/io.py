"""Reading images and labels with checks that name the offending file.

Every image file changecam reads goes through :func:`read_image` or :func:`read_label`, and
a file that is cut short or corrupt is refused with its path, in every format. JPEGs are
decoded by Pillow, whose libjpeg-turbo gives the same pixels as OpenCV's but which reports a
truncated or broken stream as an error (OpenCV fills the missing rows with grey and only
prints libjpeg's warning), and turned upright by their EXIF orientation (sizes from headers
too), as image viewers show them. Other formats are decoded by OpenCV, whose PNG, TIFF and BMP
decoders already refuse such files when they are cut short. Damaged inside, with the file's
length intact, only a PNG is refused (its checksums): libjpeg and libtiff warn about a broken
JPEG or compressed TIFF stream and return the damaged rows.

:func:`read_header` reads what a file's header says (size, mode, bit depth) without decoding
pixels, and checks that the file is not shorter than its header promises: the data
validation at set-up (:mod:`changecam.data.validate`) is built on it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import cv2
import numpy as np

from changecam.atomic import write_bytes

if TYPE_CHECKING:
    from changecam.data.layout import Triplet

cv2.setNumThreads(0)  # decoding runs inside DataLoader workers; no nested thread pools

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_END = b"\xff\xd9"  # EOI; cannot occur inside entropy-coded data (0xFF is stuffed there)
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk with its CRC
TAIL_BYTES = 1024  # where the end markers are looked for (tolerates a little trailing data)
REPAIR_HINT = "re-copy or re-download it (or remove it and its partners from the split)"


class ImageReadError(ValueError):
    """An image or label file is unreadable or has unexpected content."""


Order = Literal["bgr", "rgb"]


def _decode(path: Path, kind: str, check_layout: bool = True) -> tuple[np.ndarray, Order]:
    """Decode a file as it is stored (a JPEG turned upright by its EXIF orientation), or say
    what is wrong with it; a TIFF whose bands cannot
    be an ``image`` or a ``label`` (``kind``) is refused by its tags (:func:`tiff_layout`)
    unless ``check_layout`` is false: OpenCV decodes some of them to their first band.

    Returns:
        The array (H x W or H x W x C) and the order of its colour channels: ``bgr`` from
        OpenCV, ``rgb`` from Pillow (JPEGs).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    data = path.read_bytes()
    if data.startswith(JPEG_MAGIC):
        return _decode_jpeg(path, data), "rgb"
    tiff = tiff_layout(io.BytesIO(data)) if check_layout else None
    problem = tiff and layout_problem(path, tiff[0], tiff[1], kind)
    if problem:
        raise ImageReadError(problem)
    if tiff and tiff[0] == "LA":  # OpenCV keeps only the grey band: its alpha would go unjudged
        return _decode_grey_alpha_tiff(path, data), "bgr"
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error as err:  # e.g. a header over OpenCV's 2**30-pixel limit
        raise ImageReadError(
            f"{path} could not be decoded by OpenCV ({_cv2_reason(err)}); a corrupt header, or "
            "an image over OpenCV's limit of 2**30 pixels (OPENCV_IO_MAX_IMAGE_PIXELS in the "
            "environment raises it; a GeoTIFF scene is predicted window by window instead)"
        ) from None
    if array is None:
        raise ImageReadError(
            f"{path} could not be decoded as an image (truncated, corrupt or unsupported "
            f"format); {REPAIR_HINT}"
        )
    return array, "bgr"


def _cv2_reason(err: Exception) -> str:
    """An OpenCV error's own words, without its version and source path
    (``OpenCV(5.1.0) /io/.../loadsave.cpp:80: error: (-215:Assertion failed) pixels <= ...``)."""
    text = " ".join(str(err).split())
    return text.split(" error: ", 1)[-1] or type(err).__name__


def _decode_grey_alpha_tiff(path: Path, data: bytes) -> np.ndarray:
    """Decode an 8-bit grey + alpha TIFF with GDAL (rasterio) as ``H x W x 4`` (grey three
    times, then alpha), so that :func:`read_image` judges its transparency as an RGBA file's.
    (Pillow misreads the alpha of band-interleaved ones, and cannot open some at all.)"""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.io import MemoryFile

    try:
        with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED="NO"):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(data) as memory, memory.open() as src:
                grey, alpha = src.read()
    except (RasterioError, ValueError) as err:
        raise ImageReadError(
            f"{path} could not be decoded as a grey and alpha TIFF ({err}); {REPAIR_HINT}"
        ) from err
    return np.dstack([grey, grey, grey, alpha])


EXIF_ORIENTATION = 0x0112
TURNED = range(2, 9)  # EXIF orientations of an image stored turned or mirrored (1: upright)
TURNED_ON_ITS_SIDE = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(im: Any) -> int:
    """A JPEG's EXIF orientation: 2 to 8 where it is stored turned, else 1 (a missing,
    unreadable or malformed tag, e.g. stored as text; and other formats, whose pixels OpenCV
    reads as stored). The decoder and the header sizes both take it from here."""
    if im.format not in ("JPEG", "MPO"):  # MPO: a camera's JPEG with a second picture
        return 1
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (TypeError, ValueError, SyntaxError, OSError):  # an unreadable EXIF block
        return 1
    return value if type(value) is int and value in TURNED else 1


def upright_size(im: Any) -> tuple[int, int]:
    """(height, width) of an opened Pillow image as it is read: a JPEG turned by its EXIF
    orientation (:func:`_decode_jpeg`)."""
    turned = _orientation(im) in TURNED_ON_ITS_SIDE
    return (im.width, im.height) if turned else (im.height, im.width)


def _undoing(orientation: int) -> Any:
    """Pillow's transposition that turns an image of EXIF ``orientation`` (2 to 8) upright."""
    from PIL.Image import Transpose

    return {
        2: Transpose.FLIP_LEFT_RIGHT,
        3: Transpose.ROTATE_180,
        4: Transpose.FLIP_TOP_BOTTOM,
        5: Transpose.TRANSPOSE,
        6: Transpose.ROTATE_270,
        7: Transpose.TRANSVERSE,
        8: Transpose.ROTATE_90,
    }[orientation]


def _decode_jpeg(path: Path, data: bytes) -> np.ndarray:
    """Decode a JPEG with Pillow, refusing a truncated or broken stream (``L``/``RGB`` out),
    turned upright by its EXIF orientation."""
    from PIL import JpegImagePlugin

    try:
        # The plugin class directly: no decompression-bomb limit, as with OpenCV for the
        # other formats (satellite scenes are large by nature).
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:
            im.load()
            # turned as its EXIF orientation says (a camera's or a phone's photo stored on its
            # side), as image viewers show it, and as its label was drawn on it
            orientation = _orientation(im)
            upright = im.transpose(_undoing(orientation)) if orientation != 1 else im
            if upright.mode not in ("L", "RGB"):
                upright = upright.convert("RGB")  # CMYK
            return np.array(upright)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(
            f"{path} is a truncated or corrupt JPEG ({err}); {REPAIR_HINT}"
        ) from err


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _without_pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit (about 179 Mpx) lifted while a header is read:
    satellite scenes are large by nature, and OpenCV, which decodes them, has no such limit."""
    from PIL import Image

    with _PIXEL_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as uint8 ``H x W x 3``.

    Grayscale inputs are replicated to three bands; RGBA inputs are accepted only when fully
    opaque (the alpha channel is dropped). Anything else raises :class:`ImageReadError`.
    """
    path = Path(path)
    image, order = _decode(path, "image")
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
    if order == "rgb":
        return image
    # OpenCV decodes BGR; cvtColor swaps in one pass (30x faster than a reversed-stride copy)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """Read a change mask as uint8 ``H x W`` in {0, 1} (files may hold 0/255 or 0/1)."""
    path = Path(path)
    label, _ = _decode(path, "label")
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
    lossy = " (JPEG compression blurs mask edges: store labels as PNG)" if _is_jpeg(path) else ""
    raise ImageReadError(
        f"{path} holds label values {values[:10].tolist()}; expected a binary mask of 0/255 or "
        f"0/1{lossy}"
    )


def read_change_type(path: str | Path) -> np.ndarray:
    """Read the synthetic generator's ``change_type/`` PNG as uint8 ``H x W`` in {0, 1, 2, 3}
    (0 no change, 1 appeared, 2 vanished, 3 replaced)."""
    path = Path(path)
    types, _ = _decode(path, "change type")
    if types.ndim != 2 or types.max(initial=0) > 3:
        raise ImageReadError(
            f"{path} is not a change-type map (single band, values 0 none, 1 appeared, "
            f"2 vanished, 3 replaced); found shape {types.shape}, values up to {types.max()}"
        )
    return types.astype(np.uint8)


def _is_jpeg(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == JPEG_MAGIC


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding pixels.

    Attributes:
        path: the file.
        format: Pillow's format name (``PNG``, ``JPEG``, ``TIFF``, ``BMP`` ...).
        height, width: size in pixels.
        mode: Pillow's mode (``RGB``, ``L``, ``P``, ``1``, ``I;16`` ...).
        bits: bits per sample (1, 8, 16, 32).
    """

    path: Path
    format: str
    height: int
    width: int
    mode: str
    bits: int

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width


IMAGE_MODES = frozenset({"1", "L", "P", "PA", "LA", "RGB", "RGBA", "CMYK"})  # read_image takes
LABEL_MODES = frozenset({"1", "L", "P", "RGB", "I;16", "I;16B", "I;16L", "I;16N"})
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_PHOTOMETRIC = {0: "MinIsWhite", 1: "MinIsBlack", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK",
                6: "YCbCr", 8: "CIELab"}  # fmt: skip
_SAMPLE_KIND = {1: "", 2: "signed ", 3: "float ", 4: "undefined "}


def layout_problem(path: Path, mode: str, bits: int, kind: str) -> str | None:
    """Why a file of this mode and bit depth cannot be an ``image`` or a ``label``, or None."""
    if kind == "image" and (mode not in IMAGE_MODES or bits > 8):
        return (
            f"{path} is {bits}-bit {mode}; expected an 8-bit RGB or grey image (convert it, e.g. "
            "scale 16-bit data to 8 bits)"
        )
    if kind == "label" and mode not in LABEL_MODES:
        return (
            f"{path} is {bits}-bit {mode}; expected a single-band 0/255 (or 0/1) change mask, "
            "e.g. an 8-bit grey PNG"
        )
    return None


def tiff_layout(f: BinaryIO) -> tuple[str, int, int, int] | None:
    """(mode, bits, height, width) of a multi-band TIFF's first image from its tags, or None
    when ``f`` is not a TIFF, its tags cannot be read, or it has one band (not MinIsWhite),
    which Pillow's header names rightly. The mode is Pillow's name where the layout is one
    changecam reads as such, else a description (``4-band RGB and a band that is not
    alpha``): Pillow names a 2-band file ``L`` and RGB plus near-infrared ``RGB``, and cannot
    open 16-bit or float multi-band files at all, while OpenCV, which decodes them, keeps
    only the first band of some of them."""
    from PIL import TiffImagePlugin

    start = f.read(16)
    if start[:4] not in TIFF_MAGIC:
        return None
    big = start[2:4] in (b"+\x00", b"\x00+")
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(start if big else start[:8])
        f.seek(tags.next)
        tags.load(f)
        height, width = int(tags[257]), int(tags[256])
    except Exception:  # a header cut short or damaged: the decoder names it
        return None
    samples = int(tags.get(277, 1))
    depths = tuple(tags.get(258) or (1,))
    formats = set(tags.get(339) or (1,))
    photometric = tags.get(262, 1 if samples < 3 else 2)  # the tag is required; some omit it
    # no ExtraSamples tag: alpha, as Pillow reads it (OpenCV writes RGBA so); 0 says it is not
    alpha = tuple(tags.get(338) or (1,))[:1] in ((1,), (2,))  # associated, unassociated
    bits = max(depths)
    if samples == 1:  # one band cannot be misread as others: Pillow's mode, the values judge
        if photometric == 0:  # GDAL reads the values as stored, Pillow and OpenCV inverted
            return "1-band MinIsWhite TIFF", bits, height, width
        return None
    if formats != {1} or len(set(depths)) > 1:
        return f"{samples}-band {_SAMPLE_KIND.get(max(formats), '')}TIFF", bits, height, width
    layouts = {
        (2, 1): "LA" if alpha else None,
        (3, 2): "RGB",
        (3, 6): "RGB",  # YCbCr: decoded to RGB
        (4, 2): "RGBA" if alpha else None,
        (4, 5): "CMYK",  # decoded to RGB
    }
    mode = layouts.get((samples, photometric))
    if mode is None and (samples, photometric) == (4, 2):
        mode = "4-band RGB and a band that is not alpha (e.g. near-infrared) TIFF"
    elif mode is None:
        mode = f"{samples}-band {_PHOTOMETRIC.get(photometric, photometric)} TIFF"
    return mode, bits, height, width


def read_header(path: str | Path) -> ImageHeader:
    """Size, mode and bit depth of an image file from its header, and a check that the file is
    not shorter than the header promises (no pixels are decoded unless that check fails).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: it cannot be opened as an image, or it is truncated or corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    with open(path, "rb") as f:
        tiff = tiff_layout(f)  # a TIFF's layout from its own tags: Pillow's mode misses bands
    try:
        with open(path, "rb") as f, _without_pixel_limit(), Image.open(f) as im:
            height, width = upright_size(im)
            header = ImageHeader(path, im.format or "", height, width, im.mode, _bits(im))
            complete = _looks_complete(im, f, os.fstat(f.fileno()).st_size)
    except UnidentifiedImageError as err:
        if tiff is not None and tiff[0] not in IMAGE_MODES | LABEL_MODES:
            # an intact TIFF Pillow has no mode for (16-bit or float multi-band, say): named
            # for what it holds, not called damaged
            mode, bits, height, width = tiff
            return ImageHeader(path, "TIFF", height, width, mode, bits)
        raise ImageReadError(
            f"{path} could not be opened as an image (unknown format, or its header is cut "
            f"short); {REPAIR_HINT}"
        ) from err
    except Exception as err:  # Pillow raises several types for corrupt files
        raise ImageReadError(
            f"{path} could not be opened as an image ({err}); {REPAIR_HINT}"
        ) from err
    if not complete:
        # The structure looks cut short: let the decoder judge (it names what is wrong), so a
        # file with unusual trailing data is not refused for it.
        _decode(path, "image", check_layout=False)
    if tiff is not None:
        header = dataclasses.replace(header, mode=tiff[0], bits=tiff[1])
    return header


def _bits(im) -> int:
    """Bits per sample of an opened Pillow image (16-bit RGB shows only in the raw mode)."""
    if im.mode == "1":
        return 1
    if im.mode in ("I", "F"):
        return 32
    args = im.tile[0][3] if im.tile else ""
    raw = str(args[0] if isinstance(args, tuple) and args else args)
    return 16 if "16" in im.mode or ";16" in raw else 8


def _looks_complete(im, f, file_size: int) -> bool:
    """Whether an opened file holds all the bytes its structure says it has (cheap checks:
    end markers of PNG and JPEG, strip and tile extents of TIFF, the pixel array of BMP)."""
    if im.format in ("PNG", "JPEG"):
        f.seek(max(0, file_size - TAIL_BYTES))
        return (PNG_END if im.format == "PNG" else JPEG_END) in f.read()
    if im.format == "TIFF":
        tags = im.tag_v2
        offsets = tags.get(273) or tags.get(324) or ()
        counts = tags.get(279) or tags.get(325) or ()
        return all(o + c <= file_size for o, c in zip(offsets, counts, strict=False))
    if im.format == "BMP" and im.tile and im.tile[0][0] == "raw":
        offset, args = im.tile[0][2], im.tile[0][3]
        stride = args[1] if isinstance(args, tuple) and len(args) > 1 else 0
        return offset + abs(stride) * im.height <= file_size
    return True


PROBABILITY_SCALE = 65535  # predicted probabilities are stored as uint16 p * 65535


def encode_probability(probability: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint16 (``round(p * 65535)``): the one encoding of the
    probability files (predict's PNGs and ``probability.tif``)."""
    return np.round(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16)


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
        with _without_pixel_limit(), Image.open(path) as im:
            height, width = upright_size(im)
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

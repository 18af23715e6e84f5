import struct
import zlib

import numpy as np
import pytest

from changecam.data.io import ImageReadError, read_image, read_label, write_png


def test_rgb_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img)


def test_grayscale_is_converted(tmp_path):
    write_png(tmp_path / "g.png", np.full((4, 4), 9, np.uint8))
    out = read_image(tmp_path / "g.png")
    assert out.shape == (4, 4, 3) and (out == 9).all()


def test_rgba_transparent_refused_and_opaque_accepted(tmp_path):
    import cv2

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "opaque.png"), rgba)
    assert read_image(tmp_path / "opaque.png").shape == (4, 4, 3)
    rgba[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)
    with pytest.raises(ImageReadError, match="alpha.png is RGBA"):
        read_image(tmp_path / "alpha.png")


def write_grey_alpha(path, grey, alpha, layout: str) -> None:
    """An 8-bit grey + alpha TIFF: pixel-interleaved by Pillow, or band by band by GDAL."""
    if layout.startswith("pixel"):
        from PIL import Image

        compression = "tiff_deflate" if layout == "pixel_deflate" else None
        Image.fromarray(np.dstack([grey, alpha]), "LA").save(path, compression=compression)
        return
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    compress = {"compress": "lzw"} if layout == "band_lzw" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver="GTiff", width=grey.shape[1], height=grey.shape[0], count=2,
            dtype="uint8", photometric="MINISBLACK", alpha="YES", interleave="band", **compress,
        ) as dst:  # fmt: skip
            dst.write(np.stack([grey, alpha]))


@pytest.mark.parametrize("layout", ["pixel", "pixel_deflate", "band", "band_lzw"])
def test_grey_and_alpha_tiff_is_judged_by_its_alpha(tmp_path, layout):
    """OpenCV decodes a 2-band TIFF to its grey band alone: transparent pixels were read as
    an opaque grey image, where the same PNG is refused (helper-128); Pillow, tried next,
    cannot open some band-interleaved ones and misreads the alpha of others (helper-130)."""
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    alpha = np.full((6, 5), 255, np.uint8)
    write_grey_alpha(tmp_path / "opaque.tif", grey, alpha, layout)
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.tif"), np.dstack([grey] * 3))
    alpha[:3] = 0
    write_grey_alpha(tmp_path / "clear.tif", grey, alpha, layout)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "clear.png")
    for suffix in ("png", "tif"):
        with pytest.raises(ImageReadError, match=rf"clear.{suffix} is RGBA with transparent"):
            read_image(tmp_path / f"clear.{suffix}")


@pytest.mark.parametrize("high", [255, 1])
def test_binary_labels(tmp_path, high):
    lab = np.zeros((4, 4), np.uint8)
    lab[1, 2] = high
    write_png(tmp_path / "l.png", lab)
    out = read_label(tmp_path / "l.png")
    assert out.dtype == np.uint8 and out.sum() == 1 and out[1, 2] == 1


def test_non_binary_label_names_file(tmp_path):
    lab = np.array([[0, 128], [255, 0]], np.uint8)
    write_png(tmp_path / "bad_label.png", lab)
    with pytest.raises(ImageReadError, match=r"bad_label\.png holds label values \[0, 128, 255\]"):
        read_label(tmp_path / "bad_label.png")


def test_corrupt_image_names_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match=r"broken\.png could not be decoded"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_an_image_over_opencvs_pixel_limit_is_named(tmp_path):
    """OpenCV raises its own cv2.error for a header over 2**30 pixels, which named no file and
    stopped a folder's predict run at that pair (helper-182)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 33000, 33000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    (tmp_path / "huge.png").write_bytes(
        png + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageReadError, match=r"huge\.png could not be decoded by OpenCV .*2\*\*30"):
        read_image(tmp_path / "huge.png")
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "huge.png")
    assert "loadsave.cpp" not in str(err.value) and "(-215:Assertion failed) pixels" in str(
        err.value
    )


def test_headers_of_images_above_pillows_pixel_limit_are_read(tmp_path, monkeypatch):
    """Pillow refuses images above its decompression-bomb limit (about 179 Mpx: a 13 500²
    scene) as corrupt; satellite scenes are that large, and OpenCV decodes them (helper-74).
    Here the limit is lowered to a 64² image's size / 4; it is back in place afterwards."""
    from PIL import Image

    from changecam.data.io import image_size, read_header, write_png

    path = tmp_path / "large.png"
    write_png(path, np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert read_header(path).size == (64, 64) and image_size(path) == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 64 * 64 // 4


def write_tiff(path, bands: np.ndarray, **options) -> None:
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not georeferenced: a plain TIFF
        with rasterio.open(
            path, "w", driver="GTiff", count=len(bands), height=bands.shape[1],
            width=bands.shape[2], dtype=bands.dtype, **options,
        ) as dst:  # fmt: skip
            dst.write(bands)


PLANES = np.random.default_rng(0).integers(0, 256, (4, 6, 5), dtype=np.uint8)


@pytest.mark.parametrize(
    ("bands", "options", "mode"),
    [
        (PLANES[:2], {}, "2-band MinIsBlack TIFF"),  # e.g. SAR VV/VH: OpenCV kept band 1
        (PLANES, {"photometric": "RGB"}, "4-band RGB and a band that is not alpha"),  # + NIR
        (PLANES[:3], {"photometric": "MINISBLACK"}, "3-band MinIsBlack TIFF"),
        (PLANES[:3].astype(np.uint16) * 200, {}, "3-band MinIsBlack TIFF"),  # Sentinel-2 style
        (PLANES[:3].astype(np.float32), {}, "3-band float TIFF"),
        (PLANES[:1], {"photometric": "MINISWHITE"}, "1-band MinIsWhite TIFF"),  # inverted or not
    ],
)
def test_tiffs_are_judged_by_their_own_bands(tmp_path, bands, options, mode):
    """OpenCV decoded a 2-band or a 3-band grey TIFF to its first band, copied to R, G and B,
    and an RGB + near-infrared one as RGBA; Pillow's header named them L or RGB (accepted at
    set-up), or could not open 16-bit and float multi-band ones and called them damaged
    (helper-96). Each is refused for what it holds, by the header check and by the reader."""
    from changecam.data.io import read_header

    write_tiff(tmp_path / "x.tif", bands, **options)
    header = read_header(tmp_path / "x.tif")
    assert header.mode.startswith(mode) and header.bits == bands.dtype.itemsize * 8
    for read in (read_image, read_label):
        with pytest.raises(ImageReadError, match=f"x.tif is {header.bits}-bit {mode}"):
            read(tmp_path / "x.tif")


def test_rgb_grey_and_opaque_rgba_tiffs_read_as_stored(tmp_path):
    from changecam.data.io import read_header

    write_tiff(tmp_path / "rgb.tif", PLANES[:3], photometric="RGB")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), PLANES[:3].transpose(1, 2, 0))
    opaque = np.concatenate([PLANES[:3], np.full_like(PLANES[:1], 255)])
    write_tiff(tmp_path / "rgba.tif", opaque, photometric="RGB", alpha="YES")
    assert read_header(tmp_path / "rgba.tif").mode == "RGBA"
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), PLANES[:3].transpose(1, 2, 0))
    mask = (PLANES[:1] > 127).astype(np.uint8) * 255
    write_tiff(tmp_path / "label.tif", mask)
    assert read_header(tmp_path / "label.tif").mode == "L"
    np.testing.assert_array_equal(read_label(tmp_path / "label.tif"), mask[0] // 255)
    # as they were read before the tags were (helper-98): OpenCV's RGBA has no ExtraSamples
    # tag (alpha, as Pillow reads it); int8 and 4-bit palette 0/1 labels; CMYK
    import cv2
    from PIL import Image

    bgra = cv2.cvtColor(opaque.transpose(1, 2, 0), cv2.COLOR_RGBA2BGRA)
    cv2.imwrite(str(tmp_path / "cv.tif"), bgra)
    assert read_header(tmp_path / "cv.tif").mode == "RGBA"
    np.testing.assert_array_equal(read_image(tmp_path / "cv.tif"), PLANES[:3].transpose(1, 2, 0))
    write_tiff(tmp_path / "int8.tif", (mask // 255).astype(np.int8))
    np.testing.assert_array_equal(read_label(tmp_path / "int8.tif"), mask[0] // 255)
    write_tiff(tmp_path / "nbits.tif", mask // 255, nbits=4, photometric="PALETTE")
    np.testing.assert_array_equal(read_label(tmp_path / "nbits.tif"), mask[0] // 255)
    cmyk = Image.fromarray(PLANES[:3].transpose(1, 2, 0)).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    assert read_header(tmp_path / "cmyk.tif").mode == "CMYK"
    expected = np.array(cmyk.convert("RGB")).astype(int)
    assert np.abs(read_image(tmp_path / "cmyk.tif").astype(int) - expected).max() <= 1

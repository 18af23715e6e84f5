"""Render a predicted scene for the README: the post scene, the change mask and the change
polygons drawn over it (matplotlib), from a ``predict.py`` GeoTIFF run.

    python scripts/render_scene_overlay.py <run>/<scene>               # an existing run
    python scripts/render_scene_overlay.py --demo --ckpt <best.ckpt>   # predict a synthetic
        # 1024² georeferenced pair first (changecam.geo.synthetic), then render it

Writes ``docs/img/scene_overlay.png`` unless ``--out`` says otherwise. The rasters are read
decimated (their overviews) to at most ``--side`` pixels; the polygons are drawn in the
scene's CRS coordinates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Polygon as PolygonPatch  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def decimated(path: Path, side: int, resampling: Resampling) -> tuple[np.ndarray, tuple]:
    """``C x h x w`` of the raster at most ``side`` px a side, and its extent (l, r, b, t)."""
    with rasterio.open(path) as src:
        factor = max(1, -(-max(src.width, src.height) // side))
        shape = (src.count, src.height // factor, src.width // factor)
        data = src.read(out_shape=shape, resampling=resampling)
        b = src.bounds
        return data, (b.left, b.right, b.bottom, b.top)


def displayable(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``C x h x w`` as uint8 for ``imshow``: 8-bit data as it is, other data stretched band by
    band from its 2nd to its 98th percentile of the finite values of valid pixels (``valid``,
    ``h x w``; as ``input.scale=percentile`` does: nodata takes no part), which matplotlib would
    otherwise clip to white."""
    if image.dtype == np.uint8:
        return image
    out = np.zeros(image.shape, np.uint8)
    for band, values in enumerate(image.astype(np.float64)):
        finite = values[np.isfinite(values) & (True if valid is None else valid)]
        if finite.size == 0:
            continue
        low, high = np.percentile(finite, (2, 98))
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        out[band] = np.round(np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)
    return out


def render(scene: Path, out: Path, side: int = 1024) -> Path:
    summary = json.loads((scene / "scene.json").read_text())
    from changecam.geo.bands import decimated_sample
    from changecam.geo.grid import open_pair

    # the post scene on the outputs' grid (reprojected like predict.py read it); the inputs
    # may have no overviews: decimated_sample reads them in strips
    with open_pair(summary["pre"], summary["post"]) as pair:
        post, valid = decimated_sample(pair.post, summary["bands"][:3])
    step = max(1, -(-max(post.shape[1:]) // side))  # at most `side` px a side, as the rasters
    post = displayable(post[:, ::step, ::step], valid[::step, ::step])
    change, extent = decimated(scene / "change.tif", side, Resampling.nearest)
    polygons_file = summary["files"].get("polygons")  # none with predict.polygons=false
    features = (
        json.loads((scene / polygons_file).read_text())["features"]
        if polygons_file is not None
        else None
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4), dpi=110)
    rgb = np.moveaxis(post[:3], 0, -1)
    for ax in axes:
        ax.imshow(rgb, extent=extent)
        ax.set_xlabel(f"easting (m, {summary['crs']})")
        ax.ticklabel_format(useOffset=False, style="plain")
    axes[0].set_ylabel("northing (m)")
    overlay = np.zeros((*change.shape[1:], 4))
    overlay[change[0] == 1] = (0.0, 1.0, 1.0, 0.55)
    overlay[change[0] == 255] = (0.5, 0.5, 0.5, 0.6)
    axes[0].imshow(overlay, extent=extent)
    axes[0].set_title("change.tif over the post scene (cyan: change, grey: nodata)")
    patches = []
    for feature in features or ():
        geometry = feature["geometry"]
        polygons = (
            [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        )
        patches += [PolygonPatch(np.asarray(rings[0]), closed=True) for rings in polygons]
    axes[1].add_collection(
        PatchCollection(patches, facecolor="none", edgecolor="yellow", linewidth=0.8)
    )
    axes[1].set_xlim(extent[0], extent[1])
    axes[1].set_ylim(extent[2], extent[3])
    axes[1].set_title(
        f"{polygons_file}: {len(features)} polygons"
        if features is not None
        else "no polygons (predict.polygons=false)"
    )
    fig.suptitle(
        f"{summary['name']}: {summary['size'][1]}x{summary['size'][0]} px, "
        f"{summary['changed_fraction']:.1%} changed"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def demo(ckpt: Path, size: int, workdir: Path, overrides: list[str]) -> Path:
    """Predict a synthetic georeferenced pair with ``predict.py``; returns the scene folder."""
    from changecam.geo.synthetic import write_synthetic_scene

    pre, post = write_synthetic_scene(workdir / "scene", size, tile=512)
    run = workdir / "run"
    cmd = [sys.executable, str(REPO / "predict.py"), f"ckpt_path={ckpt}", f"input.pre={pre}"]
    cmd += [f"input.post={post}", f"hydra.run.dir={run}", "predict.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=REPO)
    return run / "pre"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", nargs="?", type=Path, help="a scene folder of a predict.py run")
    parser.add_argument("--demo", action="store_true", help="predict a synthetic pair first")
    parser.add_argument("--ckpt", type=Path, help="checkpoint for --demo")
    parser.add_argument("--size", type=int, default=1024, help="side of the --demo pair")
    parser.add_argument("--side", type=int, default=1024, help="at most this many px drawn a side")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "scene_overlay.png")
    parser.add_argument("overrides", nargs="*", default=[], help="predict.py overrides (--demo)")
    args = parser.parse_args(argv)
    if args.side < 1 or args.size < 1:
        parser.error(f"--side ({args.side}) and --size ({args.size}) must be at least 1")
    if args.demo and args.scene is not None:  # argparse gave the first override to `scene`
        args.overrides, args.scene = [str(args.scene), *args.overrides], None
    if args.demo:
        if args.ckpt is None:
            parser.error("--demo needs --ckpt <best.ckpt>")
        with tempfile.TemporaryDirectory(prefix="changecam-overlay-") as tmp:
            print(
                render(demo(args.ckpt, args.size, Path(tmp), args.overrides), args.out, args.side)
            )
        return
    if args.scene is None:
        parser.error("give a scene folder or --demo")
    if args.overrides:
        parser.error(f"predict.py overrides ({' '.join(args.overrides)}) are only read with --demo")
    print(render(args.scene, args.out, args.side))


if __name__ == "__main__":
    main()

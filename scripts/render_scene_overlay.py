"""Render the README's GeoTIFF figure: a synthetic georeferenced pair predicted by predict.py,
its change mask and polygons drawn over the post scene, and the explanation's post share.

    python scripts/render_scene_overlay.py --ckpt <best.ckpt> [--size 1024] [--style simple] \\
        [--out docs/img/scene_overlay.png]

It writes the pair (:mod:`changecam.geo.synthetic_scene`), runs ``predict.py`` on it
(``predict.explain_layer=enc3``) in a temporary run directory, and draws with matplotlib.
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

from changecam.geo.synthetic_scene import write_scene_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--layer", default="enc3")
    parser.add_argument(
        "--style",
        choices=("simple", "levir"),
        default="simple",
        help="the generator style of the scene (the quickstart trains on simple)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "scene_overlay.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="changecam-overlay-") as tmp_dir:
        tmp = Path(tmp_dir)
        pre, post, label = write_scene_pair(tmp / "scene", args.size, args.style)
        run = tmp / "run"
        command = [
            sys.executable,
            str(REPO / "predict.py"),
            f"ckpt_path={args.ckpt}",
            f"input.pre={pre}",
            f"input.post={post}",
            f"predict.explain_layer={args.layer}",
            "device=cpu",
            f"hydra.run.dir={run}",
        ]
        subprocess.run(command, check=True, cwd=REPO)
        with rasterio.open(post) as ds:
            image = ds.read().transpose(1, 2, 0)
            left, bottom, right, top = ds.bounds
        with rasterio.open(pre) as ds:
            before = ds.read().transpose(1, 2, 0)
        with rasterio.open(run / "explanation.tif") as ds:
            share = ds.read(3)
        features = json.loads((run / "change.geojson").read_text())["features"]
        extent = (left, right, bottom, top)
        fig, axes = plt.subplots(1, 3, figsize=(18, 6.4))
        axes[0].imshow(before, extent=extent)
        axes[0].set_title("pre (EPSG:32650, 0.5 m)")
        axes[1].imshow(image, extent=extent)
        for f in features:
            ring = np.array(f["geometry"]["coordinates"][0])
            ps = f["properties"].get("post_share")
            colour = plt.cm.coolwarm(ps if ps is not None else 0.5)
            axes[1].plot(ring[:, 0], ring[:, 1], color=colour, linewidth=1.6)
        axes[1].set_title(f"post + change.geojson ({len(features)} polygons, colour = post share)")
        shown = axes[2].imshow(share, extent=extent, cmap="coolwarm", vmin=0, vmax=1)
        axes[2].set_title(f"explanation.tif: post share at {args.layer}")
        fig.colorbar(shown, ax=axes[2], fraction=0.046)
        for ax in axes:
            ax.set_xlabel("easting (m)")
            ax.ticklabel_format(useOffset=False, style="plain")
        axes[0].set_ylabel("northing (m)")
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()

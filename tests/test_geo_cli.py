"""predict.py on GeoTIFF input: the Hydra path to changecam.geo, single pair and folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from changecam.cli.config_checks import ConfigError
from changecam.cli.predict import predict
from helpers import compose_train
from test_checkpoint import make_lightning_checkpoint
from test_geo_scene import scene_images, write_tif

FAST = ["device=cpu", "sliding_window.window=32", "predict.block=64"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic):
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("geo_ckpt") / "best.ckpt", tiny_synthetic, steps=2
    )


def test_predict_py_writes_georeferenced_outputs(tmp_path, ckpt):
    pre, post = scene_images()
    a = write_tif(tmp_path / "pre.tif", pre)
    b = write_tif(tmp_path / "post.tif", post)
    report = predict(
        compose_train(
            tmp_path,
            [
                *FAST,
                f"ckpt_path={ckpt}",
                f"input.pre={a}",
                f"input.post={b}",
                "predict.explain_layer=enc1",
                "explain.method=contrastive",
            ],
            "predict",
        )
    )
    run = tmp_path / "run"
    with rasterio.open(run / "explanation.tif") as ds:
        assert ds.count == 3 and ds.descriptions[0] == "pre contrastive enc1"
    with rasterio.open(run / "change.tif") as ds, rasterio.open(a) as src:
        assert ds.crs == src.crs and ds.transform == src.transform
        assert set(np.unique(ds.read(1))) <= {0, 1}
    assert (run / "probability.tif").is_file() and (run / "change.geojson").is_file()
    assert json.loads((run / "scenes.json").read_text())["scenes"]["pre"]["width"] == 96
    assert report["scenes"]["pre"]["blocks"] == 4
    # a folder of scene pairs: one output folder each
    for name in ("x", "y"):
        write_tif(tmp_path / "dir" / "A" / f"{name}.tif", pre, mkdir=True)
        write_tif(tmp_path / "dir" / "B" / f"{name}.tif", post, mkdir=True)
    predict(
        compose_train(
            tmp_path / "f", [*FAST, f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'dir'}"], "predict"
        )
    )
    for name in ("x", "y"):
        assert (tmp_path / "f" / "run" / "scenes" / name / "change.tif").is_file()


def test_bad_scene_settings_fail_before_any_output(tmp_path, ckpt):
    pre, post = scene_images()
    a = write_tif(tmp_path / "pre.tif", pre)
    b = write_tif(tmp_path / "post.tif", post)
    cfg = compose_train(
        tmp_path,
        [*FAST, f"ckpt_path={ckpt}", f"input.pre={a}", f"input.post={b}", "input.align=nearest"],
        "predict",
    )
    with pytest.raises(ConfigError, match="input.align='nearest'"):
        predict(cfg)
    cfg = compose_train(
        tmp_path,
        [
            *FAST,
            f"ckpt_path={ckpt}",
            f"input.pre={a}",
            f"input.post={b}",
            "predict.explain_layer=enc9",
        ],
        "predict",
    )
    with pytest.raises(ConfigError, match="explain_layer=enc9: not a per-date layer"):
        predict(cfg)
    assert not (tmp_path / "run" / "change.tif").exists()

"""predict.py on GeoTIFF scene pairs: the configuration side of :mod:`changecam.geo`.

``python predict.py ckpt_path=<ckpt> input.pre=a.tif input.post=b.tif`` (or ``input.dir=`` with
``A/`` and ``B/`` of ``.tif`` files) writes, per scene, ``<run>/<name>/change.tif``,
``probability.tif``, ``explanation.tif`` (unless ``explain.enabled=false``),
``change.geojson`` and ``scene.json``; ``predictions.json`` in the run directory, written
last, lists every scene. A refused scene, or one a GDAL error stops, gets no finished-looking file
from this run (an earlier run's outputs stay when only a setting was refused); the others are
still predicted, and the command ends with an error naming the refused or failed ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from changecam.atomic import DiskFullError, probed_disk_full, write_json
from changecam.cli.common import failure_message, log
from changecam.data.layout import Triplet
from changecam.geo import SceneError, SceneSettings, predict_scene
from changecam.geo.grid import GDAL_ERRORS
from changecam.geo.scene import LOG_FILE as SCENE_LOG_FILE
from changecam.geo.scene import SCENE_METHODS, remove_scene
from changecam.models.sliding_window import SlidingWindow

REPORT_FILE = "predictions.json"
# the PNG path's log and folders (cli.predict), which a run into the same folder may find
PAIR_LOG_FILE = "predictions.jsonl"
PAIR_FOLDERS = {"mask": "masks", "probability": "probabilities", "panel": "panels"}
# the run directory's own entries that exist before a scene is written (Hydra's config
# folder) or after (the report, written last), and the PNG path's, which a PNG run in the
# same folder writes or removes; the log is an existing file, refused as such
RUN_ENTRIES = (".hydra", REPORT_FILE, PAIR_LOG_FILE, *PAIR_FOLDERS.values())


class SceneFailure(RuntimeError):
    """Some scenes were refused or failed (the others were predicted)."""


_ABSENT = object()
# the keys of the GeoTIFF path alone (SceneSettings field: config key); PNG pairs ignore them
SCENE_KEYS = {
    "bands": "input.bands",
    "scale": "input.scale",
    "scale_min": "input.scale_min",
    "scale_max": "input.scale_max",
    "align": "input.align",
    "block_size": "predict.block_size",
    "batch_size": "predict.batch_size",
    "min_area_m2": "predict.min_area_m2",
    "polygons": "predict.polygons",
    "overviews": "predict.overviews",
    "explain_layer": "predict.explain_layer",
    "progress": "predict.progress",
    "gdal_threads": "predict.gdal_threads",
}


def scene_settings(cfg: DictConfig, threshold: float, explain: bool) -> SceneSettings:
    """The ``input.*`` and ``predict.*`` keys of the GeoTIFF path (:data:`SCENE_KEYS`) as
    :class:`SceneSettings`; a key the config lacks takes the field's default."""
    values = {}
    for field, key in {**SCENE_KEYS, "explain_method": "explain.method"}.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            values[field] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
    return SceneSettings(threshold=threshold, explain=explain, **values)


def check_scene_settings(
    cfg: DictConfig, threshold: float | None, explain: bool, scenes: bool
) -> None:
    """Judge the GeoTIFF path's keys before the network is loaded: an invalid value fails at
    once, whatever the inputs; for PNG pairs, which ignore them, the keys set otherwise than
    their defaults are warned about.

    Raises:
        SceneError: an invalid ``input.*`` or ``predict.*`` value, or (scenes) an
            ``explain.*`` choice a scene would ignore (:func:`check_scene_explain`).
    """
    threshold = 0.5 if threshold is None else threshold
    if scenes:
        check_scene_explain(cfg, explain)
        scene_settings(cfg, threshold, explain)
        return
    settings = scene_settings(cfg, threshold, False)  # PNG pairs: explain.* is theirs
    default = SceneSettings(threshold=threshold, explain=False)
    ignored = [
        key
        for field, key in SCENE_KEYS.items()
        if getattr(settings, field) != getattr(default, field)
    ]
    if ignored:
        log.warning(
            "%s apply to predict.py's GeoTIFF scenes only (.tif/.tiff/.vrt); these pairs "
            "ignore them",
            ", ".join(ignored),
        )


def check_scene_explain(cfg: DictConfig, explain: bool) -> None:
    """Refuse the ``explain.*`` choices a scene would otherwise ignore.

    ``explanation.tif`` holds the maps of ``explain.method`` (HiResCAM or date-contrastive
    HiResCAM) for the predicted change at one layer (``predict.explain_layer``). The other keys
    (panel, curves, ``max_pixels``) belong to the PNG path's panels.

    Raises:
        SceneError: ``explain.method`` other than ``hirescam`` or ``contrastive``,
            ``explain.methods`` other than ``[explain.method]``, ``explain.taps`` set, or
            ``explain.target`` other than ``predicted``.
    """
    if not explain:
        return
    method = OmegaConf.select(cfg, "explain.method", default="hirescam")
    methods = OmegaConf.select(cfg, "explain.methods", default=None)
    methods = (
        OmegaConf.to_container(methods, resolve=True) if OmegaConf.is_config(methods) else methods
    )
    taps = OmegaConf.select(cfg, "explain.taps", default=None)
    target = OmegaConf.select(cfg, "explain.target", default="predicted")
    ignored = []
    if method not in SCENE_METHODS:
        ignored.append(
            f"explain.method={method} (explanation.tif holds one of {list(SCENE_METHODS)})"
        )
    elif methods is not None and methods not in ([method], method):
        ignored.append(
            f"explain.methods={methods} (explanation.tif holds explain.method={method} only)"
        )
    if taps is not None:
        ignored.append(
            f"explain.taps={OmegaConf.to_container(taps) if OmegaConf.is_config(taps) else taps} "
            "(a scene is explained at one layer: predict.explain_layer=<layer>)"
        )
    if target != "predicted":
        ignored.append(f"explain.target={target} (a scene explains its predicted change)")
    if ignored:
        raise SceneError(
            f"GeoTIFF scenes do not use {'; '.join(ignored)}: drop "
            f"{'it' if len(ignored) == 1 else 'them'}, or set explain.enabled=false"
        )


def scene_folder(output_dir: Path, pair: Triplet) -> Path:
    """The scene's output folder, ``<run>/<name>``.

    Raises:
        SceneError: the name is one of the run directory's own entries (``.hydra``,
            ``predictions.json``, the log), or ``.`` or ``..`` (``...tif``): its outputs would
            be written into them, or beside the run directory.
    """
    if pair.name in (".", ".."):
        raise SceneError(
            f"the scene {pair.pre} is named {pair.name!r}, which would write its outputs "
            f"{'into the run directory itself' if pair.name == '.' else 'beside the run directory'}"
            "; rename the scene's files"
        )
    folder = output_dir / pair.name
    if pair.name in RUN_ENTRIES or (folder.exists() and not folder.is_dir()):
        raise SceneError(
            f"the scene {pair.pre} would be written to {folder}, which is the run directory's "
            f"own {'folder' if folder.is_dir() else 'file'}; rename the scene's files"
        )
    return folder


def remove_scenes_except(output_dir: Path, names: set[str]) -> None:
    """Remove the outputs of an earlier run's scenes in ``output_dir`` other than ``names``
    (this run's): they would look like this run's own, with a warning naming them."""
    entries = output_dir.iterdir() if output_dir.is_dir() else ()  # none: every scene refused
    gone = sorted(
        entry.name
        for entry in entries
        if entry.is_dir() and entry.name not in names and (entry / SCENE_LOG_FILE).is_file()
    )
    if gone:
        log.warning(
            "removing the outputs of %d scene(s) that are not among this run's inputs: %s",
            len(gone),
            ", ".join(gone),
        )
        for name in gone:
            remove_scene(output_dir / name)


def predict_scenes(
    cfg: DictConfig,
    pairs: list[Triplet],
    net: nn.Module,
    spec: SlidingWindow,
    threshold: float,
    explain: bool,
    device: torch.device,
    output_dir: Path,
    run_record: dict[str, Any],
) -> dict[str, Any]:
    """Predict every scene pair; write ``predictions.json`` last."""
    check_scene_explain(cfg, explain)
    settings = scene_settings(cfg, threshold, explain)
    resume = bool(OmegaConf.select(cfg, "predict.resume", default=False))
    (output_dir / REPORT_FILE).unlink(missing_ok=True)
    scenes, failed = [], []
    refusals = 0
    for pair in pairs:
        try:
            summary = predict_scene(
                net,
                pair.pre,
                pair.post,
                scene_folder(output_dir, pair),
                spec,
                settings,
                device,
                resume=resume,
                run_record=run_record,
                name=pair.name,
            )
        except DiskFullError:
            raise
        except (SceneError, *GDAL_ERRORS) as err:
            if not isinstance(err, SceneError) or isinstance(err.__cause__, GDAL_ERRORS):
                # a GDAL write error names no cause: a full disk is found by writing there
                folder = scene_folder(output_dir, pair)
                full = probed_disk_full(folder if folder.is_dir() else output_dir, folder)
                if full is not None:
                    raise full from err
            # a GDAL error of one scene (not a refusal, not a full disk) fails that scene alone:
            # its outputs keep their temporary names, and predict.resume=true continues it
            unexpected = not isinstance(err, SceneError)
            log.error(
                "scene %s %s: %s",
                pair.name,
                "failed" if unexpected else "refused",
                err,
                exc_info=unexpected,
            )
            refusals += not unexpected
            failed.append(
                {"name": pair.name, "pre": str(pair.pre), "post": str(pair.post), "error": str(err)}
            )
            continue
        scenes.append(summary)
    remove_scenes_except(output_dir, {pair.name for pair in pairs})
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "threshold": threshold,
        "sliding_window": OmegaConf.to_container(cfg.sliding_window, resolve=True),
        "probability_encoding": "probability.tif: uint16, probability = value / 65535",
        "explained": explain,
        "scenes": scenes,
        "failed": failed,
    }
    write_json(output_dir / REPORT_FILE, report)  # also when every scene failed: it lists them
    print(f"predicted {len(scenes)} scene(s) into {output_dir}")
    if failed:
        what = "scene(s) refused" if refusals == len(failed) else "scene(s) refused or failed"
        raise SceneFailure(failure_message(failed, len(pairs), what, output_dir / REPORT_FILE))
    return report

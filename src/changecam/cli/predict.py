"""Predict change on image pairs of any size (Hydra, ``conf/predict.yaml``).

``python predict.py ckpt_path=<best.ckpt> input.pre=<file> input.post=<file>`` or
``input.dir=<folder with A/ and B/>`` writes, in the run directory, per pair:

* ``masks/<name>.png``: the binary change mask, 0/255, exactly the input's size;
* ``probabilities/<name>.png``: the change probability as a 16-bit grayscale PNG,
  ``p = value / 65535`` (read it back with :func:`read_probability`);
* ``panels/<name>.png``: the 2x4 explanation panel;

and one ``predictions.json`` with each pair's changed-pixel fraction, post share per layer and
faithfulness gap, written last: it is the sign that the run finished. Masks and probabilities come from sliding-window inference
(:mod:`changecam.models.sliding_window`); the panel, the shares and the gap from
:func:`changecam.explain.explain_pair`, the code ``explain.py`` runs, on the whole (padded)
image. A pair that fails (e.g. its two dates differ in size) leaves no files; the
others are still predicted, and the command exits with an error naming the failed pairs.
A full disk stops the command at once ("no space left on device while writing <path>").

GeoTIFF pairs (every file ``.tif``/``.tiff``, or a GDAL ``.vrt``) go to
:mod:`changecam.cli.scenes` and :mod:`changecam.geo` instead: per scene ``<name>/change.tif``,
``probability.tif``, ``explanation.tif``, ``change.geojson`` and ``scene.json``, window by
window in bounded memory.

``predictions.jsonl`` beside it is the run's log: a header line with the settings, then one
line per pair, appended (and fsynced) once all of that pair's files are written, so a killed
run says exactly what it finished. ``predict.resume=true`` in the same run directory
(``hydra.run.dir=<it>``) keeps the pairs the log lists as done whose files are all there
and whose input files have the size, modification and change times the log recorded,
predicts the others, removes the files of logged pairs no longer among the inputs and writes
the full ``predictions.json``; it refuses a log started with
another checkpoint, threshold, sliding window or explanation settings. Without it, a run
directory holding an earlier run's log starts over: the files that log lists, the log and
``predictions.json`` are removed first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from changecam.atomic import (
    DiskFullError,
    append_json_line,
    strict_json,
    write_files,
    write_json,
    write_text,
)
from changecam.cli.common import (
    NATIVE_SCALE_REMEDY,
    checked_threshold,
    explain_settings,
    explain_target_problem,
    failed_pair,
    failure_message,
    load_model,
    log,
    mean_post_shares,
    prepare_run,
    read_roi,
    resolve_device,
    run_threshold,
    sliding_window_spec,
    task_wrapper,
    warn_training_scale,
)
from changecam.cli.config_checks import ConfigError
from changecam.cli.scenes import (
    PAIR_FOLDERS,
    REPORT_FILE,
    check_scene_settings,
    predict_scenes,
    remove_scenes_except,
)
from changecam.cli.scenes import PAIR_LOG_FILE as LOG_FILE  # the run's log of PNG pairs
from changecam.data.io import (
    PROBABILITY_SCALE,
    ImageReadError,
    encode_png,
    encode_probability,
    pair_size,
    read_image,
    read_label,
)
from changecam.data.layout import INPUT_SUFFIXES, Triplet, input_pairs
from changecam.data.transforms import image_to_tensor
from changecam.environment import frozen_gc
from changecam.explain import ExplainSettings, PairExplanation, explain_pair, with_threshold
from changecam.geo import is_scene_file
from changecam.metrics import mean_of
from changecam.models.inference import check_finite_logits, inference_network
from changecam.models.protocol import network_config
from changecam.models.sliding_window import SlidingWindow, check_window, sliding_window_logits
from changecam.run_log import as_logged, file_record, read_json_lines, settings_changes

PROBABILITY_ENCODING = "16-bit grayscale PNG, probability = value / 65535"


class PredictionError(RuntimeError):
    """Some pairs could not be predicted (the others were)."""


@dataclass(frozen=True)
class PairPrediction:
    """The outputs of one pair, in memory until :meth:`save` writes them all."""

    name: str
    probability: np.ndarray  # float32 H x W in [0, 1]
    threshold: float
    explained: PairExplanation | None
    skipped: str | None = None  # why the pair was not explained, if it was not

    @property
    def mask(self) -> np.ndarray:
        """uint8 H x W, 255 where the probability exceeds the threshold."""
        return np.where(self.probability > self.threshold, 255, 0).astype(np.uint8)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of the pair."""
        changed = int((self.probability > self.threshold).sum())
        out: dict[str, Any] = {
            "name": self.name,
            "size": list(self.probability.shape),
            "changed_pixels": changed,
            "changed_fraction": changed / self.probability.size,
            "mean_probability": float(self.probability.mean()),
        }
        if self.explained is not None:
            explained = self.explained.summary()
            for key in ("faithfulness_gap", "target_score", "empty_target"):
                out[key] = explained.get(key)
            # post_share (HiResCAM), post_share_<method> for the other methods that ran
            out.update({k: v for k, v in explained.items() if k.startswith("post_share")})
        elif self.skipped:
            out["explanation_skipped"] = self.skipped
        return out

    def save(self, run_dir: Path) -> dict[str, str]:
        """Write the mask, probability and panel files together
        (:func:`changecam.atomic.write_files`); on any error none of them is left."""
        kinds = ("mask", "probability", *(("panel",) if self.explained is not None else ()))
        files = {kind: run_dir / PAIR_FOLDERS[kind] / f"{self.name}.png" for kind in kinds}
        arrays = {"mask": self.mask, "probability": encode_probability(self.probability)}
        if self.explained is not None:
            arrays["panel"] = self.explained.panel
        contents = {files[k]: encode_png(array, files[k]) for k, array in arrays.items()}
        try:
            write_files(contents)
        except BaseException:
            for path in contents:  # a rename that failed midway: the renamed ones go too
                path.unlink(missing_ok=True)
            raise
        return {k: str(v.relative_to(run_dir)) for k, v in files.items()}


def read_probability(path: str | Path) -> np.ndarray:
    """Read a ``probabilities/<name>.png`` back as float32 probabilities in [0, 1]."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 2:
        raise ValueError(f"{path} is not a 16-bit grayscale probability PNG written by predict.py")
    return data.astype(np.float32) / PROBABILITY_SCALE


def predict_probability(
    net: nn.Module,
    pre: np.ndarray,
    post: np.ndarray,
    spec: SlidingWindow,
    device: torch.device,
    name: str = "the pair",
) -> np.ndarray:
    """Sliding-window change probability (float32 H x W) of one uint8 pair.

    Raises:
        NonFiniteLogits: a logit is NaN or infinite.
    """
    x_pre = image_to_tensor(pre)[None].to(device)
    x_post = image_to_tensor(post)[None].to(device)
    logits = sliding_window_logits(net, x_pre, x_post, spec)
    check_finite_logits(logits, f"pair {name!r} refused")
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


def predict_pair(
    net: nn.Module,
    pair: Triplet,
    spec: SlidingWindow,
    threshold: float,
    settings: ExplainSettings | None,
    device: torch.device,
    roi: np.ndarray | None = None,
) -> PairPrediction:
    """Everything predict.py computes for one pair, in memory (nothing written yet).

    Args:
        net: the network (eval mode, on ``device``).
        pair: the pair's files.
        spec: sliding-window settings of the mask and probability.
        threshold: probability above which a pixel is change.
        settings: explanation settings (with the same threshold); ``None`` skips the
            explanation. Pairs above ``settings.max_pixels`` are not explained.
        device: where to compute.
        roi: the region of interest of ``target=roi``.

    Raises:
        ValueError: the two dates differ in size (or an image cannot be read), or the
            network's logits are not finite.
    """
    height, width = pair_size(replace(pair, label=None))  # the label is optional here
    pre, post = read_image(pair.pre), read_image(pair.post)
    if pre.shape != post.shape:  # headers can lie; the decoded arrays decide
        raise ValueError(
            f"pair {pair.name!r} refused: decoded sizes {pre.shape} and {post.shape} differ"
        )
    probability = predict_probability(net, pre, post, spec, device, pair.name)
    if settings is None:
        return PairPrediction(pair.name, probability, threshold, None, "explain.enabled=false")
    if settings.max_pixels is not None and height * width > settings.max_pixels:
        reason = (
            f"{height}x{width} exceeds explain.max_pixels={settings.max_pixels}; explain a crop "
            "with explain.py or raise the limit"
        )
        return PairPrediction(pair.name, probability, threshold, None, reason)
    # drawn in the panel; only explain.target=ground_truth needs it
    label = optional_label(pair, (height, width), required=settings.target == "ground_truth")
    if settings.target == "predicted":
        # the change this run writes (the sliding window's), explained on the whole image, as
        # eval.py's per-image post share: the whole image's own prediction differs from it
        # where the image is larger than a window
        roi, settings = probability > threshold, replace(settings, target="roi")
    explained = explain_pair(
        net,
        pre,
        post,
        label=label,
        roi=roi,
        name=pair.name,
        settings=settings,
        device=device,
        probability=probability,  # the panel's prediction: the mask written and explained
    )
    return PairPrediction(pair.name, probability, threshold, explained)


def check_explained_pairs(
    pairs: list[Triplet], settings: ExplainSettings, roi_size: tuple[int, int] | None
) -> None:
    """Refuse, before any pair, what the explanation target would fail on for every pair it
    explains (those within ``explain.max_pixels``): a pair without a label under
    ``explain.target=ground_truth``, an ``explain.roi`` of another size. A pair whose files
    cannot be read fails alone later."""
    for pair in pairs:
        try:
            height, width = pair_size(pair)
        except (ValueError, OSError):
            continue
        if settings.max_pixels is not None and height * width > settings.max_pixels:
            continue  # not explained: mask and probability only
        problem = explain_target_problem(pair, (height, width), settings, roi_size)
        if problem:
            raise ValueError(problem)


def optional_label(
    pair: Triplet, size: tuple[int, int], required: bool = False
) -> np.ndarray | None:
    """The pair's label for its panel, or ``None``: unless ``required``, a label that cannot be
    read or does not fit the images is dropped with a warning and the pair still runs.

    Raises:
        ValueError / OSError: ``required`` and the label is unusable.
    """
    if pair.label is None:
        return None
    try:
        label = read_label(pair.label)
        if label.shape != size:
            raise ImageReadError(
                f"{pair.label} is {label.shape[0]}x{label.shape[1]} but the images are "
                f"{size[0]}x{size[1]}"
            )
    except (ImageReadError, OSError) as err:
        if required:
            raise ValueError(f"pair {pair.name!r} refused: label {err}") from err
        log.warning("pair %s: label dropped (the panel shows none): %s", pair.name, err)
        return None
    return label


def read_file_records(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """:func:`file_record` of the checkpoint and of the ``explain.target=roi`` mask (when
    there is one), taken before either is read: a file swapped in while the run reads it is
    then recorded as the file it was, and a resume refuses it."""
    block = cfg.get("explain")
    explained_roi = block and block.get("enabled", True) and block.get("target") == "roi"
    roi = block.get("roi") if explained_roi else None
    records = {}
    if Path(cfg.ckpt_path).is_file():  # else loading it names it
        records["checkpoint"] = file_record(Path(cfg.ckpt_path))
    if roi and Path(roi).is_file():
        records["roi_file"] = file_record(Path(roi))
    return records


def run_settings(
    cfg: DictConfig, threshold: float, net: nn.Module, records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What every pair of one run shares and a resumed run must repeat: also the network the
    weights were loaded into (a plain state_dict's ``model=`` options, e.g. ``fusion``, can
    change the network and keep every weight's shape). ``records``: :func:`read_file_records`,
    taken before the files were read."""
    ckpt = Path(cfg.ckpt_path)
    # (a checkpoint that appeared after the records were taken: recorded now)
    checkpoint = records.get("checkpoint") or file_record(ckpt)
    block = cfg.get("explain")
    model = cfg.get("model")
    network = network_config(net)
    if network is None and model is not None:
        network = OmegaConf.to_container(model, resolve=True)
    return strict_json(
        {
            # the explain.target=roi mask by its content too: another mask under the same name
            # explains the pairs otherwise
            **({"roi_file": records["roi_file"]} if "roi_file" in records else {}),
            "checkpoint": str(ckpt.resolve()),
            "checkpoint_mtime_ns": checkpoint["mtime_ns"],
            # another checkpoint given the old file's modification time (cp -p, rsync -a)
            "checkpoint_size": checkpoint["size"],
            "checkpoint_sample_sha256": checkpoint["sample_sha256"],
            "network": network,
            "threshold": threshold,
            "sliding_window": OmegaConf.to_container(cfg.sliding_window, resolve=True),
            "explain": OmegaConf.to_container(block, resolve=True) if block else None,
            # explain.target=predicted explains the mask written (the sliding window's) since
            # 2026-12-07, the whole image's own prediction before: a resume of such a log
            # predicts its explained pairs again where the two can differ (explained_otherwise)
            **(
                {"explained_prediction": "written_mask"}
                if block and block.get("enabled", True) and block.get("target") == "predicted"
                else {}
            ),
        }
    )


def pair_inputs(pair: Triplet) -> dict[str, str | None]:
    """The pair's files, absolute (a resume from another working folder finds them the same)."""
    return {
        "pre": str(Path(pair.pre).absolute()),
        "post": str(Path(pair.post).absolute()),
        "label": str(Path(pair.label).absolute()) if pair.label is not None else None,
    }


def same_inputs(logged: Any, pair: Triplet) -> bool:
    """Whether a logged pair's ``inputs`` are ``pair``'s files: the same files by another path
    (relative or absolute, through a symlinked folder) are (their stamps tell a change)."""
    if not isinstance(logged, dict):
        return False
    now = pair_inputs(pair)
    if set(logged) != set(now):
        return False

    def where(value: Any) -> Path | None:
        return Path(value).resolve() if isinstance(value, str) else None

    return all(where(logged[k]) == where(now[k]) for k in now)


def input_stamps(pair: Triplet) -> dict[str, list[int] | None]:
    """Size and modification and change times of each input file: a resume predicts a pair
    again when one of its files was replaced since it was logged (also by one of the same size
    given the old modification time, which ``st_ctime`` still tells)."""

    def stamp(path: Path | None) -> list[int] | None:
        try:
            stat = Path(path).stat() if path is not None else None
        except OSError:  # the pair then fails alone, when it is read
            return None
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns] if stat is not None else None

    return {"pre": stamp(pair.pre), "post": stamp(pair.post), "label": stamp(pair.label)}


@dataclass(frozen=True)
class PredictionLog:
    """``predictions.jsonl``: a ``started`` line with the run's settings, then a ``done`` line
    (the pair's ``predictions.json`` row) or a ``failed`` line per pair."""

    run_dir: Path

    @property
    def path(self) -> Path:
        return self.run_dir / LOG_FILE

    def records(self) -> list[dict[str, Any]]:
        """The log's lines; a partial line (a kill during the append) is skipped."""
        return read_json_lines(self.path)

    def complete(self, row: dict[str, Any]) -> bool:
        """Whether every file of a ``done`` row is there (and not empty)."""
        files = [self.run_dir / rel for rel in row.get("files", {}).values()]
        return bool(files) and all(p.is_file() and p.stat().st_size > 0 for p in files)

    def start(self, settings: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
        """Begin (or, with ``resume``, continue) the log; returns the ``done`` lines of complete
        pairs by name (``pair``: the row, ``stamps``: :func:`input_stamps` when logged).

        ``predictions.json`` goes next (after the settings check), so that from here on a kill
        leaves no finished-looking run. Without ``resume`` an earlier log, and the files it
        lists, are removed.

        Raises:
            ConfigError: ``resume`` with a log started with other settings (nothing is changed).
        """
        records = self.records()
        if resume and records:
            self.check_settings(records[0], settings)
        (self.run_dir / REPORT_FILE).unlink(missing_ok=True)
        header = {"status": "started", "settings": settings}
        if not resume or not records:
            if records:
                log.warning(
                    "%s holds an earlier predict run: starting over (predict.resume=true would "
                    "keep its finished pairs)",
                    self.run_dir,
                )
                self.remove_files(records)
            elif resume:
                log.warning(
                    "predict.resume=true but %s has no log: predicting every pair", self.path
                )
            self.remove_unlisted(keep=set())
            write_text(self.path, json.dumps(header, sort_keys=True) + "\n")
            return {}
        logged = [r for r in records if r.get("status") == "done"]
        last = {r["pair"]["name"]: r for r in logged}  # a pair predicted again: its last line
        done = {name: r for name, r in last.items() if self.complete(r["pair"])}
        for name in explained_otherwise(records[0].get("settings") or {}, settings, done):
            log.info(
                "pair %s: logged when predict.py explained the whole image's own prediction, "
                "which differs from the mask written for a pair that is not one window: "
                "predicting it again",
                name,
            )
            del done[name]
        # a pair with some of its files gone is predicted again: none of the others may stay
        kept = {rel for r in done.values() for rel in r["pair"].get("files", {}).values()}
        self.remove_files([r for r in logged if done.get(r["pair"]["name"]) is not r], keep=kept)
        self.remove_unlisted(keep=kept)
        lines = [header, *done.values()]
        write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
        log.info("resuming %s: %d pair(s) already done", self.run_dir, len(done))
        return done

    def clear(self) -> None:
        """Remove an earlier PNG run's pair outputs and log (for a run of GeoTIFF scenes in
        the same folder, beside whose report they would look like its own)."""
        if not self.path.is_file():  # no predict run here (an explain.py run's panels stay)
            return
        records = self.records()
        log.warning("removing the PNG pairs an earlier predict run left in %s", self.run_dir)
        self.remove_files(records)
        self.remove_unlisted(keep=set(), warn=False)
        self.path.unlink(missing_ok=True)

    def check_settings(self, first: dict[str, Any], settings: dict[str, Any]) -> None:
        before = first.get("settings") if first.get("status") == "started" else None
        if before is None:
            raise ConfigError(
                f"predict.resume=true but {self.path} does not start with a 'started' line; "
                "rerun without predict.resume to start over"
            )
        changed = settings_changes(before, as_logged(settings, before))
        if changed:
            raise ConfigError(
                f"predict.resume=true but {self.path} was started with other settings "
                f"({'; '.join(changed)}); resume with the settings it was started with, or rerun "
                "without predict.resume (or in a new hydra.run.dir) to start over"
            )

    def remove_files(self, records: list[dict[str, Any]], keep: set[str] = frozenset()) -> None:
        """Remove the files the ``done`` lines list (only inside the run directory), except
        those in ``keep`` (relative paths that other lines list)."""
        root = self.run_dir.resolve()
        for record in records:
            if record.get("status") != "done":
                continue
            for rel in record["pair"].get("files", {}).values():
                if rel in keep:
                    continue
                path = (self.run_dir / rel).resolve()
                if root in path.parents:
                    path.unlink(missing_ok=True)

    def remove_unlisted(self, keep: set[str], warn: bool = True) -> None:
        """Remove the pair files in the run directory's pair folders that no ``done`` line of
        this run lists (``keep``: relative paths): a kill between a pair's renames and its log
        line leaves some or all of them, and they would look finished beside a report that
        does not list them. (An explain.py run's panels in the same folder go too: both
        commands write ``panels/<name>.png``.) Only files, only inside the run directory."""
        root = self.run_dir.resolve()
        folders = [f for f in sorted(set(PAIR_FOLDERS.values())) if (self.run_dir / f).is_dir()]
        unlisted = [
            path
            for folder in folders
            if (self.run_dir / folder).resolve().parent == root  # not a link out of the run
            for path in sorted((self.run_dir / folder).glob("*.png"))
            if path.is_file() and f"{folder}/{path.name}" not in keep
        ]
        for path in unlisted:
            path.unlink(missing_ok=True)
        if unlisted and warn:
            log.warning(
                "removed %d file(s) a killed run wrote but did not log: %s",
                len(unlisted),
                ", ".join(str(p.relative_to(self.run_dir)) for p in unlisted[:5])
                + (" ..." if len(unlisted) > 5 else ""),
            )

    def done(self, row: dict[str, Any], stamps: dict[str, Any]) -> None:
        append_json_line(self.path, {"status": "done", "pair": row, "stamps": stamps})

    def failed(self, entry: dict[str, str]) -> None:
        append_json_line(self.path, {"status": "failed", "pair": entry})


def explained_otherwise(
    logged: dict[str, Any], settings: dict[str, Any], done: dict[str, dict[str, Any]]
) -> list[str]:
    """The ``done`` pairs of a log started before ``explained_prediction`` was recorded whose
    explanation may differ now: explained (not skipped), and not exactly one window, the one
    size whose sliding-window mask is the whole image's own prediction, which they explained
    (a smaller pair is padded to a window, a larger one blended)."""
    if "explained_prediction" not in settings or "explained_prediction" in logged:
        return []
    window = (settings.get("sliding_window") or {}).get("window")
    return [
        name
        for name, record in done.items()
        if "explanation_skipped" not in record["pair"]
        and list(record["pair"].get("size", ())) != [window, window]
    ]


def scene_pairs(pairs: list[Triplet]) -> bool:
    """Whether the pairs are georeferenced scenes (every file ``.tif``/``.tiff``/``.vrt``); a mix
    of scenes and other images is refused."""
    kinds = {is_scene_file(p.pre) and is_scene_file(p.post) for p in pairs}
    mixed = [p for p in pairs if is_scene_file(p.pre) != is_scene_file(p.post)]
    if mixed or len(kinds) > 1:
        example = mixed[0] if mixed else pairs[0]
        raise ConfigError(
            f"predict.py got GeoTIFF scenes (.tif/.tiff/.vrt) and other images together (e.g. "
            f"{example.pre} / {example.post}); predict them in separate runs"
        )
    return kinds == {True}


@task_wrapper
@frozen_gc()  # full collections skip the imports' objects (changecam.environment.frozen_gc)
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every input pair; write masks, probabilities, panels and ``predictions.json``."""
    output_dir = prepare_run(cfg)
    given = checked_threshold(cfg.threshold)
    spec = sliding_window_spec(cfg)
    if spec is None:
        raise ConfigError("predict.py predicts window by window: set sliding_window.enabled=true")
    settings = explain_settings(cfg, given)
    records = read_file_records(cfg)  # before the checkpoint and the mask are read
    roi = read_roi(settings) if settings is not None else None
    pairs = input_pairs(
        cfg.input.get("pre"), cfg.input.get("post"), cfg.input.get("dir"), INPUT_SUFFIXES
    )
    scenes = scene_pairs(pairs)
    check_scene_settings(cfg, given, settings is not None, scenes)
    device = resolve_device(cfg.get("device", "auto"))
    net, hparams = load_model(cfg)
    warn_training_scale(cfg.ckpt_path, hparams, "predict.py", NATIVE_SCALE_REMEDY)
    threshold = run_threshold(given, hparams)
    if settings is not None:
        settings = with_threshold(settings, threshold)
    net = inference_network(net, device)
    check_window(net, spec.window)  # before any pair: every pair would fail the same way
    if scenes:  # GeoTIFF scenes: changecam.geo, window by window
        PredictionLog(output_dir).clear()
        return predict_scenes(
            cfg,
            pairs,
            net,
            spec,
            threshold,
            settings is not None,
            device,
            output_dir,
            {
                k: v
                for k, v in run_settings(cfg, threshold, net, records).items()
                if k not in ("explain", "explained_prediction")  # a scene explains per window
            },
        )
    if settings is not None:
        settings.layers(net)  # unknown taps or layers fail before any pair
        check_explained_pairs(pairs, settings, roi.shape if roi is not None else None)
    pair_log = PredictionLog(output_dir)
    resume = bool(OmegaConf.select(cfg, "predict.resume", default=False))
    resumed = pair_log.start(run_settings(cfg, threshold, net, records), resume)
    remove_scenes_except(output_dir, set())  # an earlier run's scenes in this folder

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for pair in tqdm(pairs, desc="predict", unit="pair"):
        earlier = resumed.pop(pair.name, None)
        stamps = input_stamps(pair)
        if (
            earlier is not None
            and same_inputs(earlier["pair"].get("inputs"), pair)
            and earlier.get("stamps") == stamps
        ):
            rows.append(earlier["pair"])
            continue
        if earlier is not None:  # its inputs changed: none of its old files may stay
            log.info(
                "pair %s: its input files changed since it was logged, predicting again", pair.name
            )
            pair_log.remove_files([earlier])
        try:
            result = predict_pair(net, pair, spec, threshold, settings, device, roi)
            files = result.save(output_dir)
        except DiskFullError:
            raise
        except Exception as err:  # the pair fails alone (failed_pair)
            entry = failed_pair(pair, err)
            failed.append(entry)
            pair_log.failed(entry)
            continue
        row = result.summary()
        row["inputs"] = pair_inputs(pair)
        row["files"] = files
        row = strict_json(row)
        try:  # after all of the pair's files: the log never lists a partial pair
            pair_log.done(row, stamps)
        except BaseException:  # not logged (a full disk): its files would look finished
            for rel in files.values():
                (output_dir / rel).unlink(missing_ok=True)
            raise
        rows.append(row)
        del result  # one pair's images and maps in memory at a time
    if resumed:  # logged pairs this run's inputs no longer hold: their files would look finished
        log.warning(
            "removing the files of %d logged pair(s) that are not among this run's inputs: %s",
            len(resumed),
            ", ".join(sorted(resumed)),
        )
        pair_log.remove_files(list(resumed.values()))

    report = {
        "checkpoint": str(cfg.ckpt_path),
        "threshold": threshold,
        "sliding_window": OmegaConf.to_container(cfg.sliding_window, resolve=True),
        "probability_encoding": PROBABILITY_ENCODING,
        "explained": settings is not None,
        # whose maps the panels and curves use: its share is post_share(_<method>)
        "method": settings.method if settings is not None else None,
        "mean": {
            "changed_fraction": mean_of([r["changed_fraction"] for r in rows]),
            "faithfulness_gap": mean_of([r.get("faithfulness_gap") for r in rows]),
            "post_share": {},
            **mean_post_shares(rows),
        },
        "pairs": rows,
        "failed": failed,
    }
    write_json(output_dir / REPORT_FILE, report)
    print(f"predicted {len(rows)} pair(s) into {output_dir}")
    if failed:
        raise PredictionError(
            failure_message(failed, len(pairs), "pair(s) failed", output_dir / REPORT_FILE)
        )
    return report

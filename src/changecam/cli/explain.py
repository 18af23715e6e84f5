"""Explain a trained change detector on image pairs (Hydra, ``conf/explain.yaml``).

``python explain.py ckpt_path=<best.ckpt> input.dir=<folder with A/ and B/>`` (or
``input.pre=<file> input.post=<file>``) writes, in the run directory,
``panels/<name>.png``, ``maps/<name>.npz`` and ``explanations.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from changecam.atomic import DiskFullError, write_json
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
    task_wrapper,
    warn_training_scale,
)
from changecam.cli.scenes import check_scene_settings
from changecam.data.io import pair_size, read_image, read_label
from changecam.data.layout import Triplet, input_pairs
from changecam.explain import (
    ExplainSettings,
    choose_layer,
    explain_pair,
    resolve_taps,
    with_threshold,
)
from changecam.metrics import mean_of
from changecam.models.inference import inference_network

REPORT_FILE = "explanations.json"


class PairFailure(RuntimeError):
    """Some pairs failed (the others were explained)."""


def check_pairs(
    pairs: list[Triplet], settings: ExplainSettings, roi_size: tuple[int, int] | None
) -> tuple[list[Triplet], list[dict[str, str]]]:
    """Refuse, before writing anything, pairs that lack what the target needs or are larger
    than ``explain.max_pixels`` (the settings do not fit them). A pair whose files cannot be
    read or whose sizes differ fails alone: returns the others and the failed ones."""
    readable, failed = [], []
    for t in pairs:
        try:
            size = pair_size(t)
        except (ValueError, OSError) as err:
            failed.append(failed_pair(t, err))
            continue
        readable.append(t)
        if settings.max_pixels is not None and size[0] * size[1] > settings.max_pixels:
            raise ValueError(
                f"pair {t.name!r} ({t.pre}) is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, "
                f"above explain.max_pixels={settings.max_pixels}: explain a crop of it, or raise "
                "explain.max_pixels (memory grows with the image)"
            )
        problem = explain_target_problem(t, size, settings, roi_size)
        if problem:
            raise ValueError(problem)
    return readable, failed


def mean_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over pairs of each method's post share per layer and of the faithfulness gap
    (undefined values skipped)."""
    return {
        **mean_post_shares(rows),
        "faithfulness_gap": mean_of([r["faithfulness_gap"] for r in rows]),
        "pairs": len(rows),
        "pairs_with_empty_target": sum(r["empty_target"] for r in rows),
    }


def remove_earlier_run(output_dir: Path) -> None:
    """An earlier run's ``explanations.json``, panels (``panels/*.png``) and maps
    (``maps/*.npz``) in this run directory, whether it finished or was killed: a rerun that
    fails, or explains fewer pairs, would otherwise leave them beside its own as if they were."""
    earlier = [output_dir / REPORT_FILE] if (output_dir / REPORT_FILE).is_file() else []
    for folder, pattern in (("panels", "*.png"), ("maps", "*.npz")):
        if (output_dir / folder).is_dir():
            earlier += [p for p in (output_dir / folder).glob(pattern) if p.is_file()]
    for path in earlier:
        path.unlink(missing_ok=True)
    if earlier:
        log.warning(
            "removed %d file(s) of an earlier explain run in %s (explanations.json, panels/, "
            "maps/)",
            len(earlier),
            output_dir,
        )


@task_wrapper
def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain every input pair; write panels, maps and ``explanations.json``; return the JSON.

    A pair that cannot be read fails alone (logged, listed under ``failed``); the others are
    explained, and the command then fails naming the failed ones.
    """
    output_dir = prepare_run(cfg)
    given = checked_threshold(cfg.threshold)
    settings = explain_settings(cfg, given)
    if settings is None:
        raise ValueError("explain.enabled=false: explain.py has nothing to do")
    pairs = input_pairs(cfg.input.get("pre"), cfg.input.get("post"), cfg.input.get("dir"))
    check_scene_settings(cfg, None, False, scenes=False)  # input.* of scenes: judged, unused
    roi = read_roi(settings)
    readable, failed = check_pairs(pairs, settings, roi.shape if roi is not None else None)
    device = resolve_device(cfg.get("device", "auto"))
    net, hparams = load_model(cfg)
    warn_training_scale(cfg.ckpt_path, hparams, "explain.py", NATIVE_SCALE_REMEDY)
    settings = with_threshold(settings, run_threshold(given, hparams))
    model = inference_network(net, device)
    layers = settings.layers(model)
    remove_earlier_run(output_dir)  # once this run's settings and network are known good

    rows: list[dict[str, Any]] = []
    for t in tqdm(readable, desc="explain", unit="pair"):
        try:
            label = read_label(t.label) if t.label is not None else None
            result = explain_pair(
                model,
                read_image(t.pre),
                read_image(t.post),
                label=label,
                roi=roi,
                name=t.name,
                settings=settings,
                device=device,
            )
            files = result.save(output_dir, maps=bool(cfg.get("save_maps", True)))
        except DiskFullError:
            raise
        except Exception as err:  # the pair fails alone (failed_pair)
            failed.append(failed_pair(t, err))
            continue
        row = result.summary()
        row["inputs"] = {
            "pre": str(t.pre),
            "post": str(t.post),
            "label": str(t.label) if t.label else None,
        }
        row["files"] = {k: str(Path(v).relative_to(output_dir)) for k, v in files.items()}
        rows.append(row)
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "target": settings.target,
        "threshold": settings.threshold,
        "methods": list(settings.methods),
        # whose maps the panels and curves use: its share is post_share(_<method>)
        "method": settings.method,
        "taps": list(resolve_taps(model, settings.taps)),
        "panel_layer": choose_layer(settings.method_layers(layers), settings.panel_layer),
        "faithfulness": {
            "enabled": settings.faithfulness.enabled,
            # the curves rank pixels by explain.method's maps, at the deepest layer it has
            # (none without curves: their layer is then not checked)
            "layer": choose_layer(settings.method_layers(layers), settings.faithfulness.layer)
            if settings.faithfulness.enabled
            else None,
            "method": settings.method,
            "steps": settings.faithfulness.steps,
            "random_repeats": settings.faithfulness.random_repeats,
            "gap": f"(AUC_random - AUC_{settings.method}) / |S(k=0)| of the date-swap deletion "
            "curve of both dates; positive: better than random; null: undefined (empty target)",
        },
        "mean": mean_summary(rows),
        "pairs": rows,
        "failed": failed,
    }
    write_json(output_dir / REPORT_FILE, report)
    gaps = ", ".join(
        f"{r['name']} {r['faithfulness_gap']:.3f}"
        if r["faithfulness_gap"] is not None
        else f"{r['name']} n/a"
        for r in rows
    )
    log.info("faithfulness gap per pair: %s", gaps)
    print(f"explained {len(rows)} pair(s) into {output_dir}")
    mean = report["mean"]
    if mean["faithfulness_gap"] is not None:
        print(
            f"mean faithfulness gap ({report['faithfulness']['layer']}): {mean['faithfulness_gap']:.3f}"
        )
    if failed:
        raise PairFailure(
            failure_message(failed, len(pairs), "pair(s) failed", output_dir / REPORT_FILE)
        )
    return report

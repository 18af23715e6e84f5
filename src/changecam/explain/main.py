"""Explain a trained change detector on image pairs (Hydra, ``conf/explain.yaml``).

``python explain.py ckpt_path=<best.ckpt> input.dir=<folder with A/ and B/>`` (or
``input.pre=<file> input.post=<file>``) writes, in the run directory,
``panels/<name>.png``, ``maps/<name>.npz`` and ``explanations.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from changecam.utils import CONF_DIR, configure_environment

configure_environment()

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from changecam.checkpoint import load_network  # noqa: E402
from changecam.data.io import image_size, read_image, read_label  # noqa: E402
from changecam.data.layout import Triplet, input_pairs  # noqa: E402
from changecam.explain.hirescam import per_date_layers, resolve_taps  # noqa: E402
from changecam.explain.pipeline import (  # noqa: E402
    ExplainSettings,
    explain_pair,
    settings_from_config,
)
from changecam.utils import log, print_config, task_wrapper, write_json  # noqa: E402


def check_pairs(
    pairs: list[Triplet], settings: ExplainSettings, roi_size: tuple[int, int] | None
) -> None:
    """Refuse, before writing anything, pairs whose sizes differ or that lack what the target needs."""
    for t in pairs:
        size = image_size(t.pre)
        if image_size(t.post) != size:
            raise ValueError(
                f"pair {t.name!r}: {t.pre} is {size[0]}x{size[1]} but {t.post} is "
                f"{image_size(t.post)[0]}x{image_size(t.post)[1]} (height x width); both dates must "
                "have the same size"
            )
        if t.label is not None and image_size(t.label) != size:
            raise ValueError(
                f"pair {t.name!r}: label {t.label} is {image_size(t.label)} but the images are {size}"
            )
        if settings.target == "ground_truth" and t.label is None:
            raise ValueError(
                f"explain.target=ground_truth but pair {t.name!r} ({t.pre}) has no label "
                "(put it in label/ next to A/ and B/, or use explain.target=predicted)"
            )
        if roi_size is not None and roi_size != size:
            raise ValueError(f"explain.roi is {roi_size} but pair {t.name!r} is {size}")


def check_layers(model: torch.nn.Module, settings: ExplainSettings) -> list[str]:
    """The per-date layers explained; errors name the config key that asks for a missing one."""
    layers = per_date_layers(resolve_taps(model, settings.taps))
    if not layers:
        raise ValueError(
            f"explain.taps={list(settings.taps or [])} has no per-date layer (enc1, enc2 ...); panels and shares need one"
        )
    for key, layer in (
        ("explain.panel_layer", settings.panel_layer),
        ("explain.faithfulness.layer", settings.faithfulness_layer),
    ):
        if layer is not None and layer not in layers:
            raise ValueError(
                f"{key}={layer!r} is not an explained per-date layer; available: {layers}"
            )
    return layers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def mean_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over pairs of the post share per layer and the faithfulness gap (undefined values skipped)."""

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else None

    layers = list(rows[0]["post_share"]) if rows else []
    return {
        "post_share": {k: mean([r["post_share"][k] for r in rows]) for k in layers},
        "faithfulness_gap": mean([r["faithfulness_gap"] for r in rows]),
        "pairs": len(rows),
        "pairs_with_empty_target": sum(r["empty_target"] for r in rows),
    }


@task_wrapper
def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain every input pair; write panels, maps and ``explanations.json``; return the JSON."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config"):
        print_config(cfg)
    pairs = input_pairs(cfg.input.get("pre"), cfg.input.get("post"), cfg.input.get("dir"))
    settings = settings_from_config(cfg.explain)
    roi = read_label(cfg.explain.roi) if cfg.explain.get("roi") else None
    if settings.target == "roi" and roi is None:
        raise ValueError("explain.target=roi needs explain.roi=<mask image>")
    check_pairs(pairs, settings, roi.shape if roi is not None else None)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    device = resolve_device(cfg.get("device", "auto"))
    model = load_network(cfg.ckpt_path, model_cfg).to(device).eval()
    layers = check_layers(model, settings)

    rows = []
    for t in tqdm(pairs, desc="explain", unit="pair"):
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
        "taps": list(resolve_taps(model, settings.taps)),
        "panel_layer": settings.panel_layer or layers[-1],
        "faithfulness": {
            "layer": settings.faithfulness_layer or layers[-1],
            "method": "hirescam",
            "steps": settings.steps,
            "random_repeats": settings.random_repeats,
            "gap": "(AUC_random - AUC_hirescam) / |S(k=0)| of the date-swap deletion curve of both "
            "dates; positive: better than random; null: undefined (empty target)",
        },
        "mean": mean_summary(rows),
        "pairs": rows,
    }
    write_json(output_dir / "explanations.json", report)
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
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="explain")
def main(cfg: DictConfig) -> None:
    explain(cfg)


if __name__ == "__main__":
    main()

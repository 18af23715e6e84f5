"""Does the synthetic data teach anything transferable? ``experiment=real_small`` on the six
shared 1024² LEVIR-CD images (4 train / 1 val / 1 test), same seed and budget, three rows:

* ``scratch``: ``experiment=real_small`` from random weights;
* ``finetuned``: the same with ``module.init_from=<synthetic checkpoint>``;
* ``synthetic_only``: the synthetic checkpoint evaluated as it is (``train=false``), and also
  on every image of the data folder (``every_image``: its four training images are unseen by
  this checkpoint too), whole images by sliding windows;
* ``scratch_joint`` and ``finetuned_joint``: as ``scratch`` and ``finetuned``, with the
  synthetic checkpoint's own training split joining the real one (``data.extra_train``), so
  fine-tuning rehearses what the checkpoint learned.

The synthetic checkpoint is ``--synthetic-ckpt`` or, without it, the best checkpoint of
``train.py experiment=quickstart`` trained here first (its time is reported). Columns: pooled
F1 and IoU of the change class on the val image (``test_102``) and on the test image
(``test_2``), training wall time. These images come from LEVIR-CD's *test* split: the scores are
"F1 on the six shared LEVIR-CD images", never LEVIR-CD test results.

Not part of ``make bench`` (it trains for about half an hour on two cores): ``make bench-real``.
One JSON line per row is printed and written to ``--out`` (``benchmarks/real_small.jsonl``).

    python benchmarks/real_small.py [--synthetic-ckpt best.ckpt] [--rows scratch finetuned]
        [--override trainer.max_epochs=2 ...] [--tiny]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, TINY_QUICKSTART, machine, quickstart_config, timed

from changecam.atomic import write_text
from changecam.cli.common import close_wandb, compose_config
from changecam.cli.train import train
from changecam.data.synthetic import GENERATOR_VERSION

SIX_IMAGES = REPO.parent / "shared" / "data" / "levir-cd-1024-samples"
ROWS = ("scratch", "finetuned", "synthetic_only", "scratch_joint", "finetuned_joint")
# the synthetic data of the checkpoint: the levir style with unlabelled bare soil changing
# between the dates (generator version 5; README "Real imagery": of the land-cover parts only
# the soil raised the synthetic-only F1, with two training seeds). For comparison:
# --generator data.synthetic.style=levir (version 3's images) or data.synthetic.style=simple
NEW_GENERATOR = ("data.synthetic.style=levir", "data.synthetic.landcover=[soil]")
QUIET = [
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
]
# --tiny: the real_small recipe shrunk to seconds (smoke test of the benchmark itself)
TINY_REAL = [
    "model.base_channels=4",  # the tiny quickstart network's width (TINY_QUICKSTART)
    "data.patch_size=64",
    "data.crops_per_image=2",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "trainer.max_epochs=1",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "callbacks.cam_panels=null",
]


def synthetic_checkpoint(
    tmp: Path, tiny: bool, generator: list[str] | None = None
) -> tuple[Path, float]:
    """Train ``experiment=quickstart`` (as ``make train``) on synthetic data written to
    ``tmp/synthetic``; its best checkpoint and wall time.

    ``generator``: overrides of the synthetic data, e.g. ``["data.synthetic.style=levir"]``.
    """
    overrides = [
        *QUIET,
        f"data.root={synthetic_root(tmp)}",
        *(TINY_QUICKSTART if tiny else []),
        *(generator or []),
    ]
    if tiny:  # the real-data rows keep the quickstart network's depth 4
        overrides = [o for o in overrides if o not in ("model.depth=2", "logger=csv")]
        overrides += ["trainer.max_epochs=1", "callbacks.cam_panels=null", "logger=csv"]
    cfg = quickstart_config(tmp / "quickstart", overrides)
    cfg.print_config = False
    seconds, _ = timed(lambda: train(cfg))
    close_wandb()
    return tmp / "quickstart" / "run" / "checkpoints" / "best.ckpt", seconds


def synthetic_root(tmp: Path) -> Path:
    """Where :func:`synthetic_checkpoint` writes its training data."""
    return tmp / "synthetic"


def real_row(
    row: str,
    data: Path,
    ckpt: Path | None,
    tmp: Path,
    extra: list[str],
    tiny: bool,
    synthetic_data: Path | None = None,
) -> dict[str, Any]:
    """One row: train (or only evaluate) ``experiment=real_small`` on ``data``
    (``*_joint`` rows: with ``synthetic_data``'s training split as ``data.extra_train``)."""
    overrides = [
        "experiment=real_small",
        f"data.root={data}",
        *QUIET,
        *(TINY_REAL if tiny else []),
        *extra,
    ]
    if row.endswith("_joint"):
        if synthetic_data is None:
            raise ValueError(f"row {row} needs the synthetic data the checkpoint learned from")
        overrides.append(f"data.extra_train=[{synthetic_data}]")
    if not row.startswith("scratch"):
        overrides.append(f"module.init_from={ckpt}")
    if row == "synthetic_only":
        overrides.append("train=false")
    cfg = compose_config("train", overrides, tmp / row)
    cfg.print_config = False
    seconds, metrics = timed(lambda: train(cfg))
    close_wandb()
    every_image = None
    if row == "synthetic_only" and ckpt is not None:
        every_image = every_image_scores(ckpt, data, tmp, tiny)
    return {
        "row": row,
        "val_f1": metrics.get("val/f1"),
        "val_iou": metrics.get("val/iou"),
        "test_f1": metrics.get("test/f1"),
        "test_iou": metrics.get("test/iou"),
        "wall_s": round(seconds, 1),
        "init_from": None if row.startswith("scratch") else str(ckpt),
        "extra_train": str(synthetic_data) if row.endswith("_joint") else None,
        "overrides": extra,
        # synthetic_only: the checkpoint on every listed image (all unseen by it)
        "every_image": every_image,
    }


def every_image_scores(ckpt: Path, data: Path, tmp: Path, tiny: bool) -> dict[str, Any]:
    """F1 of ``ckpt`` as it is on *every* image of ``data``'s lists (``eval.py`` on whole images
    with sliding windows): the synthetic-only checkpoint has seen none of them, so its four
    training images are held out for it too. Pooled F1 over the images and F1 per image."""
    from changecam.cli.evaluate import evaluate
    from changecam.data.layout import SPLITS, find_triplets

    # every split's images in one flat LEVIR-CD-256 folder (links), listed as each split
    root = tmp / "every_image"
    names = []
    for split in SPLITS:
        for triplet in find_triplets(data, split):
            assert triplet.label is not None  # find_triplets pairs labelled triplets
            for folder, path in (("A", triplet.pre), ("B", triplet.post), ("label", triplet.label)):
                link = root / folder / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(path.resolve())
            names.append(triplet.pre.name)
    listing = "".join(f"{n}\n" for n in sorted(set(names)))
    for split in SPLITS:
        write_text(root / "list" / f"{split}.txt", listing)
    overrides = [
        f"ckpt_path={ckpt}",
        "data=levir_cd",
        f"data.root={root}",
        "logger=csv",
        "sliding_window.enabled=true",
        "post_share=false",
        "trainer.enable_progress_bar=false",
        *(["data.patch_size=64", "+trainer.limit_test_batches=2"] if tiny else []),
    ]
    cfg = compose_config("eval", overrides, tmp / "every_image_run")
    metrics = evaluate(cfg)
    close_wandb()
    with open(tmp / "every_image_run" / "run" / "per_image.csv", newline="") as f:
        per_image = {Path(r["name"]).stem: round(float(r["F1"]), 4) for r in csv.DictReader(f)}
    return {"pooled_f1": metrics["test/f1"], "per_image_f1": per_image}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table of the rows."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "| row | synthetic data | val F1 (`test_102`) | val IoU | test F1 (`test_2`) | test IoU "
        "| wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("generator") is None and r.get("synthetic_ckpt") not in (None, "quickstart"):
            generator = f"`{Path(r['synthetic_ckpt']).name}` (given)"
        else:
            generator = " ".join((r.get("generator") or {}).get("overrides", [])) or "default"
        data = "–" if r["row"] == "scratch" else generator
        lines.append(
            f"| {r['row']} | {data} | {fmt(r['val_f1'])} | {fmt(r['val_iou'])} | {fmt(r['test_f1'])} "
            f"| {fmt(r['test_iou'])} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SIX_IMAGES)
    parser.add_argument("--synthetic-ckpt", type=Path, default=None)
    parser.add_argument(
        "--synthetic-data",
        type=Path,
        default=None,
        help="the data --synthetic-ckpt was trained on (for the *_joint rows)",
    )
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of every row")
    parser.add_argument(
        "--generator",
        nargs="*",
        default=list(NEW_GENERATOR),
        help="overrides of the synthetic data the quickstart checkpoint is trained on, "
        "e.g. data.synthetic.style=levir data.synthetic.shapes=rectangles",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "real_small.jsonl")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    joint = [row for row in args.rows if row.endswith("_joint")]
    if args.synthetic_ckpt is not None and args.synthetic_data is None and joint:
        # before any row trains: the rows before them were lost when the first one failed
        parser.error(
            f"the rows {joint} need --synthetic-data (the data --synthetic-ckpt learned from), "
            "or leave them out with --rows"
        )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="changecam-real-") as tmp_dir:
        tmp = Path(tmp_dir)
        ckpt, synthetic_s = args.synthetic_ckpt, None
        if ckpt is None and set(args.rows) - {"scratch"}:
            ckpt, synthetic_s = synthetic_checkpoint(tmp, args.tiny, args.generator)
        synthetic_data = args.synthetic_data
        if synthetic_data is None and args.synthetic_ckpt is None and ckpt is not None:
            synthetic_data = synthetic_root(tmp)
        info = {
            "machine": machine(),
            "data": str(args.data),
            "synthetic_ckpt": str(args.synthetic_ckpt) if args.synthetic_ckpt else "quickstart",
            "synthetic_train_s": round(synthetic_s, 1) if synthetic_s else None,
            # a given checkpoint's synthetic data is not known here (--generator is not used)
            "generator": None
            if args.synthetic_ckpt
            else {"version": GENERATOR_VERSION, "overrides": args.generator},
        }
        for row in args.rows:
            result = {
                **real_row(row, args.data, ckpt, tmp, args.override, args.tiny, synthetic_data),
                **info,
            }
            print(json.dumps(result, sort_keys=True), flush=True)
            rows.append(result)
    write_text(args.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_text(args.out.with_suffix(".md"), markdown(rows))
    return rows


if __name__ == "__main__":
    main()

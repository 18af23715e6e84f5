"""The issue-15 benchmarks run end to end on tiny inputs (no figure is asserted but the structure)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
SIX_IMAGES = REPO.parent / "shared" / "data" / "levir-cd-1024-samples"


@pytest.mark.slow
def test_full_scale_writes_the_levir_structure_and_times_the_batches(tmp_path):
    full_scale = importlib.import_module("full_scale")
    root = full_scale.write_levir_structure(tmp_path / "L", {"train": 5, "val": 2}, 2, 64, 32)
    names = sorted(p.name for p in (root / "train" / "A").iterdir())
    assert names == [f"train_{n}.png" for n in (1, 2, 3, 4, 5)]
    assert (root / "train" / "A" / "train_3.png").stat().st_ino == (
        root / "train" / "A" / "train_1.png"
    ).stat().st_ino  # hard links to the rendered scenes
    figures = full_scale.main(["--tiny", "--train-batches", "2", "--val-batches", "2"])
    assert figures["tiles"] == {"train": 80, "val": 48, "test": 48}
    assert figures["batches_timed"]["train"] == 2 and figures["cam_epoch_end_s"] > 0
    assert 0 < figures["cam_share_of_levir_epoch"] < 1


@pytest.mark.slow
def test_real_small_benchmark_rows(tmp_path):
    if not (SIX_IMAGES / "A").is_dir():
        pytest.skip(f"the six 1024² LEVIR-CD images are not at {SIX_IMAGES}")
    real_small = importlib.import_module("real_small")
    out = tmp_path / "rows.jsonl"
    rows = real_small.main(["--tiny", "--out", str(out), "--rows", *real_small.ROWS])
    assert [r["row"] for r in rows] == list(real_small.ROWS)
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == list(
        real_small.ROWS
    )
    assert all(0 <= r["test_f1"] <= 1 for r in rows)
    # the quickstart checkpoint it trained records the synthetic data it was trained on
    assert all(r["generator"]["overrides"] == list(real_small.NEW_GENERATOR) for r in rows)
    joint = {r["row"]: r["extra_train"] for r in rows if r["row"].endswith("_joint")}
    assert set(joint) == {"scratch_joint", "finetuned_joint"}
    assert all(path.endswith("synthetic") for path in joint.values())
    assert "| synthetic_only |" in out.with_suffix(".md").read_text()
    every = next(r for r in rows if r["row"] == "synthetic_only")["every_image"]
    assert 0 <= every["pooled_f1"] <= 1
    assert len(every["per_image_f1"]) == 2  # --tiny: two whole images (limit_test_batches)
    assert set(every["per_image_f1"]) <= {p.stem for p in (SIX_IMAGES / "A").iterdir()}
    assert all(r["every_image"] is None for r in rows if r["row"] != "synthetic_only")


def test_real_small_table_names_a_given_checkpoint_not_a_generator():
    real_small = importlib.import_module("real_small")
    row = {"val_f1": 0.5, "val_iou": 0.3, "test_f1": 0.8, "test_iou": 0.7, "wall_s": 60.0}
    table = real_small.markdown(
        [
            {**row, "row": "scratch", "synthetic_ckpt": "/runs/best.ckpt", "generator": None},
            {**row, "row": "finetuned", "synthetic_ckpt": "/runs/best.ckpt", "generator": None},
            {
                **row,
                "row": "finetuned",
                "synthetic_ckpt": "quickstart",
                "generator": {"version": 5, "overrides": ["data.synthetic.style=simple"]},
            },
        ]
    )
    lines = table.splitlines()
    assert lines[2].startswith("| scratch | – |")
    assert lines[3].startswith("| finetuned | `best.ckpt` (given) | 0.500 |")
    assert lines[4].startswith("| finetuned | data.synthetic.style=simple |")


def test_joint_rows_without_the_synthetic_data_are_refused_before_any_row(tmp_path, capsys):
    """With --synthetic-ckpt and the default rows, the first *_joint row failed after the
    rows before it had trained, and --out was never written (helper-106)."""
    real_small = importlib.import_module("real_small")
    with pytest.raises(SystemExit):
        real_small.main(
            ["--synthetic-ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o.jsonl")]
        )
    assert "need --synthetic-data" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()

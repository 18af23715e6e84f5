"""predict.py: folder and single-pair modes, any image size, refused pairs, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import changecam.atomic
import changecam.cli.predict
import changecam.explain.runner
from changecam.cli.predict import PredictionError, encode_probability, predict, read_probability
from changecam.data.io import read_image, write_png
from changecam.data.transforms import image_to_tensor
from changecam.models.sliding_window import SlidingWindow, sliding_window_logits
from changecam.training.checkpoint import load_network
from helpers import compose_train, run_script
from test_checkpoint import make_lightning_checkpoint

FAST = [
    "device=cpu",
    "sliding_window.window=64",
    "explain.faithfulness.steps=2",
    "explain.faithfulness.batch_size=3",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    """A tiny (width 4, depth 2) checkpoint trained for a few steps."""
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("predict_ckpt") / "best.ckpt", tiny_synthetic, steps=3
    )


def run_predict(tmp_path: Path, overrides: list[str]) -> dict:
    return predict(compose_train(tmp_path, [*FAST, *overrides], "predict"))


def write_pair(
    folder: Path, name: str, size: tuple[int, int], seed: int = 0, post_size=None
) -> None:
    rng = np.random.default_rng(seed)
    write_png(folder / "A" / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    write_png(
        folder / "B" / f"{name}.png",
        rng.integers(0, 256, (*(post_size or size), 3), dtype=np.uint8),
    )


@pytest.mark.slow
def test_folder_of_real_levir_samples(tmp_path, ckpt, samples_dir):
    report = run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={samples_dir}"])
    run = tmp_path / "run"
    names = sorted(p.stem for p in (samples_dir / "A").glob("*.png"))
    assert len(names) == 11
    assert json.loads((run / "predictions.json").read_text()) == json.loads(json.dumps(report))
    assert [p["name"] for p in report["pairs"]] == names and report["failed"] == []
    for pair in report["pairs"]:
        name = pair["name"]
        mask = cv2.imread(str(run / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        probability = read_probability(run / "probabilities" / f"{name}.png")
        assert probability.shape == (256, 256)
        far = np.abs(probability - 0.5) > 0.5 / 65535  # the mask thresholds unrounded values
        assert np.array_equal((mask == 255)[far], (probability > 0.5)[far])
        assert pair["changed_fraction"] == pytest.approx((mask == 255).mean())
        panel = cv2.imread(str(run / "panels" / f"{name}.png"))
        assert panel.ndim == 3 and panel.shape[0] > 200 and panel.std() > 10, "a real picture"
        assert set(pair["post_share"]) == {"input", "enc1", "enc2"}
        assert "faithfulness_gap" in pair
        assert pair["files"] == {
            "mask": f"masks/{name}.png",
            "probability": f"probabilities/{name}.png",
            "panel": f"panels/{name}.png",
        }
        assert pair["inputs"]["label"] == str(samples_dir / "label" / f"{name}.png")
    assert report["probability_encoding"].startswith("16-bit")


def test_probability_file_is_the_sliding_window_prediction(tmp_path, ckpt, levir256_tiny):
    pre, post = (
        levir256_tiny / "A" / "test_7_0256_0512.png",
        levir256_tiny / "B" / "test_7_0256_0512.png",
    )
    run_predict(
        tmp_path,
        [f"ckpt_path={ckpt}", f"input.pre={pre}", f"input.post={post}", "explain.enabled=false"]
        + ["sliding_window.window=32"],  # 3 x 3 overlapping windows over the 64 px pair
    )
    net = load_network(ckpt)
    spec = SlidingWindow(window=32, overlap=0.25)
    x_pre, x_post = (image_to_tensor(read_image(p))[None] for p in (pre, post))
    expected = torch.sigmoid(sliding_window_logits(net, x_pre, x_post, spec))[0, 0].numpy()
    got = read_probability(tmp_path / "run" / "probabilities" / "test_7_0256_0512.png")
    np.testing.assert_allclose(got, expected, atol=0.5 / 65535 + 1e-7)
    assert not (tmp_path / "run" / "panels").exists()


@pytest.mark.parametrize("size", [(1000, 700), (50, 37), (20, 13)], ids=str)
def test_any_image_size_gives_outputs_of_exactly_that_size(tmp_path, ckpt, size):
    write_pair(tmp_path / "in", "odd", size)
    explain = ["explain.enabled=false"] if size == (1000, 700) else []  # keep the test fast
    report = run_predict(
        tmp_path,
        [
            f"ckpt_path={ckpt}",
            f"input.pre={tmp_path / 'in/A/odd.png'}",
            f"input.post={tmp_path / 'in/B/odd.png'}",
            *explain,
        ],
    )
    mask = cv2.imread(str(tmp_path / "run" / "masks" / "odd.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == size
    assert read_probability(tmp_path / "run" / "probabilities" / "odd.png").shape == size
    assert report["pairs"][0]["size"] == list(size)
    assert (tmp_path / "run" / "panels" / "odd.png").is_file() == (not explain)


def test_large_pairs_skip_the_explanation_but_keep_the_mask(tmp_path, ckpt):
    write_pair(tmp_path / "in", "a_big", (64, 96))
    write_pair(tmp_path / "in", "b_small", (32, 32))
    report = run_predict(
        tmp_path,
        [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}", "explain.max_pixels=4096"],
    )
    big, small = report["pairs"]
    assert "exceeds explain.max_pixels=4096" in big["explanation_skipped"]
    assert "post_share" not in big and set(small["post_share"]) == {"input", "enc1", "enc2"}
    assert set(report["mean"]["post_share"]) == {"input", "enc1", "enc2"}
    assert (tmp_path / "run" / "masks" / "a_big.png").is_file()
    assert not (tmp_path / "run" / "panels" / "a_big.png").exists()
    assert (tmp_path / "run" / "panels" / "b_small.png").is_file()


def test_explain_method_contrastive_alone_gives_its_shares_and_their_means(tmp_path, ckpt):
    """predict.py runs explain.method (its only method unless explain.methods adds others);
    the report names it, and the means cover each method's shares."""
    write_pair(tmp_path / "in", "a", (32, 32))
    write_pair(tmp_path / "in", "b", (32, 32), seed=1)
    report = run_predict(
        tmp_path,
        [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}", "explain.method=contrastive"],
    )
    assert report["method"] == "contrastive"
    rows = report["pairs"]
    assert all("post_share" not in r and set(r["post_share_contrastive"]) for r in rows)
    assert set(report["mean"]["post_share_contrastive"]) == set(rows[0]["post_share_contrastive"])
    for layer, mean in report["mean"]["post_share_contrastive"].items():
        shares = [r["post_share_contrastive"][layer] for r in rows]
        assert mean == pytest.approx(np.mean([v for v in shares if v is not None]))
    both = run_predict(
        tmp_path / "both",
        [
            f"ckpt_path={ckpt}",
            f"input.dir={tmp_path / 'in'}",
            "explain.method=contrastive",
            "explain.methods=[hirescam,contrastive]",
        ],
    )
    assert set(both["mean"]) >= {"post_share", "post_share_contrastive"}
    assert both["mean"]["post_share_contrastive"] == report["mean"]["post_share_contrastive"]


def test_pairs_of_different_sizes_are_refused_and_leave_nothing(tmp_path, ckpt):
    write_pair(tmp_path / "in", "good", (32, 32))
    write_pair(tmp_path / "in", "skewed", (32, 32), post_size=(32, 40))
    with pytest.raises(
        PredictionError,
        match=r"1 of 2 pair\(s\) failed, with no output from this run \(skewed\).*32x32 but .*32x40",
    ):
        run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"])
    run = tmp_path / "run"
    assert sorted(p.name for p in run.rglob("*.png")) == ["good.png"] * 3
    report = json.loads((run / "predictions.json").read_text())
    assert [p["name"] for p in report["pairs"]] == ["good"]
    assert (
        report["failed"][0]["name"] == "skewed"
        and "both dates must have the same size" in report["failed"][0]["error"]
    )


def test_a_pair_whose_logits_are_not_finite_fails_alone(tmp_path, ckpt, monkeypatch):
    """Finite weights whose outputs overflow on a pair (NaN logits) would be written as no
    change: that pair fails, naming the count, and writes nothing; the others are predicted."""
    write_pair(tmp_path / "in", "good", (32, 32))
    write_pair(tmp_path / "in", "overflow", (32, 40), seed=1)
    real = changecam.cli.predict.sliding_window_logits

    def overflowing(net, pre, post, spec):
        logits = real(net, pre, post, spec)
        if pre.shape[-1] == 40:
            logits[..., 3, :5] = float("nan")
        return logits

    monkeypatch.setattr(changecam.cli.predict, "sliding_window_logits", overflowing)
    with pytest.raises(PredictionError, match=r"1 of 2 pair\(s\) failed.*\(overflow\)"):
        run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"])
    run = tmp_path / "run"
    assert sorted(p.name for p in run.rglob("*.png")) == ["good.png"] * 3
    (failed,) = json.loads((run / "predictions.json").read_text())["failed"]
    assert "5 of the network's 1280 change logits are not finite" in failed["error"]


def test_a_pair_failing_with_any_error_fails_alone_naming_it(tmp_path, ckpt, monkeypatch, caplog):
    """An error type no input check raises (here a KeyError from the panel) stopped the folder
    at that pair, naming none, and left the later pairs unpredicted (helper-182)."""
    for name in ("a", "b", "c"):
        write_pair(tmp_path / "in", name, (32, 32), seed=ord(name))
    real = changecam.explain.runner.render_panel

    def failing(*args, **kwargs):
        if failing.calls == 1:
            failing.calls += 1
            raise KeyError("no such colour")
        failing.calls += 1
        return real(*args, **kwargs)

    failing.calls = 0
    monkeypatch.setattr(changecam.explain.runner, "render_panel", failing)
    with pytest.raises(PredictionError, match=r"1 of 3 pair\(s\) failed.*\(b\)"):
        run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"])
    run = tmp_path / "run"
    report = json.loads((run / "predictions.json").read_text())
    assert [p["name"] for p in report["pairs"]] == ["a", "c"]
    (failed,) = report["failed"]
    assert failed["name"] == "b" and failed["error"] == "KeyError: 'no such colour'"
    assert not [p for p in run.rglob("b*.png")]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("pair b failed")]
    assert record.exc_info is not None  # a fault of the code more likely: its traceback is logged


def test_a_pair_failing_while_writing_leaves_no_files(tmp_path, ckpt, monkeypatch):
    write_pair(tmp_path / "in", "one", (32, 32))
    real = os.replace

    def failing(tmp, path):  # the mask and probability are renamed in place, then this fails
        if "panels" in str(path):
            raise OSError(f"disk full writing {path}")
        real(tmp, path)

    monkeypatch.setattr(changecam.atomic.os, "replace", failing)
    with pytest.raises(PredictionError, match="disk full"):
        run_predict(tmp_path, [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"])
    assert list((tmp_path / "run").rglob("*.png")) == [], "mask and probability removed again"


def test_bad_inputs_fail_before_any_work(tmp_path, ckpt):
    with pytest.raises(ValueError, match="no input"):
        run_predict(tmp_path, [f"ckpt_path={ckpt}"])
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        run_predict(
            tmp_path,
            [
                f"ckpt_path={ckpt}",
                f"input.pre={tmp_path}/missing.png",
                f"input.post={tmp_path}/missing.png",
            ],
        )
    with pytest.raises(
        ValueError, match="sliding_window.window=30 must be divisible by 2\\*\\*depth = 4"
    ):
        write_pair(tmp_path / "in", "x", (32, 32))
        run_predict(
            tmp_path,
            [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}", "sliding_window.window=30"],
        )
    run = tmp_path / "run"
    written = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith(".hydra/")] == []


def test_an_explanation_target_no_pair_can_meet_is_refused_before_any_pair(tmp_path, ckpt):
    """explain.target=ground_truth for pairs without a label, and an explain.roi of another
    size, failed every pair after its network ran, leaving nothing, the message naming no key
    (helper-114): refused up front, as explain.py refuses them. A pair above
    explain.max_pixels is not explained and needs neither."""
    write_pair(tmp_path / "in", "a_big", (64, 96))
    write_pair(tmp_path / "in", "b_small", (32, 32))
    base = [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}"]
    with pytest.raises(ValueError, match="explain.target=ground_truth but pair 'a_big'"):
        run_predict(tmp_path, [*base, "explain.target=ground_truth"])
    roi = tmp_path / "roi.png"
    write_png(roi, np.full((32, 32), 255, np.uint8))
    with pytest.raises(ValueError, match="explain.roi is 32x32 but pair 'a_big' is 64x96"):
        run_predict(tmp_path, [*base, "explain.target=roi", f"explain.roi={roi}"])
    assert not (tmp_path / "run" / "masks").exists()
    report = run_predict(
        tmp_path,
        [*base, "explain.target=roi", f"explain.roi={roi}", "explain.max_pixels=1024"],
    )
    assert [p["name"] for p in report["pairs"]] == ["a_big", "b_small"]


def test_scene_keys_are_judged_before_the_network_and_warned_about_for_pngs(tmp_path, ckpt, caplog):
    """An invalid input.*/predict.* value fails before the checkpoint is read (a missing one
    here), for PNG pairs too; valid ones that only GeoTIFF scenes use are warned about."""
    from changecam.geo import SceneError

    write_pair(tmp_path / "in", "x", (32, 32))
    pngs = [f"input.dir={tmp_path / 'in'}"]
    scenes = [f"input.pre={tmp_path}/a.tif", f"input.post={tmp_path}/b.tif"]
    for name in ("a.tif", "b.tif"):  # never read: the values fail first
        (tmp_path / name).touch()
    for inputs in (pngs, scenes):
        for bad, match in (
            (
                "input.scale=pct",
                r"input.scale='pct' is not allowed; expected one of \['percentile'",
            ),
            ("input.align=exact", r"input.align='exact' is not allowed"),
            ("predict.gdal_threads=0", r"predict.gdal_threads=0 must be an integer >= 1"),
            ("predict.block_size=null", r"predict.block_size=None must be an integer"),
            ("predict.batch_size=abc", r"predict.batch_size='abc' must be an integer"),
            ("predict.min_area_m2=null", r"predict.min_area_m2=None must be a number"),
            ("predict.min_area_m2=nan", r"predict.min_area_m2=nan must be a finite number >= 0"),
            ("predict.min_area_m2=-1", r"predict.min_area_m2=-1 must be a finite number >= 0"),
            ("input.scale=fixed", r"input.scale=fixed needs input.scale_min"),
        ):
            with pytest.raises(SceneError, match=match):
                run_predict(tmp_path / "bad", [f"ckpt_path={tmp_path}/none.ckpt", *inputs, bad])
    with caplog.at_level("WARNING", logger="changecam"):
        run_predict(
            tmp_path / "png",
            [
                f"ckpt_path={ckpt}",
                *pngs,
                "input.bands=[3,2,1]",
                "predict.block_size=512",
                "predict.batch_size='4'",  # text, as ${oc.env:...} gives it: read as a number
            ],
        )
    assert (
        "input.bands, predict.block_size, predict.batch_size apply to predict.py's GeoTIFF scenes only "
        "(.tif/.tiff/.vrt); these pairs ignore them" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="changecam"):
        run_predict(
            tmp_path / "plain",
            [f"ckpt_path={ckpt}", *pngs, "explain.method=gradcam", "explain.methods=[gradcam]"],
        )
    assert "GeoTIFF scenes only" not in caplog.text


def test_probability_encoding_round_trip(tmp_path):
    p = np.array([[0.0, 0.5, 1.0, 0.123456]], dtype=np.float32)
    write_png(tmp_path / "p.png", encode_probability(p))
    np.testing.assert_allclose(read_probability(tmp_path / "p.png"), p, atol=0.5 / 65535)
    write_png(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="not a 16-bit grayscale probability PNG"):
        read_probability(tmp_path / "m.png")


def test_predict_cli_single_pair(tmp_path, ckpt, levir256_tiny):
    shutil.copy(levir256_tiny / "A" / "test_2_0000_0000.png", tmp_path / "before.png")
    shutil.copy(levir256_tiny / "B" / "test_2_0000_0000.png", tmp_path / "after.png")
    run = tmp_path / "cli_run"
    proc = run_script(
        "predict.py",
        [
            f"ckpt_path={ckpt}",
            f"input.pre={tmp_path / 'before.png'}",
            f"input.post={tmp_path / 'after.png'}",
            *FAST,
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert "predict: 100%" in proc.stderr, "a progress bar over pairs"
    report = json.loads((run / "predictions.json").read_text())
    assert [p["name"] for p in report["pairs"]] == ["before"]
    for folder in ("masks", "probabilities", "panels"):
        assert (run / folder / "before.png").is_file()


def test_a_pair_larger_than_a_window_explains_the_mask_it_writes(tmp_path, ckpt):
    """explain.target=predicted: the change predict.py writes (the sliding window's mask),
    explained on the whole image, as eval.py's per-image post share; it explained the whole
    image's own prediction, which differs where the pair is larger than a window (helper-155:
    1,392 pixels of test_2, post share 0.561 against eval's 0.576)."""
    write_pair(tmp_path / "in", "wide", (64, 96))
    base = [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}", "sliding_window.window=16"]
    run_predict(tmp_path / "probe", [*base, "explain.enabled=false"])
    probability = read_probability(tmp_path / "probe/run/probabilities/wide.png")
    threshold = float(np.median(probability))  # about half the pixels change
    report = run_predict(tmp_path, [*base, f"threshold={threshold}", "explain.taps=[enc2]"])
    (row,) = report["pairs"]
    mask = read_image(tmp_path / "run/masks/wide.png")[..., 0] == 255
    net = load_network(ckpt)
    pre, post = (image_to_tensor(read_image(tmp_path / "in" / d / "wide.png"))[None] for d in "AB")
    with torch.no_grad():
        logits = net(pre, post)[0, 0].numpy()
    own = torch.sigmoid(torch.from_numpy(logits)).numpy() > threshold
    assert (own != mask).sum() >= 10, "the whole image's prediction differs from the mask"
    assert row["changed_pixels"] == mask.sum()
    expected, whole_images = float(logits[mask].sum()), float(logits[own].sum())
    assert abs(expected - whole_images) > 1e-3 * abs(expected)  # the two targets tell apart
    assert row["target_score"] == pytest.approx(expected, rel=1e-5)

"""explain.py and the one-pair pipeline, on real LEVIR-CD samples and a tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from changecam.cli.explain import explain
from changecam.data.io import read_image, read_label, write_png
from changecam.explain import TapError
from changecam.explain import render as render_module
from changecam.explain.runner import (
    ExplainSettings,
    FaithfulnessSettings,
    explain_pair,
    pad_to_multiple,
)
from changecam.models import SiameseUNet
from helpers import REPO, compose_train, run_script

FAST = ["explain.faithfulness.steps=2", "explain.dpi=30", "device=cpu"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A changecam-style checkpoint (state_dict with ``net.`` keys and ``net_config``)."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2, "diff", shared_encoder=True)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "net_config": net.config()}, path)
    return path


@pytest.fixture(scope="module")
def pair_dir(levir256_tiny, tmp_path_factory) -> Path:
    """Two LEVIR-CD pairs (of the 64 px fixture) in A/ B/ label/, cropped to 40×36 (divisible
    by 2**depth = 4) and to 38×30 (not divisible: padded to 40×32)."""
    root = tmp_path_factory.mktemp("pairs")
    names = sorted(p.name for p in (levir256_tiny / "A").iterdir())[:2]
    for i, name in enumerate(names):
        h, w = (40, 36) if i == 0 else (38, 30)
        write_png(
            root / "A" / name, read_image(levir256_tiny / "A" / name)[20 : 20 + h, 16 : 16 + w]
        )
        write_png(
            root / "B" / name, read_image(levir256_tiny / "B" / name)[20 : 20 + h, 16 : 16 + w]
        )
        write_png(
            root / "label" / name,
            read_label(levir256_tiny / "label" / name)[20 : 20 + h, 16 : 16 + w] * 255,
        )
    return root


def run_explain(tmp_path: Path, overrides: list[str]) -> dict:
    cfg = compose_train(tmp_path, overrides + FAST, config_name="explain")
    return explain(cfg)


def test_folder_mode_writes_panels_maps_and_json(tmp_path, tiny_ckpt, pair_dir):
    report = run_explain(
        tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={pair_dir}", "explain.target=all"]
    )
    run = tmp_path / "run"
    saved = json.loads((run / "explanations.json").read_text())
    assert saved["pairs"] == json.loads(json.dumps(report["pairs"]))
    assert len(saved["pairs"]) == 2 and saved["taps"][:4] == [
        "pre/input",
        "post/input",
        "pre/enc1",
        "post/enc1",
    ]
    for row in saved["pairs"]:
        h, w = row["size"]
        panel = read_image(run / row["files"]["panel"])
        assert panel.shape == (210, 405, 3) and panel.std() > 10
        maps = np.load(run / row["files"]["maps"])
        assert maps["hirescam/pre/enc1"].shape == (h, w)
        assert maps["hirescam/post/enc2"].shape == (-(-h // 2), -(-w // 2))
        assert maps["gradcam/bottleneck"].shape == (-(-h // 4), -(-w // 4))
        assert maps["logits"].shape == (h, w) and maps["target_mask"].sum() == h * w
        assert set(row["post_share"]) == set(row["post_share_gradcam"]) == {"input", "enc1", "enc2"}
        assert maps["hirescam/pre/input"].shape == (h, w)
        for layer, share in row["post_share"].items():  # shares are those of the saved maps
            p_pre = np.clip(maps[f"hirescam/pre/{layer}"], 0, None).sum()
            p_post = np.clip(maps[f"hirescam/post/{layer}"], 0, None).sum()
            assert share == pytest.approx(p_post / (p_pre + p_post), rel=1e-4)
        assert row["target_score"] == pytest.approx(float(maps["logits"].sum()), rel=1e-4)
        assert isinstance(row["faithfulness_gap"], float)
        assert row["faithfulness_gap"] == row["faithfulness"]["gap"]["both"]
        assert row["faithfulness"]["fractions"] == [0.0, 0.5, 1.0]
    assert saved["pairs"][0]["padded_to"] is None and saved["pairs"][1]["padded_to"] == [40, 32]
    assert saved["mean"]["pairs"] == 2 and saved["panel_layer"] == "enc2"


def test_explain_method_occlusion_draws_and_records_its_own_maps(tmp_path, tiny_ckpt, pair_dir):
    """``explain.method=occlusion``: maps at the input only, the curves and the report say so."""
    report = run_explain(
        tmp_path,
        [
            f"ckpt_path={tiny_ckpt}",
            f"input.dir={pair_dir}",
            "explain.target=all",
            "explain.methods=[hirescam,occlusion]",
            "explain.method=occlusion",
            "explain.occlusion.window=8",
            "explain.occlusion.stride=8",
        ],
    )
    assert report["faithfulness"]["method"] == "occlusion"
    assert report["faithfulness"]["layer"] == "input"
    assert "AUC_occlusion" in report["faithfulness"]["gap"]
    maps = np.load(tmp_path / "run" / report["pairs"][0]["files"]["maps"])
    h, w = report["pairs"][0]["size"]
    assert maps["occlusion/pre/input"].shape == (h, w) and maps["occlusion/post/input"].any()
    assert "occlusion/post/enc1" not in maps
    assert set(report["pairs"][0]["post_share_occlusion"]) == {"input"}
    assert report["panel_layer"] == "input"
    with pytest.raises(ValueError, match=r"explain.faithfulness.layer \(occlusion\)"):
        ExplainSettings(
            methods=["occlusion"],
            method="occlusion",
            faithfulness=FaithfulnessSettings(layer="enc1"),
        ).layers(SiameseUNet(3, 4, 2, "diff", shared_encoder=True))


@pytest.mark.slow  # a fresh interpreter: imports dominate
def test_single_pair_through_the_shim(tmp_path, tiny_ckpt, pair_dir):
    name = sorted(p.name for p in (pair_dir / "A").iterdir())[1]
    out = tmp_path / "out"
    args = [
        f"ckpt_path={tiny_ckpt}",
        f"input.pre={pair_dir / 'A' / name}",
        f"input.post={pair_dir / 'B' / name}",
        "explain.taps=[enc2,head_in]",
        "explain.methods=[hirescam]",
        f"hydra.run.dir={out}",
        *FAST,
    ]
    proc = run_script("explain.py", args, cwd=REPO, timeout=120)
    assert "explained 1 pair(s)" in proc.stdout and "explain: 100%" in proc.stderr  # progress bar
    report = json.loads((out / "explanations.json").read_text())
    assert report["taps"] == ["pre/enc2", "post/enc2", "head_in"]
    maps = np.load(out / "maps" / f"{Path(name).stem}.npz")
    assert sorted(k for k in maps if "/" in k) == [
        "hirescam/head_in",
        "hirescam/post/enc2",
        "hirescam/pre/enc2",
    ]
    assert (out / "panels" / f"{Path(name).stem}.png").is_file()


def test_bad_inputs_are_refused_before_writing(tmp_path, tiny_ckpt, pair_dir):
    """Settings that do not fit are refused before any file; a pair whose dates differ in size
    fails alone."""
    from changecam.cli.explain import PairFailure

    bad = tmp_path / "bad"
    shutil.copytree(pair_dir, bad)
    name = sorted(p.name for p in (bad / "B").iterdir())[1]
    write_png(bad / "B" / name, np.zeros((38, 31, 3), np.uint8))
    with pytest.raises(PairFailure, match=f"is 38x30 but .*B/{name} is 38x31"):
        run_explain(tmp_path / "sizes", [f"ckpt_path={tiny_ckpt}", f"input.dir={bad}"])
    saved = json.loads((tmp_path / "sizes" / "run" / "explanations.json").read_text())
    assert len(saved["pairs"]) == 1 and [f["name"] for f in saved["failed"]] == [Path(name).stem]
    with pytest.raises(
        TapError, match="unknown tap name.*available: \\['pre/input', 'post/input', 'pre/enc1'"
    ):
        run_explain(
            tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={pair_dir}", "explain.taps=[enc7]"]
        )
    with pytest.raises(ValueError, match="explain.panel_layer='enc1' is not an explained"):
        run_explain(
            tmp_path,
            [
                f"ckpt_path={tiny_ckpt}",
                f"input.dir={pair_dir}",
                "explain.taps=[enc2]",
                "explain.panel_layer=enc1",
            ],
        )
    name_a = sorted(p.name for p in (pair_dir / "A").iterdir())[0]
    with pytest.raises(ValueError, match="explain.target=ground_truth but pair .* has no label"):
        run_explain(
            tmp_path,
            [
                f"ckpt_path={tiny_ckpt}",
                f"input.pre={pair_dir / 'A' / name_a}",
                f"input.post={pair_dir / 'B' / name_a}",
                "explain.target=ground_truth",
            ],
        )
    with pytest.raises(ValueError, match=r"is 40x36 = 1440 pixels, above explain.max_pixels=1000"):
        run_explain(
            tmp_path,
            [f"ckpt_path={tiny_ckpt}", f"input.dir={pair_dir}", "explain.max_pixels=1000"],
        )
    assert not (tmp_path / "run" / "explanations.json").exists()
    from changecam.geo import SceneError

    with pytest.raises(SceneError, match="input.scale='pct' is not allowed"):
        run_explain(
            tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={pair_dir}", "input.scale=pct"]
        )


def test_an_unreadable_pair_fails_alone_and_a_rerun_keeps_no_earlier_file(
    tmp_path, tiny_ckpt, pair_dir
):
    """A label holding 0, 1 and 2 fails its pair only: the other is explained and listed, the
    command fails naming it. A rerun into the same folder with one pair leaves no file of the
    first run's other pair (nor its explanations.json) looking like its own."""
    from changecam.cli.explain import PairFailure

    bad = tmp_path / "bad"
    shutil.copytree(pair_dir, bad)
    first, second = sorted(p.name for p in (bad / "label").iterdir())
    label = read_label(pair_dir / "label" / first)
    write_png(bad / "label" / first, np.minimum(label.astype(np.uint8) * 2 + (label == 0), 2))
    with pytest.raises(PairFailure, match=rf"1 of 2 pair\(s\) failed.*\({Path(first).stem}\)"):
        run_explain(tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={bad}"])
    run = tmp_path / "run"
    saved = json.loads((run / "explanations.json").read_text())
    assert [r["name"] for r in saved["pairs"]] == [Path(second).stem]
    assert [f["name"] for f in saved["failed"]] == [Path(first).stem]
    assert sorted(p.name for p in (run / "panels").iterdir()) == [second]
    (bad / "B" / first).write_bytes(b"")  # unreadable at its header: fails alone as well
    with pytest.raises(PairFailure, match=rf"\({Path(first).stem}\)"):
        run_explain(tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={bad}"])
    saved = json.loads((run / "explanations.json").read_text())
    assert [r["name"] for r in saved["pairs"]] == [Path(second).stem]

    # what a killed run leaves: a panel and maps that no explanations.json lists
    write_png(run / "panels" / "killed.png", np.zeros((4, 4, 3), np.uint8))
    (run / "maps" / "killed.npz").write_bytes(b"maps")
    run_explain(
        tmp_path,
        [
            f"ckpt_path={tiny_ckpt}",
            f"input.pre={pair_dir / 'A' / first}",
            f"input.post={pair_dir / 'B' / first}",
        ],
    )
    assert sorted(p.name for p in (run / "panels").iterdir()) == [first]
    assert sorted(p.name for p in (run / "maps").iterdir()) == [f"{Path(first).stem}.npz"]


def test_a_pair_whose_maps_cannot_be_written_keeps_no_panel(tmp_path, tiny_ckpt, pair_dir):
    from changecam.cli.explain import PairFailure

    first, second = sorted(p.stem for p in (pair_dir / "A").iterdir())
    (tmp_path / "run" / "maps" / f"{first}.npz").mkdir(parents=True)  # in the way of its maps
    with pytest.raises(PairFailure, match=rf"1 of 2 pair\(s\) failed.*\({first}\)"):
        run_explain(tmp_path, [f"ckpt_path={tiny_ckpt}", f"input.dir={pair_dir}"])
    assert sorted(p.stem for p in (tmp_path / "run" / "panels").iterdir()) == [second]


@pytest.mark.parametrize(
    ("target", "said"),
    [("ground_truth", "no change in the label"), ("predicted", "no change predicted")],
)
def test_an_empty_targets_notice_says_which_target_is_empty(monkeypatch, target, said):
    """With target=ground_truth, an unchanged label's panel said "no change predicted" over a
    prediction showing change (helper-187)."""
    torch.manual_seed(1)
    net = SiameseUNet(3, 4, 2).eval()
    with torch.no_grad():
        net.final_conv.bias.fill_(-50.0 if target == "predicted" else 50.0)
    rng = np.random.default_rng(0)
    pre, post = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    notices = []
    monkeypatch.setattr(
        render_module._Canvas, "notice", lambda self, keys, text: notices.append(text)
    )
    settings = ExplainSettings(
        target=target, dpi=20, faithfulness=FaithfulnessSettings(enabled=False)
    )
    explain_pair(net, pre, post, label=np.zeros((16, 16), np.uint8), settings=settings)
    assert notices == [f"{said}\n(empty target)"]


def test_pipeline_padding_keeps_the_target_inside_the_image():
    torch.manual_seed(1)
    net = SiameseUNet(3, 4, 3).eval()  # sides must be multiples of 8
    rng = np.random.default_rng(0)
    pre, post = rng.integers(0, 255, (2, 21, 13, 3), dtype=np.uint8)
    roi = np.zeros((21, 13), np.uint8)
    roi[15:, 5:] = 1  # touches the bottom/right border, next to the padding
    settings = ExplainSettings(
        target="roi", dpi=20, faithfulness=FaithfulnessSettings(steps=2, dates=("post",))
    )
    result = explain_pair(net, pre, post, roi=roi, settings=settings)
    assert list(result.faithfulness.curves["deletion"]) == ["both", "post"]
    exp = result.explanation
    assert exp.input_size == (21, 13) and result.padded_size == (24, 16)
    assert exp.mask[0, 0].numpy().astype(np.uint8).tolist() == roi.tolist()
    assert exp.map("pre/enc3").shape == (1, 6, 4)  # ceil(21 / 4) x ceil(13 / 4) cells
    torch.testing.assert_close(exp.score, (exp.logits * exp.mask).sum((1, 2, 3)))
    x = torch.arange(2 * 5 * 3.0).reshape(1, 2, 5, 3)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 8, 4) and torch.equal(padded[..., :5, :3], x)
    assert torch.equal(padded[..., 5, :3], x[..., 3, :])  # reflection
    with pytest.raises(ValueError, match="pre is \\(21, 13\\) but post is \\(21, 12\\)"):
        explain_pair(net, pre, post[:, :12].copy())


def test_a_pair_whose_logits_are_not_finite_is_refused():
    """Finite inputs, logits that overflow (a NaN bias here): refused, not drawn as no change."""
    torch.manual_seed(1)
    net = SiameseUNet(3, 4, 2).eval()
    with torch.no_grad():
        net.final_conv.bias.fill_(float("nan"))
    rng = np.random.default_rng(0)
    pre, post = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    settings = ExplainSettings(dpi=20, faithfulness=FaithfulnessSettings(enabled=False))
    with pytest.raises(ValueError, match=r"pair 'x': 256 of the network's 256 change logits"):
        explain_pair(net, pre, post, name="x", settings=settings)

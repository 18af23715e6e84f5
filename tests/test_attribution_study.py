"""The attribution study's metrics on tiny known-answer models and inputs (exact outcomes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from changecam.evaluation.attribution import (
    agreement,
    attributed_post,
    bootstrap,
    causal_margin,
    causal_post,
    changed_objects,
    pointing,
    spearman,
    swap_regions,
)
from changecam.evaluation.randomisation import cascade_order, cascade_points, randomised
from changecam.evaluation.study import StudyImage, StudySettings, study_model
from changecam.models import Tap

SIZE = 32


class OneDate(nn.Module):
    """A change detector that looks at one date only: ``logit = head(enc(x_date)) − 1`` with
    positive 1×1 weights, so every input-side map of that date is positive on positive images."""

    def __init__(self, date: str = "post", seed: int = 0) -> None:
        super().__init__()
        self.date = date
        torch.manual_seed(seed)
        self.enc = nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.enc.weight.uniform_(0.2, 1.0)
            self.enc.bias.zero_()
            self.head.weight.uniform_(0.2, 1.0)
            self.head.bias.fill_(-1.0)
        self.tap_pre, self.tap_post = Tap("pre/enc1"), Tap("post/enc1")

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        a, b = self.tap_pre(self.enc(pre)), self.tap_post(self.enc(post))
        return self.head(b if self.date == "post" else a)


def known_answer_images(n: int = 3, grey: bool = False) -> list[StudyImage]:
    """Each image: one building that appeared (bright in post only) and one that vanished
    (bright in pre only), on a mid-grey textured ground."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        ground = rng.uniform(60, 120, (SIZE, SIZE, 1 if grey else 3)).repeat(3 if grey else 1, 2)
        pre, post = ground.copy(), ground.copy()
        label = np.zeros((SIZE, SIZE), np.uint8)
        types = np.zeros((SIZE, SIZE), np.uint8)
        post[4:10, 4:10] = 230  # appeared
        label[4:10, 4:10], types[4:10, 4:10] = 1, 1
        pre[20:27, 18:26] = 220  # vanished
        label[20:27, 18:26], types[20:27, 18:26] = 1, 2
        images.append(
            StudyImage(f"img{i}", pre.astype(np.uint8), post.astype(np.uint8), label, types)
        )
    return images


FAST = dict(
    context=None,
    faithfulness_steps=2,
    randomisation_images=0,
    bootstrap=50,
    ig={"steps": 4},
    layer_ig={"steps": 2},
)


def value(result: dict, method: str, layer: str, metric: str) -> float:
    return result["results"][method][layer][metric]["mean"]


def test_changed_objects_are_components_with_their_kind_and_dilated_region():
    label = np.zeros((12, 12), np.uint8)
    types = np.zeros_like(label)
    label[1:3, 1:3], types[1:3, 1:3] = 1, 1
    label[7:10, 6:9], types[7:10, 6:9] = 1, 2
    objects = changed_objects(label * 255, types, dilation=1)
    assert [o.kind for o in objects] == ["appeared", "vanished"]
    assert [o.known_date for o in objects] == ["post", "pre"]
    assert objects[0].mask.sum() == 4 and objects[0].region.sum() == 16  # 2x2 -> 4x4
    assert objects[1].region.sum() == 25
    assert [o.kind for o in changed_objects(label)] == ["unknown", "unknown"]
    with pytest.raises(ValueError, match="dilation"):
        changed_objects(label, dilation=-1)


def test_date_decisions_pointing_and_swaps_are_exact():
    pre = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    post = torch.tensor([[[1.0, -5.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 3.0]]])
    region = torch.tensor([[[True, True], [False, False]]] * 2)
    # positive mass in the region: pre 2 vs post 1 -> pre; tie 1 vs 1 -> half
    torch.testing.assert_close(attributed_post(pre, post, region), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(
        causal_post(torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 3.0])), torch.tensor([1.0, 0.5])
    )
    torch.testing.assert_close(pointing(pre, post, region), torch.tensor([1.0, 2 / 5]))
    # | |ΔS_pre| - |ΔS_post| | / max: 2/3; an exact tie 0; neither swap moves S 0; one only 1
    torch.testing.assert_close(
        causal_margin(torch.tensor([1.0, -2.0, 0.0, 4.0]), torch.tensor([-3.0, 2.0, 0.0, 0.0])),
        torch.tensor([2 / 3, 0.0, 0.0, 1.0]),
    )
    a = torch.zeros(1, 1, 2, 2)
    b = torch.ones(1, 1, 2, 2)
    new_pre, new_post = swap_regions(a, b, region[:1], "pre")
    assert new_pre.flatten().tolist() == [1, 1, 0, 0] and torch.equal(new_post, b)


def test_spearman_and_bootstrap_known_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    y = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    rho = spearman(x, y)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0) and rho[2].isnan()
    # ties get their mean rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> 0.9487
    assert spearman(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), x[:1])[0] == pytest.approx(
        3 / np.sqrt(10), abs=1e-6
    )
    est = bootstrap([[1.0, 1.0], [0.0]], resamples=200)
    assert est.mean == pytest.approx(2 / 3) and est.n == 3
    assert 0.0 <= est.low <= est.mean <= est.high <= 1.0
    one = bootstrap([[1.0, 0.0]])
    assert one.low == one.high == 0.5
    assert bootstrap([[]]).mean is None
    # weighted: (3·1 + 1·0) / 4; the image whose weights sum to 0 counts as empty
    weighted = bootstrap([[1.0, 0.0], [1.0]], resamples=200, weights=[[3.0, 1.0], [0.0]])
    assert weighted.mean == pytest.approx(0.75) and weighted.n == 2
    assert weighted.low == weighted.high == pytest.approx(0.75)


@pytest.mark.parametrize("date", ["post", "pre"])
def test_a_one_date_model_gets_the_known_answer_right_for_one_kind_only(date):
    """A post-only model: date accuracy 1.0 on appeared and 0.0 on vanished objects, causal
    date always post; the pre-only model mirrors it."""
    result = study_model(
        OneDate(date), known_answer_images(), StudySettings(**FAST), name=f"{date}-only"
    )
    right, wrong = ("appeared", "vanished") if date == "post" else ("vanished", "appeared")
    assert result["objects"] == {"appeared": 3, "vanished": 3}
    assert result["causal"]["causal_post"]["mean"] == (1.0 if date == "post" else 0.0)
    assert result["causal"][f"model_date_accuracy_{right}"]["mean"] == 1.0
    assert result["causal"][f"model_date_accuracy_{wrong}"]["mean"] == 0.0
    for method in ("hirescam", "gradcam"):
        for layer in ("input", "enc1"):
            assert value(result, method, layer, f"date_accuracy_{right}") == 1.0
            assert value(result, method, layer, f"date_accuracy_{wrong}") == 0.0
            assert value(result, method, layer, "date_accuracy") == 0.5
            assert value(result, method, layer, "causal_agreement") == 1.0
            assert value(result, method, layer, "causal_agreement_weighted") == 1.0
    # the contrastive map of the used date is negative where that date lost a building: no
    # positive mass in either date there, a tie (half right)
    assert value(result, "contrastive", "input", f"date_accuracy_{wrong}") == 0.5
    # date-swap occlusion: the used date's swap removes an appeared building (positive) and
    # brings back a vanished one (negative); the unused date's swap changes nothing
    assert value(result, "occlusion", "input", f"date_accuracy_{right}") == 1.0
    assert value(result, "occlusion", "input", f"date_accuracy_{wrong}") == 0.5
    assert value(result, "occlusion", "input", "causal_agreement") == 0.75
    # the unused date's swap changes nothing: every causal date is decisive (margin 1), so the
    # margin-weighted agreement is the plain one
    assert result["causal"]["causal_margin"]["mean"] == 1.0
    assert result["causal"]["causal_near_tie"]["mean"] == 0.0
    assert result["causal"]["causal_margin_median"] == 1.0
    # the used date's swap brings back the building that date lacks: it raises S
    # (helper-131), and positive mass cannot name that date
    assert result["causal"]["causal_raises"]["mean"] == 0.5
    assert result["causal"][f"causal_raises_{wrong}"]["mean"] == 1.0
    assert result["causal"][f"causal_raises_{right}"]["mean"] == 0.0
    assert value(result, "occlusion", "input", "causal_agreement_weighted") == 0.75
    assert result["baselines"] == {"random": 0.5, "post_always": 0.5}
    assert 0.2 < value(result, "random", "input", "date_accuracy") < 0.8


def test_gradient_times_input_fails_the_randomisation_check_on_a_linear_model():
    """On grey images every map of a linear model is a multiple of the image, whatever the
    weights: after re-initialising every layer |Spearman| stays 1 (gradient × input shows the
    input, Adebayo et al. 2018); a random map passes. Seed 1's re-initialised weights flip the
    maps' sign (Spearman −1): the check averages |Spearman|, as a flipped ranking is still the
    trained one's structure, so signs of different objects cannot cancel."""
    images = known_answer_images(1, grey=True)
    settings = StudySettings(
        **{**FAST, "randomisation_images": 1, "randomisation_points": 2, "seed": 1},
        methods=("hirescam", "random"),
    )
    result = study_model(OneDate("post"), images, settings)
    check = result["results"]["hirescam"]["input"]["randomisation"]
    assert check["layers_randomised"] == [1, 2] and check["of"] == 2
    assert check["spearman"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert check["passes"] is False
    assert result["results"]["random"]["input"]["randomisation"]["passes"] is True


def test_cascade_goes_from_the_head_down_and_keeps_earlier_steps():
    net = OneDate("post")
    x = torch.rand(1, 3, 4, 4)
    order = cascade_order(net, x, x)
    assert order == ["head", "enc"]
    one, two = randomised(net, order, 1, seed=3), randomised(net, order, 2, seed=3)
    assert torch.equal(one.enc.weight, net.enc.weight)
    assert not torch.equal(one.head.weight, net.head.weight)
    assert torch.equal(one.head.weight, two.head.weight)
    assert cascade_points(10, 4) == [1, 4, 7, 10] and cascade_points(2, 5) == [1, 2]


def test_randomising_leaves_the_callers_random_stream_alone():
    net = OneDate("post")
    order = cascade_order(net, torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    randomised(net, order, 2, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_tracing_the_cascade_leaves_a_training_model_as_found():
    net = OneDate("post")  # with a BatchNorm in training mode after its encoder
    net.enc = nn.Sequential(net.enc, nn.BatchNorm2d(2))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert cascade_order(net, torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)) == ["head", "enc.0"]
    assert net.training and net.enc[1].training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_study_settings_refuse_unknown_values():
    with pytest.raises(ValueError, match="unknown method"):
        StudySettings(methods=("hirescam", "shap"))
    with pytest.raises(ValueError, match="faithfulness_layers"):
        StudySettings(faithfulness_layers="some")


def test_the_faithfulness_gap_is_pooled_over_objects(monkeypatch):
    """Each object's gap is ``(AUC_random − AUC_map) / |S(0)|``; the study's estimate weighs it
    by ``|S(0)|``, i.e. ``Σ(AUC_random − AUC_map) / Σ|S(0)|``, so an object whose score is
    near 0 cannot dominate it (a plain mean of ratios would let it)."""
    import changecam.evaluation.study as study

    seen: list[tuple[float, float]] = []
    real = study.faithfulness

    def recording(*args, **kwargs):
        faith = real(*args, **kwargs)
        diff = faith.auc("deletion", "both", "random") - faith.auc("deletion", "both", "cam")
        seen.extend(zip(faith.score0.tolist(), diff.tolist(), strict=True))
        return faith

    monkeypatch.setattr(study, "faithfulness", recording)
    settings = StudySettings(**FAST, methods=("hirescam",))
    result = study_model(OneDate("post"), known_answer_images(), settings)
    s0 = np.array([s for s, _ in seen])
    diff = np.array([d for _, d in seen])
    assert len(seen) == 6 and np.ptp(np.abs(s0)) > 1  # objects of very different |S(0)|
    pooled = diff.sum() / np.abs(s0).sum()
    assert value(result, "hirescam", "enc1", "faithfulness_gap") == pytest.approx(pooled)
    assert pooled != pytest.approx(np.mean(diff / np.abs(s0)))
    # the plotted curves are pooled the same way: the area between them is the gap
    curves = {o: np.array(result["curves"][f"hirescam/enc1/{o}"]) for o in ("cam", "random")}
    k = np.linspace(0, 1, len(curves["cam"]))
    assert np.trapezoid(curves["random"] - curves["cam"], k) == pytest.approx(pooled, abs=1e-5)


def test_an_undecided_map_is_half_right_against_an_undecided_causal_date():
    """1 or 0 where both decide; 0.5 where either is a tie, also both (helper-70: a map that
    is exactly 0 where the dates agree got a full point for a model that uses neither)."""
    maps = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 1.0])
    causal = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    torch.testing.assert_close(
        agreement(maps, causal), torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    )


def test_a_padded_windows_post_share_is_over_the_window_only(monkeypatch):
    """A window that is no multiple of the network's size multiple (context 18 for a depth-2
    U-Net: padded to 20) counted the padding's evidence in the post share (helper-87)."""
    import changecam.evaluation.study as study_module
    from changecam.models import SiameseUNet

    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).eval()
    windows: list[float] = []
    padded: list[float] = []  # with the padding's evidence: must differ, or nothing is shown
    score_pass = study_module._score_pass

    def spy(model, batch, settings, records, model_records):
        exp, (h, w) = batch.explanation, batch.size
        assert tuple(exp.input_size) == (20, 20) and (h, w) == (18, 18)
        # by hand from the uncropped maps: enc2's cells that cover the 18 px window (9 of 10)
        pre, post = (exp.raw["hirescam"][f"{d}/enc2"].clamp(min=0) for d in ("pre", "post"))
        rows, cols = (
            -(-n * size // full)
            for n, size, full in zip((h, w), pre.shape[-2:], (20, 20), strict=True)
        )
        assert (rows, cols) == (9, 9)
        inside = [m[..., :rows, :cols].flatten(1).sum(1).double() for m in (pre, post)]
        everywhere = [m.flatten(1).sum(1).double() for m in (pre, post)]
        windows.extend((inside[1] / (inside[0] + inside[1])).tolist())
        padded.extend((everywhere[1] / (everywhere[0] + everywhere[1])).tolist())
        return score_pass(model, batch, settings, records, model_records)

    monkeypatch.setattr(study_module, "_score_pass", spy)
    settings = StudySettings(**{**FAST, "context": 18}, methods=("hirescam",), layers=("enc2",))
    result = study_model(net, known_answer_images(2), settings)
    defined = [v for v in windows if not math.isnan(v)]
    assert defined and result["results"]["hirescam"]["enc2"]["post_share"]["mean"] == (
        pytest.approx(float(np.mean(defined)), abs=1e-6)
    )
    with_padding = [v for v in padded if not math.isnan(v)]
    assert float(np.mean(with_padding)) != pytest.approx(float(np.mean(defined)), abs=1e-4)


def test_max_objects_counts_objects_past_images_without_change():
    """An image without a changed object spends none of the budget and does not end the study
    (helper-70: it stopped at the first such image)."""
    images = known_answer_images(3)
    empty = images[1]
    images[1] = StudyImage("empty", empty.pre, empty.pre, empty.label * 0, empty.change_type * 0)
    settings = StudySettings(**dict(FAST, methods=("hirescam",), max_objects=100))
    result = study_model(OneDate("post"), images, settings)
    assert result["objects"] == {"appeared": 2, "vanished": 2}
    capped = study_model(
        OneDate("post"), images, StudySettings(**dict(FAST, methods=("hirescam",), max_objects=3))
    )
    assert sum(capped["objects"].values()) == 3


def test_study_layers_without_input_are_refused_for_input_only_methods():
    with pytest.raises(ValueError, match=r"have maps at the input only.*add input"):
        StudySettings(methods=("hirescam", "integrated_gradients"), layers=("enc1",))
    StudySettings(methods=("hirescam", "integrated_gradients"), layers=("input", "enc1"))
    StudySettings(methods=("hirescam",), layers=("enc1",))
    with pytest.raises(ValueError, match=r"study.layers=\[\] names no layer"):
        StudySettings(layers=())


def test_the_cascade_reinitialises_all_of_multihead_attention():
    """Its _reset_parameters leaves out_proj's weight as trained (helper-70)."""

    class Attending(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 1)

        def forward(self, pre, post):
            tokens = (post - pre).flatten(2).transpose(1, 2)[..., :4]
            return self.head(self.attention(tokens, tokens, tokens)[0])

    net = Attending()
    x = torch.rand(1, 4, 2, 2)
    order = cascade_order(net, x, x)
    assert order == ["head", "attention"]
    fresh = randomised(net, order, 2, seed=5)
    for name, weight in net.attention.named_parameters():
        changed = not torch.equal(dict(fresh.attention.named_parameters())[name], weight)
        assert changed or name.endswith("bias"), name


def test_the_curves_plot_draws_each_methods_own_random_order(tmp_path, monkeypatch):
    """Only the first method's random curve was drawn, so the others' areas to it were not
    their gaps (helper-87)."""
    import changecam.evaluation.study_report as report

    drawn = {}
    monkeypatch.setattr(report, "_save", lambda figure, path: drawn.setdefault("figure", figure))
    curves = {
        "hirescam/enc2/map": [1.0, 0.4, 0.1],
        "hirescam/enc2/random": [1.0, 0.8, 0.6],
        "gradcam/enc2/map": [1.0, 0.5, 0.2],
        "gradcam/enc2/random": [1.0, 0.7, 0.5],
    }
    report.plot_curves({"architectures": {"unet": {"curves": curves}}}, tmp_path / "c.png")
    lines = drawn["figure"].axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == list(curves.values())
    colours = [line.get_color() for line in lines]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]


def test_a_study_without_a_changed_object_says_so_in_its_answer():
    """A split with no change gave the answer line "- **m**: ." (helper-87)."""
    from changecam.evaluation.study_report import answer

    images = known_answer_images(1)
    images = [StudyImage("still", images[0].pre, images[0].pre, images[0].label * 0, None)]
    result = study_model(OneDate("post"), images, StudySettings(**FAST, methods=("hirescam",)))
    assert answer("m", result) == (
        "no changed object was scored (0 objects in 1 images): nothing to say about this model; "
        "study a split with change, or more images"
    )


@pytest.mark.parametrize(
    ("context", "said"), [(96, "in a 96² window."), (None, "in the whole image.")]
)
def test_the_report_names_the_objects_window_or_the_whole_image(context, said):
    """``study.context=null`` explains each object in the whole image: the report says so
    (helper-110: it said "in a None² window")."""
    from changecam.evaluation.study_report import report_markdown

    record = {
        "data": {"split": "test", "root": "data/synthetic", "images": 3},
        "settings": {"dilation": 3, "context": context},
        "architectures": {},
    }
    report = report_markdown(record, {})
    assert said in report and "None" not in report


def test_the_report_from_study_json_keeps_the_layers_forward_order(tmp_path):
    """study.json sorts its keys (input after enc1), and the report read from it took the
    wrong layer at a tie and "input" as the deepest; its CSV metrics named no layer; the seed
    its intervals depend on was not recorded (helper-188)."""
    import json

    from changecam.atomic import write_json
    from changecam.evaluation.study_report import forward_layers, headline_rows, log_study

    result = study_model(
        OneDate("post"), known_answer_images(), StudySettings(**FAST, methods=("hirescam",))
    )
    assert value(result, "hirescam", "input", "causal_agreement") == 1.0
    assert value(result, "hirescam", "enc1", "causal_agreement") == 1.0  # a tie: the deepest
    write_json(tmp_path / "study.json", {"architectures": {"m": result}, "order": ["m"]})
    reloaded = json.loads((tmp_path / "study.json").read_text())
    assert list(reloaded["architectures"]["m"]["results"]["hirescam"]) == ["enc1", "input"]
    assert forward_layers(reloaded["architectures"]["m"], "hirescam") == ["input", "enc1"]
    rows = {r["method"]: r["layer"] for r in headline_rows(reloaded)}
    assert rows["hirescam"] == "enc1"

    class Logged:
        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics):
            self.metrics.update(metrics)

        def save(self):
            pass

    logger = Logged()
    log_study([logger], reloaded, {})
    assert "study/m/hirescam/enc1/causal_agreement" in logger.metrics

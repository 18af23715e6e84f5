"""The 2×4 panel: a real picture with one colour scale for both dates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from changecam.data.io import read_image
from changecam.explain import explain_batch, faithfulness, render_panel, save_panel
from changecam.explain import render as render_module
from changecam.explain.render import overlay, to_rgb
from changecam.models import SiameseUNet


@pytest.fixture(scope="module")
def explained():
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).eval()
    pre, post = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    roi = torch.zeros(2, 1, 32, 32)
    roi[0, :, 8:20, 8:20] = 1  # sample 1: empty target
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    return net, pre, post, exp


def test_panel_is_a_real_picture(explained, tmp_path):
    net, pre, post, exp = explained
    faith = faithfulness(net, pre, post, exp, steps=2, random_repeats=1, insertion=False)
    label = np.zeros((32, 32), np.uint8)
    label[8:20, 8:20] = 1
    panel = render_panel(
        pre[0], post[0], exp, label=label, faithfulness=faith, title="pair", dpi=40
    )
    assert panel.dtype == np.uint8 and panel.shape == (280, 540, 3)  # 13.5 × 7 inches at 40 dpi
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 500  # images, maps, text — not blank
    save_panel(panel, tmp_path / "p" / "pair.png")
    assert np.array_equal(read_image(tmp_path / "p" / "pair.png"), panel)
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["pair.png"]  # no temporary file left


def test_both_dates_share_one_colour_scale_and_their_sum_has_its_own(explained, monkeypatch):
    """The pre and post overlays use max(|pre|, |post|) of the shown layer, so a colour means
    the same evidence in both; the combined map is scaled by its own maximum."""
    _, pre, post, exp = explained
    scales = []
    real_overlay = render_module.overlay
    monkeypatch.setattr(
        render_module,
        "overlay",
        lambda image, cam, vmax, **kw: scales.append(vmax) or real_overlay(image, cam, vmax, **kw),
    )
    render_panel(pre[0], post[0], exp, dpi=30)
    maps = [exp.map(f"{d}/enc2", "hirescam", upsampled=True)[0].numpy() for d in ("pre", "post")]
    assert np.abs(maps[0]).max() != pytest.approx(np.abs(maps[1]).max(), rel=1e-3)
    shared = max(np.abs(m).max() for m in maps)
    assert scales == [
        pytest.approx(shared),
        pytest.approx(shared),
        pytest.approx(np.abs(maps[0] + maps[1]).max()),
    ]


def test_the_prediction_drawn_is_the_probability_given(explained):
    """predict.py draws the mask it writes and explains (its sliding window's), not the whole
    image's own prediction, which can differ (helper-156)."""
    _, pre, post, exp = explained
    own = render_panel(pre[0], post[0], exp, dpi=30)
    probability = torch.sigmoid(exp.logits[0, 0]).numpy()
    assert np.array_equal(render_panel(pre[0], post[0], exp, dpi=30, probability=probability), own)
    flipped = render_panel(pre[0], post[0], exp, dpi=30, probability=1 - probability)
    assert not np.array_equal(flipped, own)
    with pytest.raises(ValueError, match=r"probability \(16, 32\) does not match"):
        render_panel(pre[0], post[0], exp, dpi=30, probability=probability[:16])


def test_empty_target_and_uint8_inputs_render(explained):
    _, pre, post, exp = explained
    panel = render_panel(to_rgb(pre[1]), to_rgb(post[1]), exp, index=1, method="gradcam", dpi=30)
    assert panel.shape == (210, 405, 3)
    with pytest.raises(ValueError, match="available: \\['input', 'enc1', 'enc2'\\]"):
        render_panel(pre[0], post[0], exp, layer="bottleneck")
    with pytest.raises(ValueError, match="do not match the explanation"):
        render_panel(pre[0, :, :16], post[0, :, :16], exp)


def test_overlay_uses_the_given_scale():
    image = np.full((2, 2, 3), 128, np.uint8)
    cam = np.array([[0.0, 1.0], [-1.0, 2.0]])
    out = overlay(image, cam, vmax=2.0)
    gray = 0.25 + 0.5 * 128 / 255
    np.testing.assert_allclose(out[0, 0], [gray] * 3)  # zero evidence: the image shows through
    assert out[1, 1, 0] > out[1, 1, 2] and out[1, 0, 2] > out[1, 0, 0]  # red = for, blue = against
    # the same value on the same scale gives the same colour; a larger scale makes it fainter
    np.testing.assert_allclose(overlay(image, cam, 2.0)[0, 1], out[0, 1])
    assert abs(overlay(image, cam, 4.0)[0, 1] - gray).sum() < abs(out[0, 1] - gray).sum()


def test_a_reused_figure_keeps_nothing_of_the_previous_sample(explained):
    """Panels of one layout share a figure; each must look as if drawn on a fresh one."""
    _, pre, post, exp = explained
    label = np.zeros((32, 32), np.uint8)
    label[4:9, 4:30] = 1

    def draw(i: int) -> np.ndarray:
        return render_panel(pre[i], post[i], exp, index=i, label=label, title=f"p{i}", dpi=30)

    render_module._panel_layout.cache_clear()
    fresh = [draw(0)]
    render_module._panel_layout.cache_clear()
    fresh.append(draw(1))  # sample 1 has an empty target: the notice is shown
    reused = [draw(0), draw(1), draw(0)]
    assert not np.array_equal(fresh[0], fresh[1])
    for got, want in zip(reused, [fresh[0], fresh[1], fresh[0]], strict=True):
        np.testing.assert_array_equal(got, want)


def test_images_and_bars_land_where_the_layout_puts_them(explained):
    """Each sample's pictures fill their axes and the bars stand as high as the shares."""
    _, _, _, exp = explained
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[..., 2] = 255
    label = np.zeros((32, 32), np.uint8)  # no change: a black box on the white background
    panel = render_panel(red, blue, exp, label=label, dpi=40)
    layout = render_module._panel_layout(
        (32, 32), ("input", "enc1", "enc2"), "enc2", "hirescam", True, False, 40
    )
    for key, colour in (("pre", (255, 0, 0)), ("post", (0, 0, 255)), ("truth", (0, 0, 0))):
        y0, y1, x0, x1 = layout.boxes[key]
        inside = panel[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3)
        assert (inside == colour).all(axis=1).mean() > 0.99, key
        assert not np.array_equal(layout.background[(y0 + y1) // 2, (x0 + x1) // 2], colour)
    zero, one, _ = layout.bar_rows
    shares = [float(v[0]) for v in exp.post_shares("hirescam").values()]
    for (x0, x1), share in zip(layout.bars, shares, strict=True):
        column = panel[one - 2 : zero + 2, (x0 + x1) // 2]
        height = int((column == render_module.BAR_COLOUR).all(axis=1).sum())
        assert abs(height - share * (zero - one)) <= 1.5


def test_colour_scale_numbers_read_like_matplotlibs():
    ticks, labels = render_module._ticks, render_module._tick_labels
    assert labels(ticks(2.5, 9)) == (["−2", "−1", "0", "1", "2"], "")
    assert labels(ticks(1.0, 4)) == (["−1.0", "−0.5", "0.0", "0.5", "1.0"], "")
    assert labels(ticks(0.37, 9)) == (["−0.3", "−0.2", "−0.1", "0.0", "0.1", "0.2", "0.3"], "")
    # tiny logit contributions: the numbers with a power of ten to read them by
    assert labels(ticks(8.3e-9, 9)) == (["−8", "−6", "−4", "−2", "0", "2", "4", "6", "8"], "1e−9")
    assert labels(ticks(3e6, 4)) == (["−2", "0", "2"], "1e6")
    assert all(abs(v) <= 0.37 for v in ticks(0.37, 9))


@pytest.mark.parametrize("dpi", [30, 72, 100])
@pytest.mark.parametrize("size", [(32, 32), (256, 448), (512, 1024), (1024, 256)])
def test_the_power_of_ten_joins_the_units_line_within_its_bar(size, dpi):
    """It was drawn over the unit's line on the narrow pre + post bar ("/ p1e−5": helper-184),
    then, moved beside the bar, onto the next scale's numbers or the bar chart of non-square
    pairs (helper-191): it reads "(×1e−5)" at the end of the unit's line, which stays within
    its bar's width and clear of every other text."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    layers = ("input", "enc1", "enc2", "enc3", "enc4")
    canvas = render_module._Canvas(
        render_module._panel_layout(size, layers, "enc4", "hirescam", True, True, dpi)
    )
    canvas.colour_scale("scale", 3e-5)
    canvas.colour_scale("scale_combined", 2e-5)
    canvas.text("line", "post share P_post/(P_pre+P_post): input 0.72, enc1 0.32 | S = 500.2")

    def bbox(text, spot):
        font = render_module._font(spot.size)
        return [round(v) for v in draw.textbbox(spot.xy, text, font=font, anchor=spot.anchor)]

    boxes = [(text, bbox(text, spot)) for text, spot, _ in canvas._texts]
    units = [(text, box) for text, box in boxes if "logit contribution / px" in text]
    assert [text.split(":")[0] for text, _ in units] == ["pre and post", "pre + post"]
    for (text, (left, top, right, bottom)), key in zip(
        units, ("scale", "scale_combined"), strict=True
    ):
        assert text.endswith("(×1e−5)")
        _, _, x0, x1 = canvas.layout.scales[key][0]
        if size != (1024, 256):  # its bars are narrower than the line at the smallest font
            assert x0 - 1 <= left and right <= x1 + 1, (text, left, right, x0, x1)
        assert 0 <= left and right < canvas.pixels.shape[1]
        assert (canvas.pixels[top : bottom + 1, left : right + 1] != 255).any(axis=2).sum() <= 2
        for other, (l2, t2, r2, b2) in boxes:
            if other != text:
                assert not (left < r2 and l2 < right and top < b2 and t2 < bottom), (text, other)


def test_the_units_line_carries_no_power_of_ten_where_none_is_needed():
    layout = render_module._panel_layout((32, 32), ("enc1",), "enc1", "hirescam", False, False, 30)
    canvas = render_module._Canvas(layout)
    canvas.colour_scale("scale", 0.05)
    assert [t for t, _, _ in canvas._texts if "px" in t] == [
        "pre and post: logit contribution / px"
    ]


def test_panels_drawn_in_threads_equal_the_ones_drawn_in_turn(explained):
    from concurrent.futures import ThreadPoolExecutor

    _, pre, post, exp = explained

    def draw(i: int) -> np.ndarray:
        return render_panel(pre[i % 2], post[i % 2], exp, index=i % 2, title=f"p{i}", dpi=30)

    in_turn = [draw(i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, range(8)))
    for got, want in zip(together, in_turn, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_long_map_title_shrinks_to_its_axes_and_a_short_one_keeps_its_size():
    """ "pre + post Date-contrastive HiResCAM enc4" ran into the next panel's title."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fig = Figure(figsize=(13.5, 7.0), dpi=72)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    fig.subplots_adjust(left=0.02, right=0.98, wspace=0.1)
    renderer = fig.canvas.get_renderer()
    long = render_module._fit_title(
        axes[1, 2], "pre + post Date-contrastive HiResCAM enc4", renderer
    )
    width = axes[1, 2].get_window_extent(renderer).width
    assert long.get_window_extent(renderer).width <= width
    default = FontProperties(size=rcParams["axes.titlesize"]).get_size_in_points()
    short = render_module._fit_title(axes[1, 0], "pre HiResCAM enc4", renderer)
    assert long.get_fontsize() < short.get_fontsize() == default


@pytest.mark.parametrize("size", [(2000, 12), (600, 2)])
def test_a_tall_strip_renders_although_its_boxes_round_to_no_pixel_across(size):
    """A 2000 x 10 pair failed in torch's interpolate (an image box 0 px wide), and predict.py
    dropped that pair's mask and probability with it (helper-84)."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 1).eval()
    pre, post = torch.rand(1, 3, *size), torch.rand(1, 3, *size)
    panel = render_panel(pre[0], post[0], explain_batch(net, pre, post, target="all"), dpi=30)
    assert panel.shape == (210, 405, 3)


def test_a_mask_with_a_one_pixel_side_keeps_both_sides():
    from changecam.explain.render import to_mask

    assert to_mask(np.ones((1, 1, 1))).shape == (1, 1)  # was squeezed to shape ()
    assert to_mask(torch.ones(1, 1, 1, 7)).shape == (1, 7)
    assert to_mask(np.ones((6, 1))).shape == (6, 1)


def test_occlusion_colour_scales_name_their_unit(monkeypatch):
    """Occlusion's pixels are mean score drops over swapped squares (their maps sum to about
    2 x window² times the score's change), not logit contributions per pixel (helper-68)."""
    render = render_module
    labels, real = [], render._colorbar
    monkeypatch.setattr(
        render, "_colorbar", lambda fig, a, b, label: labels.append(label) or real(fig, a, b, label)
    )
    render._panel_layout.cache_clear()
    try:
        for method in ("hirescam", "occlusion"):
            render._panel_layout((16, 16), ("input",), "input", method, False, False, 20)
    finally:
        render._panel_layout.cache_clear()
    assert labels == [
        "pre and post: logit contribution / px",
        "pre + post: logit contribution / px",
        "pre and post: mean score drop, square swapped",
        "pre + post: mean score drop, square swapped",
    ]

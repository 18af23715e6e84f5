"""Explaining models changecam did not write: layers declared by module path (LayerTaps)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerActivation, LayerGradientXActivation
from torch import nn

from changecam.data.io import write_png
from changecam.explain import LayerTaps, TapError, explain_batch
from changecam.models import ExternalModel, build_network
from changecam.training.checkpoint import CheckpointError, read_external_checkpoint
from changecam.training.init_from import load_initial_weights
from changecam.training.module import ChangeDetectionModule
from helpers import REPO, run_script


def _init(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return module.eval()


class StackedSiamDiff(nn.Module):
    """torchgeo's FC-Siam-diff pattern: ``forward(x)`` with x B×T×C×H×W, the encoder runs once
    on both dates stacked on the batch axis, ``(b t) c h w`` (or ``(t b)``: halves)."""

    def __init__(self, order: str = "interleaved") -> None:
        super().__init__()
        self.order = order
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1))
        self.head = nn.Conv2d(6, 1, 3, padding=1)
        _init(self, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        if self.order == "interleaved":
            f = self.encoder(x.flatten(0, 1)).unflatten(0, (b, t))
        else:
            f = self.encoder(x.transpose(0, 1).flatten(0, 1)).unflatten(0, (t, b)).transpose(0, 1)
        return self.head(torch.relu(f[:, 1] - f[:, 0]))


class TwoCallSiamese(nn.Module):
    """A shared encoder called once per date, concat fusion; ``calls`` encoder runs (2 default)."""

    def __init__(self, calls: int = 2) -> None:
        super().__init__()
        self.calls = calls
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 1, 3, padding=1)
        _init(self, 1)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        if self.calls == 1:  # the dates fused before the encoder: it runs once
            f = self.encoder(pre + post)
            return self.head(torch.cat([f, f], 1))
        a, b = self.encoder(pre), self.encoder(post)
        for _ in range(self.calls - 2):
            b = self.encoder(post)
        return self.head(torch.cat([a, b], 1))


def pair(b: int = 2, size: int = 16, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def recorded_grads(model: nn.Module, module: nn.Module, run, roi: torch.Tensor):
    """Every output of ``module`` in one forward of ``run()`` and ``∂S/∂output`` by hand."""
    outs: list[torch.Tensor] = []

    def keep(mod, inp, out):
        out.retain_grad()
        outs.append(out)

    handle = module.register_forward_hook(keep)
    try:
        logits = run()
    finally:
        handle.remove()
    (roi * logits).sum().backward()
    model.zero_grad(set_to_none=True)
    return [(o.detach(), o.grad.detach()) for o in outs]


def assert_no_hooks(model: nn.Module) -> None:
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == [], f"left hooked: {hooked}"


@pytest.mark.parametrize("order", ["interleaved", "halves"])
def test_batch_stacked_dates_give_one_map_per_date(order):
    model = StackedSiamDiff(order)
    net = LayerTaps(model, {"encoder": f"batch_{order}", "head": "fused"}, inputs="stacked")
    pre, post = pair()
    roi = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    assert exp.taps == ("pre/input", "post/input", "pre/encoder", "post/encoder", "head")
    assert exp.layers == ["input", "encoder"]

    x = torch.stack([pre, post], 1)
    [(act, grad)] = recorded_grads(model, model.encoder, lambda: model(x), roi)
    cam = (act * grad).sum(1)  # 2B maps, in the model's row order
    rows = {"interleaved": (cam[0::2], cam[1::2]), "halves": (cam[:2], cam[2:])}[order]
    for date, expected in zip(("pre", "post"), rows, strict=True):
        got = exp.raw["hirescam"][f"{date}/encoder"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got.abs().max() > 0.05, "a near-zero map proves nothing"
    assert not torch.allclose(rows[0], rows[1])
    assert_no_hooks(model)

    # captum on the same module: one attribution per *row* of the stacked batch, not per date
    # and sample; row 1 is sample 0's post date, so reading it as sample 1 mixes dates up
    forward = lambda stacked: (roi * model(stacked)).sum((1, 2, 3))  # noqa: E731
    on_module = LayerGradientXActivation(forward, model.encoder).attribute(x).sum(1)
    assert on_module.shape[0] == 2 * len(pre) != len(exp)
    if order == "interleaved":
        torch.testing.assert_close(on_module[1], exp.raw["hirescam"]["post/encoder"][0])


def test_two_calls_give_both_dates_where_captum_keeps_one():
    model = TwoCallSiamese()
    net = LayerTaps(model, {"encoder": "calls", "head": "fused"})
    pre, post = pair(seed=4)
    roi = torch.ones(2, 1, 16, 16)
    exp = explain_batch(net, pre, post, target="all")
    calls = recorded_grads(model, model.encoder, lambda: model(pre, post), roi)
    assert len(calls) == 2
    for date, (act, grad) in zip(("pre", "post"), calls, strict=True):
        torch.testing.assert_close(
            exp.raw["hirescam"][f"{date}/encoder"], (act * grad).sum(1), atol=1e-5, rtol=1e-5
        )
        gradcam = (grad.mean((2, 3), keepdim=True) * act).sum(1)
        torch.testing.assert_close(
            exp.raw["gradcam"][f"{date}/encoder"], gradcam, atol=1e-5, rtol=1e-5
        )
    share = exp.post_share("encoder")
    assert ((share > 0) & (share < 1)).all()

    # captum hooked on the encoder keeps one call: the post date; the pre date is lost
    forward = lambda a, b: (model(a, b) * roi).sum((1, 2, 3))  # noqa: E731
    activation = LayerActivation(forward, model.encoder).attribute((pre, post))
    torch.testing.assert_close(activation, model.encoder(post))
    single = LayerGradientXActivation(forward, model.encoder).attribute((pre, post)).sum(1)
    torch.testing.assert_close(single, exp.raw["hirescam"]["post/encoder"], atol=1e-5, rtol=1e-5)
    assert (single - exp.raw["hirescam"]["pre/encoder"]).abs().max() > 1e-3
    assert_no_hooks(model)


@pytest.mark.parametrize("calls,ran", [(1, "ran 1 time"), (3, "ran 3 times")])
def test_wrong_call_counts_fail_and_leave_nothing_hooked(calls, ran):
    model = TwoCallSiamese(calls)
    net = LayerTaps(model, {"encoder": "calls"})
    pre, post = pair(seed=5)
    with pytest.raises(
        TapError, match=rf"encoder was declared `calls` \(2 per forward\) but {ran}"
    ):
        explain_batch(net, pre, post, target="all")
    assert_no_hooks(net)
    with pytest.raises(TapError, match=rf"but {ran}"):  # a plain forward checks it too
        net(pre, post)
    assert_no_hooks(net)
    if calls == 1:  # the model itself is unchanged: declared as it runs, it explains
        fixed = LayerTaps(model, {"encoder": "fused"})
        assert explain_batch(fixed, pre, post, target="all").taps[-1] == "encoder"
    assert_no_hooks(model)


def test_batch_declared_on_a_per_date_module_fails():
    model = TwoCallSiamese()
    net = LayerTaps(model, {"encoder": "batch_interleaved"})
    with pytest.raises(TapError, match=r"encoder was declared `batch_interleaved`.*2 × 2 = 4 rows"):
        explain_batch(net, *pair(), target="all")
    assert_no_hooks(net)


class TokenEncoder(nn.Module):
    """A shared encoder whose output is tokens, B×N×C (a ViT's): not maps whose channels are
    dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


class TokenSiamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = TokenEncoder()
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        h, w = pre.shape[-2:]
        maps = [self.encoder(x).transpose(1, 2).unflatten(2, (h, w)) for x in (pre, post)]
        return self.head(torch.cat(maps, 1))


def test_a_declared_layer_that_does_not_output_bchw_maps_is_refused():
    """The maps sum over dim 1 as channels: a token layer's (B×N×C) were summed over its
    tokens, without a word (helper-109). Channels-last maps are 4-D too, so they cannot be told
    apart; the README asks for channels first."""
    net = LayerTaps(TokenSiamese(), {"encoder": "calls"})
    with pytest.raises(
        TapError, match=r"encoder returned a tensor of shape \(2, 256, 4\).*B×C×h×w"
    ):
        explain_batch(net, *pair(), target="all")
    assert_no_hooks(net)


class InPlaceResidual(nn.Module):
    """A shared encoder whose declared layer's output is changed in place afterwards (ResNet's
    ``out += identity``, then ReLU(inplace=True)), or the same forward written out of place."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.skip = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 1, 3, padding=1)
        _init(self, 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        if self.in_place:
            out += self.skip(x)
            return torch.relu_(out)
        return torch.relu(out + self.skip(x))

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.encode(pre), self.encode(post)], 1))


def test_in_place_ops_after_a_declared_layer_do_not_reach_its_maps():
    pre, post = pair(seed=7)
    twin, changed = InPlaceResidual(False), InPlaceResidual(True)
    changed.load_state_dict(twin.state_dict())
    methods = ("hirescam", "gradcam", "contrastive", "layer_ig")
    want, got = (
        explain_batch(LayerTaps(m, {"bn": "calls"}), pre, post, taps=["bn"], methods=methods)
        for m in (twin, changed)
    )
    for method in methods:
        for tap in ("pre/bn", "post/bn"):
            assert want.raw[method][tap].abs().sum() > 0
            torch.testing.assert_close(got.raw[method][tap], want.raw[method][tap])


def test_a_declared_layers_output_is_copied_only_while_it_is_explained():
    """Training and plain prediction keep the model's own tensor (no second copy held for the
    backward); the explanation's recorded activation is kept apart from later in-place ops."""
    net = InPlaceResidual(True)
    raw: list[int] = []
    net.bn.register_forward_hook(lambda m, i, o: raw.append(o.data_ptr()))  # before LayerTaps'
    received: list[int] = []
    real_encode = net.encode

    def encode(x):
        out = real_encode(x)
        received.append(out.data_ptr())
        return out

    net.encode = encode  # type: ignore[method-assign]
    wrapped = LayerTaps(net, {"bn": "calls"})
    wrapped(*pair(seed=8))
    assert received == raw, "no hooks on the taps: the model's own tensors"
    raw.clear()
    received.clear()
    explain_batch(wrapped, *pair(seed=8), taps=["bn"])
    assert len(received) == 2 and not set(received) & set(raw), "copies while explained"


class PairOfUNets(nn.Module):
    """An ensemble of two changecam networks: their taps share every name."""

    def __init__(self) -> None:
        super().__init__()
        from changecam.models import SiameseUNet

        self.a, self.b = SiameseUNet(3, 4, 2), SiameseUNet(3, 4, 2)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return (self.a(pre, post) + self.b(pre, post)) / 2


def test_a_wrapped_ensemble_predicts_and_explains_its_declared_layers_only():
    """Two taps of one name were refused wherever a model was searched for taps, so a wrapped
    ensemble could not even be built (helper-83): only explaining that name is refused."""
    net = LayerTaps(PairOfUNets().eval(), {"a.final_conv": "fused"})
    pre, post = pair()
    assert net(pre, post).shape == (2, 1, 16, 16)
    assert explain_batch(net, pre, post, taps=["a.final_conv"]).taps == ("a.final_conv",)
    with pytest.raises(TapError, match=r"share a name: 'pre/enc1' at model.a.taps.pre_enc1, mo"):
        explain_batch(net, pre, post)
    with pytest.raises(TapError, match=r"'fuse1' at model.a.taps.fuse1, model.b.taps.fuse1"):
        explain_batch(net, pre, post, taps=["fuse1"])


def test_eval_scores_a_wrapped_ensembles_post_share_at_its_declared_layer(tmp_path, tiny_synthetic):
    """eval.py listed every tap to choose post_share_layer and refused the shared names
    (helper-88)."""
    from changecam.cli.evaluate import evaluate
    from helpers import compose_train, tiny_overrides

    torch.manual_seed(0)
    ensemble = PairOfUNets()
    with torch.no_grad():  # every pixel predicted change: a target, hence a share, everywhere
        ensemble.a.final_conv.bias += 20
    torch.save(ensemble.state_dict(), tmp_path / "ensemble.pt")
    data = [o for o in tiny_overrides(tiny_synthetic) if not o.startswith(("model.", "callbacks."))]
    overrides = [
        "model=external",
        "model.target=test_external_models:PairOfUNets",
        "model.layers={a.encoder1: {mode: calls, name: ensA}}",
        f"ckpt_path={tmp_path / 'ensemble.pt'}",
        "post_share_layer=ensA",
        "split=val",
        "logger=none",
        *data,
    ]
    evaluate(compose_train(tmp_path, overrides, "eval"))
    with (tmp_path / "run" / "per_image.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and list(rows[0])[-1] == "post_share_ensA"
    shares = [float(r["post_share_ensA"]) for r in rows]
    assert all(0 <= v <= 1 for v in shares) and len(set(shares)) > 1  # NaN fails both


def test_unknown_paths_modes_and_names():
    model = StackedSiamDiff()
    with pytest.raises(TapError, match=r"no module 'encodr\.0'; nearest names: \['encoder\.0'"):
        LayerTaps(model, {"encodr.0": "calls"})
    with pytest.raises(TapError, match="mode 'twice' is not one of: calls"):
        LayerTaps(model, {"encoder": "twice"})
    with pytest.raises(TapError, match="'input' is reserved"):
        LayerTaps(model, {"encoder": {"mode": "pre", "name": "input"}})
    with pytest.raises(TapError, match=r"same map name\(s\) \['enc'\]"):
        LayerTaps(
            model,
            {"encoder": {"mode": "fused", "name": "enc"}, "head": {"mode": "fused", "name": "enc"}},
        )
    assert_no_hooks(model)


def test_a_declared_name_that_is_one_of_the_models_own_taps_is_refused():
    """Two taps named fuse1: the declared bottleneck's map was returned as the network's own
    fuse1 (helper-75)."""
    from changecam.models import SiameseUNet

    with pytest.raises(TapError, match=r"\['fuse1'\], which SiameseUNet already taps itself"):
        LayerTaps(SiameseUNet(3, 4, 2), {"bottleneck": {"mode": "fused", "name": "fuse1"}})
    LayerTaps(SiameseUNet(3, 4, 2), {"bottleneck": {"mode": "fused", "name": "middle"}})


def test_unshared_modules_pair_up_under_one_name():
    class Unshared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc_a, self.enc_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(8, 1, 1)
            _init(self, 6)

        def forward(self, pre, post):
            return self.head(torch.relu(torch.cat([self.enc_a(pre), self.enc_b(post)], 1)))

    net = LayerTaps(
        Unshared(),
        {"enc_a": {"mode": "pre", "name": "enc"}, "enc_b": {"mode": "post", "name": "enc"}},
    )
    exp = explain_batch(net, *pair(seed=7), target="all", taps=["enc"])
    assert exp.taps == ("pre/enc", "post/enc") and exp.layers == ["enc"]


FACTORY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width, act="relu"):
        super().__init__()
        act = nn.ReLU() if act == "relu" else nn.Tanh()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), act)
        self.head = nn.Conv2d(2 * width, 1, 1)

    def forward(self, pre, post):
        return self.head(torch.cat([self.encoder(pre), self.encoder(post)], 1))


def make(width=4, act="relu"):
    torch.manual_seed(0)
    return Net(width, act)


class Wrapper(nn.Module):  # a network whose one child is named module, as DataParallel's is

    def __init__(self, width):
        super().__init__()
        self.module = Net(width)

    def forward(self, pre, post):
        return self.module(pre, post)


def wrapped(width=4):
    torch.manual_seed(0)
    return Wrapper(width)


def compiled(width=4):  # keys _orig_mod.*: the network's own, not a wrapper's
    torch.manual_seed(0)
    return torch.compile(Net(width))


def nested(width=4):  # keys module.module.*
    torch.manual_seed(0)
    outer = Wrapper(width)
    outer.module = Wrapper(width)
    return outer
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch) -> Path:
    """``extnet.make`` in a module of ``tmp_path``, importable here and on PYTHONPATH."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "extnet.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("extnet", None)


def external_cfg(**over) -> dict:
    cfg = {
        "_target_": "changecam.models.ExternalModel",
        "target": "extnet:make",
        "kwargs": {"width": 4},
        "layers": {"encoder": "calls"},
    }
    return {**cfg, **over}


def test_external_model_from_a_factory_and_a_plain_state_dict(factory_module, tmp_path):
    import extnet

    weights = tmp_path / "weights.pt"
    trained = extnet.make(width=4)
    nn.init.constant_(trained.head.bias, 0.25)
    torch.save(trained.state_dict(), weights)
    net, hparams = read_external_checkpoint(weights, external_cfg())
    assert isinstance(net, ExternalModel) and not net.training and hparams == {}
    assert float(net.model.head.bias) == 0.25
    assert net.tap_names == ["pre/encoder", "post/encoder"]
    rebuilt = build_network(net.config())  # the config a changecam checkpoint would record
    assert rebuilt.config() == net.config() and rebuilt.tap_names == net.tap_names
    pre, post = pair(seed=8)
    torch.testing.assert_close(net(pre, post), trained.eval()(pre, post))

    torch.save(extnet.make(width=6).state_dict(), weights)
    with pytest.raises(CheckpointError, match="(?s)does not fit.*extnet:make.*shape mismatches"):
        read_external_checkpoint(weights, external_cfg())
    diverged = extnet.make(width=4).state_dict()
    diverged["head.bias"][0] = float("nan")
    torch.save(diverged, weights)  # refused, as a changecam network's are (helper-75)
    with pytest.raises(CheckpointError, match="holds non-finite weights .*head.bias"):
        read_external_checkpoint(weights, external_cfg())
    with pytest.raises(ValueError, match="cannot import 'nowhere'.*PYTHONPATH"):
        ExternalModel("nowhere:make", layers={"encoder": "calls"})
    with pytest.raises(ValueError, match="no callable 'mak'.*did you mean \\['make'\\]"):
        ExternalModel("extnet:mak")


def test_a_network_whose_child_is_named_module_loads_its_plain_state_dict(factory_module, tmp_path):
    """Every key starts with ``module.``, which was taken off as DataParallel's prefix, so
    ``torch.save(model.state_dict())`` of such a network was refused (helper-135)."""
    import extnet

    weights = tmp_path / "weights.pt"
    trained = extnet.wrapped(width=4)
    nn.init.constant_(trained.module.head.bias, 0.5)
    torch.save(trained.state_dict(), weights)
    cfg = external_cfg(target="extnet:wrapped", layers={"module.encoder": "calls"})
    net, _ = read_external_checkpoint(weights, cfg)
    assert float(net.model.module.head.bias) == 0.5
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, weights)  # from DDP
    assert float(read_external_checkpoint(weights, cfg)[0].model.module.head.bias) == 0.5
    # module.init_from reads the file as the explain/eval reader does (it was refused: helper-181)
    target = build_network(cfg)
    report = load_initial_weights(target, weights)
    assert float(target.model.module.head.bias) == 0.5
    assert report.not_loaded() == [] and "module.head.bias" in report.loaded


@pytest.mark.parametrize("factory", ["compiled", "nested"])
def test_a_network_whose_own_keys_look_like_a_wrappers_loads(factory_module, tmp_path, factory):
    """Taking every wrapper prefix off refused a factory's torch.compile'd or doubly wrapped
    network's own state dict, which loaded before (helper-185)."""
    import extnet

    weights = tmp_path / "weights.pt"
    trained = getattr(extnet, factory)(width=4)
    for p in trained.parameters():
        nn.init.constant_(p, 0.5)
    torch.save(trained.state_dict(), weights)
    cfg = external_cfg(target=f"extnet:{factory}", layers={})
    net, _ = read_external_checkpoint(weights, cfg)
    assert all(float(p.mean()) == 0.5 for p in net.parameters())
    target = build_network(cfg)
    load_initial_weights(target, weights)
    assert all(float(p.mean()) == 0.5 for p in target.parameters())


def test_freezing_what_a_strict_partial_load_left_out_is_warned(factory_module, tmp_path, caplog):
    """An external network's report names its tensors without the wrapper's ``model.``, so
    the strict load never matched the frozen names (helper-185)."""
    import extnet

    torch.save(extnet.make(width=4).state_dict(), tmp_path / "weights.pt")
    with caplog.at_level(logging.WARNING, logger="changecam"):
        ChangeDetectionModule(
            build_network(external_cfg()),
            init_from=str(tmp_path / "weights.pt"),
            init_include=["encoder"],
            freeze=["model.head"],
        )
    (warning,) = [r.getMessage() for r in caplog.records if "module.freeze" in r.getMessage()]
    assert "freezes 2 parameter tensors that module.init_from did not load" in warning
    assert warning.endswith("(model.head.bias, model.head.weight)")


def test_a_changecam_checkpoint_of_an_external_network_keeps_what_it_records(
    factory_module, tmp_path
):
    """With ``model=external`` too (helper-135): its recorded threshold was dropped, and a
    ``model.kwargs`` that builds another network of the same weight shapes was accepted."""
    from changecam.training.checkpoint import CONFIG_KEY, PREFIX_KEY

    built = build_network(external_cfg())
    path = tmp_path / "best.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in built.state_dict().items()},
            CONFIG_KEY: built.config(),
            PREFIX_KEY: "net.",
            "hyper_parameters": {"threshold": 0.9},
        },
        path,
    )
    net, hparams = read_external_checkpoint(path, external_cfg())
    assert isinstance(net, ExternalModel) and hparams["threshold"] == 0.9
    # other layers explain the same network elsewhere; the factory may be spelled either way
    # (helper-136: both were refused as another network)
    elsewhere = external_cfg(target="extnet.make", layers={"head": "fused"})
    net, hparams = read_external_checkpoint(path, elsewhere)
    assert net.tap_names == ["head"] and hparams["threshold"] == 0.9
    pre, post = pair(seed=5)
    torch.testing.assert_close(net(pre, post), built.eval()(pre, post))
    with pytest.raises(CheckpointError, match="records its network, and the model config given"):
        read_external_checkpoint(path, external_cfg(kwargs={"width": 4, "act": "tanh"}))


class ViewAfterStackedEncoder(nn.Module):
    """FC-Siam-conc's pattern: the encoder runs on both dates stacked, and its output is
    ``view``-ed into one batch of concatenated features, which channels-last refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)
        _init(self, 4)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pre.shape
        f = self.encoder(torch.stack([pre, post], 1).flatten(0, 1))
        return self.head(f.view(b, 8, h, w))


def test_an_external_network_runs_in_its_own_memory_format():
    """predict.py and explain.py turned every network channels-last, which broke this valid
    external one (helper-135); changecam's own networks still go channels-last."""
    from changecam.models import SiameseUNet
    from changecam.models.inference import inference_network

    pre, post = pair()
    model = ViewAfterStackedEncoder()
    expected = model(pre, post)
    net = inference_network(LayerTaps(model), "cpu")
    torch.testing.assert_close(net(pre, post), expected)
    own = inference_network(SiameseUNet(base_channels=4, depth=2), "cpu")
    conv = next(m for m in own.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


class Outputs(nn.Module):
    """Returns its logits as a dict, a tuple, or two class channels."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, pre: torch.Tensor, post: torch.Tensor):
        out = self.head(torch.cat([pre, post], 1))
        return {"dict": {"out": out}, "tuple": (out[:, 1:],), "classes": out}[self.kind]


@pytest.mark.parametrize(
    ("kind", "said"),
    [("dict", "a dict"), ("tuple", "a tuple"), ("classes", "a tensor of shape (2, 2, 16, 16)")],
)
def test_a_model_output_that_is_not_one_channel_of_logits_is_refused(kind, said):
    """predict.py took channel 0 of a two-class output as the change logit, and a dict or a
    tuple failed on an attribute (helper-135)."""
    net = LayerTaps(Outputs(kind))
    with pytest.raises(TapError, match=rf"^Outputs returned {re.escape(said)}, not B×1×H×W"):
        net(*pair())


@pytest.mark.slow
def test_explain_cli_on_an_external_model(factory_module, tmp_path):
    import extnet

    weights = tmp_path / "weights.pt"
    torch.save(extnet.make(width=4).state_dict(), weights)
    g = np.random.default_rng(0)
    for name in ("pre", "post"):
        write_png(tmp_path / f"{name}.png", g.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    env = {"PYTHONPATH": os.pathsep.join([str(factory_module), os.environ.get("PYTHONPATH", "")])}
    run_script(
        "explain.py",
        [
            "model=external",
            "model.target=extnet:make",
            "model.kwargs={width: 4}",
            "model.layers={encoder: calls}",
            f"ckpt_path={weights}",
            f"input.pre={tmp_path / 'pre.png'}",
            f"input.post={tmp_path / 'post.png'}",
            "explain.target=all",
            "explain.faithfulness.steps=2",
            "explain.dpi=30",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
    )
    report = json.loads((tmp_path / "run" / "explanations.json").read_text())
    assert report["taps"] == ["pre/input", "post/input", "pre/encoder", "post/encoder"]
    assert report["panel_layer"] == "encoder"
    [row] = report["pairs"]
    assert set(row["post_share"]) == {"input", "encoder"}
    maps = np.load(tmp_path / "run" / row["files"]["maps"])
    assert maps["hirescam/pre/encoder"].shape == (24, 20)


def test_a_tap_computed_without_grad_is_named():
    """A frozen backbone run under torch.no_grad() in the model's forward: its outputs carry
    no gradient of the change score, refused naming the tap (helper-68's case), not with
    autograd's bare error."""

    class FrozenEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, pre, post):
            with torch.no_grad():
                a, b = self.encoder(pre), self.encoder(post)
            return self.head(torch.cat([a, b], 1))

    torch.manual_seed(0)
    net = LayerTaps(FrozenEncoder(), layers={"encoder": "calls"}).eval()
    pre, post = torch.rand(2, 1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"taps \['pre/encoder', 'post/encoder'\]: .*no_grad"):
        explain_batch(net, pre, post, taps=["encoder"], target="all")

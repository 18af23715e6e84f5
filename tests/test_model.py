import pytest
import torch

from changecam.models import (
    SEED_ARCHITECTURE,
    SiameseUNet,
    build_network,
    find_taps,
    seed_siamese_unet,
)


@pytest.mark.parametrize("fusion", ["concat", "diff", "absdiff"])
@pytest.mark.parametrize("shared", [True, False])
def test_shapes_and_taps(fusion, shared):
    depth = 3
    net = SiameseUNet(3, 4, depth, fusion, shared).eval()
    pre, post = torch.rand(2, 3, 32, 40), torch.rand(2, 3, 32, 40)
    seen: dict[str, list[tuple]] = {}
    taps = find_taps(net)
    hooks = [
        t.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o.shape))
        for n, t in taps.items()
    ]
    out = net(pre, post)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 1, 32, 40)
    expected = [f"{d}/enc{k}" for k in range(1, depth + 1) for d in ("pre", "post")]
    expected += [f"fuse{k}" for k in range(1, depth + 1)] + [
        "bottleneck",
        "dec3",
        "dec2",
        "dec1",
        "head_in",
    ]
    assert net.tap_names == expected and list(taps) == expected
    assert {n: len(v) for n, v in seen.items()} == dict.fromkeys(expected, 1), (
        "each tap fires exactly once per forward"
    )
    mult = 2 if fusion == "concat" else 1
    assert seen["pre/enc2"][0] == (2, 8, 16, 20) == seen["post/enc2"][0]
    assert seen["fuse3"][0] == (2, 16 * mult, 8, 10)
    assert seen["bottleneck"][0] == (2, 32, 4, 5)
    assert seen["head_in"][0] == (2, 4, 32, 40)
    encoders = {n.split(".")[0] for n, _ in net.named_parameters() if n.startswith("encoder")}
    assert encoders == (
        {"encoder1", "encoder2", "encoder3"}
        if shared
        else {f"encoder{k}{s}" for k in (1, 2, 3) for s in "ab"}
    )


def test_taps_separate_dates_with_shared_encoder():
    net = SiameseUNet(3, 4, 2, "diff", True).eval()
    taps = find_taps(net)
    got = {}
    for name in ("pre/enc1", "post/enc1"):
        taps[name].register_forward_hook(lambda m, i, o, n=name: got.__setitem__(n, o.detach()))
    pre, post = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    net(pre, post)
    assert torch.allclose(got["pre/enc1"], net.encoder1(pre))
    assert torch.allclose(got["post/enc1"], net.encoder1(post))


@pytest.mark.parametrize("shared", [True, False])
def test_each_fusion_combines_the_dates_encoder_features_as_named(shared):
    """diff is post - pre (negated by a swap of the dates), absdiff |post - pre|, concat
    [pre, post]; with a shared encoder a swap negates diff's fused features, leaves absdiff's
    and hence its output alone, and changes diff's output."""
    pre, post = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    expected = {
        "diff": lambda a, b: b - a,
        "absdiff": lambda a, b: (b - a).abs(),
        "concat": lambda a, b: torch.cat([a, b], dim=1),
    }
    fused = {}
    for fusion, combine in expected.items():
        torch.manual_seed(0)
        net = SiameseUNet(3, 4, 2, fusion, shared).eval()
        taps = find_taps(net)
        for x, y in ((pre, post), (post, pre)):
            got = {}
            hooks = [
                taps[n].register_forward_hook(lambda m, i, o, n=n, got=got: got.update({n: o}))
                for n in ("pre/enc1", "post/enc1", "fuse1")
            ]
            out = net(x, y)
            for h in hooks:
                h.remove()
            torch.testing.assert_close(got["fuse1"], combine(got["pre/enc1"], got["post/enc1"]))
            fused[fusion, x is pre] = (got["fuse1"], out)
    if shared:
        torch.testing.assert_close(fused["diff", False][0], -fused["diff", True][0])
        torch.testing.assert_close(fused["absdiff", False][0], fused["absdiff", True][0])
        torch.testing.assert_close(fused["absdiff", False][1], fused["absdiff", True][1])
        assert not torch.allclose(fused["diff", False][1], fused["diff", True][1], atol=1e-4)


def test_bad_inputs():
    net = SiameseUNet(3, 4, 2)
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 4"):
        net(torch.rand(1, 3, 18, 16), torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match="expected one of"):
        SiameseUNet(fusion="dif")  # type: ignore[arg-type]


def seed_layout_shapes() -> dict[str, tuple[int, ...]]:
    """The seed notebook's state-dict keys and shapes, written out from its documented layout."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_block(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, 3, 3)
        shapes[f"{prefix}.conv.bias"] = (cout,)
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{k}"] = (cout,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()

    widths = [64, 128, 256, 512]
    cin = 3
    for k, w in enumerate(widths, start=1):
        for side in "ab":
            conv_block(f"encoder{k}{side}.conv1", cin, w)
            conv_block(f"encoder{k}{side}.conv2", w, w)
        cin = w
    conv_block("bottleneck", 1024, 1024)
    up = 1024
    for k in (4, 3, 2, 1):
        w = widths[k - 1]
        shapes[f"decoder{k}.upconv.weight"] = (up, w, 2, 2)
        shapes[f"decoder{k}.upconv.bias"] = (w,)
        conv_block(f"decoder{k}.conv1", w + 2 * w, w)
        conv_block(f"decoder{k}.conv2", w, w)
        up = w
    shapes["final_conv.weight"] = (1, 64, 1, 1)
    shapes["final_conv.bias"] = (1,)
    return shapes


def test_seed_compatible_state_dict_loads_without_renaming():
    net = seed_siamese_unet()
    expected = seed_layout_shapes()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected
    n_params = sum(p.numel() for p in net.parameters())
    assert 33.5e6 < n_params < 34.5e6  # "about 34 M parameters"
    gen = torch.Generator().manual_seed(0)
    seed_sd = {
        k: (torch.randn(s, generator=gen) if s else torch.tensor(5)) for k, s in expected.items()
    }
    for k in seed_sd:
        if k.endswith("running_var"):
            seed_sd[k] = seed_sd[k].abs() + 0.5
    missing, unexpected = net.load_state_dict(seed_sd, strict=True)
    assert not missing and not unexpected
    assert torch.equal(net.decoder4.conv1.conv.weight, seed_sd["decoder4.conv1.conv.weight"])
    out = net.eval()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


def test_the_seed_config_group_builds_the_seed_architecture():
    """conf/model/siamese_unet_seed.yaml mirrors the one definition in code (SEED_ARCHITECTURE)."""
    from omegaconf import OmegaConf

    from changecam.cli.launch import CONF_DIR
    from changecam.models import SEED_ARCHITECTURE, build_network

    group = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/siamese_unet_seed.yaml"))
    assert group.pop("_target_") == "changecam.models.SiameseUNet"
    assert group == SEED_ARCHITECTURE
    assert build_network({"_target_": "changecam.models.SiameseUNet", **group}).config() == (
        seed_siamese_unet().config()
    )


class KeywordForwardingUNet(SiameseUNet):
    """A user's subclass that forwards the arguments it does not name."""

    def __init__(self, fusion: str = "diff", **kwargs):
        super().__init__(base_channels=4, fusion=fusion, **kwargs)


class PositionalForwardingUNet(SiameseUNet):
    def __init__(self, *args, fusion: str = "diff"):
        super().__init__(*args, fusion=fusion)


def test_forwarded_keyword_arguments_are_recorded_as_keywords_that_rebuild_the_network():
    net = KeywordForwardingUNet(depth=2, in_channels=4)
    assert net.init_kwargs == {"fusion": "diff", "depth": 2, "in_channels": 4}
    rebuilt = build_network(net.config())
    assert (rebuilt.depth, rebuilt.in_channels, rebuilt.base_channels) == (2, 4, 4)
    assert rebuilt.init_kwargs == net.init_kwargs
    assert PositionalForwardingUNet().init_kwargs == {"fusion": "diff"}
    with pytest.raises(
        TypeError, match=r"PositionalForwardingUNet was given 2 extra positional.*\*args"
    ):
        PositionalForwardingUNet(3, 4)


def test_a_network_records_its_constructor_arguments():
    net = SiameseUNet(3, 4, 2, fusion="diff")
    assert net.init_kwargs == {
        "in_channels": 3,
        "base_channels": 4,
        "depth": 2,
        "fusion": "diff",
        "shared_encoder": True,
    }
    assert net.config()["_target_"] == "changecam.models.siamese_unet.SiameseUNet"
    assert net.size_multiple == 4
    rebuilt = build_network(net.config())
    assert rebuilt.init_kwargs == net.init_kwargs and rebuilt is not net
    assert seed_siamese_unet().init_kwargs == SEED_ARCHITECTURE  # outermost call's arguments

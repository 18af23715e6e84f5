"""FC-EF, FC-Siam-conc and FC-Siam-diff (Daudt et al., ICIP 2018): size, layout, taps and
explanations, configs, and a fast_dev_run of each through ``experiment=quickstart``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from changecam.cli.train import train
from changecam.explain import explain_batch
from changecam.models import build_network, find_taps
from changecam.models.fc_siam import FCEF, FCSiamConc, FCSiamDiff
from changecam.models.sliding_window import check_window
from helpers import REPO, compose_train, tiny_overrides

NETS = {"fc_ef": FCEF, "fc_siam_conc": FCSiamConc, "fc_siam_diff": FCSiamDiff}
SIAMESE = [FCSiamConc, FCSiamDiff]
# Table of the paper (ICIP 2018); the same counts come out for 3 or 13 bands per date (the
# first convolution holds under 0.3 % of the weights), so RGB is tested.
PUBLISHED_PARAMS = {FCEF: 1.35e6, FCSiamConc: 1.55e6, FCSiamDiff: 1.35e6}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def tiny(cls: type, seed: int = 0) -> nn.Module:
    """Width 4 in eval mode, with weights and BN statistics that give maps of order 1."""
    torch.manual_seed(seed)
    net = cls(in_channels=3, base_channels=4)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def pair(b: int = 2, h: int = 32, w: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def expected_taps(cls: type) -> list[str]:
    decoder = ["dec4", "dec3", "dec2", "dec1", "head_in"]
    if cls is FCEF:
        return [f"enc{k}" for k in range(1, 5)] + decoder
    per_date = [f"{d}/enc{k}" for k in range(1, 5) for d in ("pre", "post")]
    return per_date + [f"fuse{k}" for k in range(1, 5)] + decoder


@pytest.mark.parametrize("cls", list(PUBLISHED_PARAMS))
def test_parameter_count_at_the_published_width(cls):
    count = n_params(cls())
    assert count == pytest.approx(PUBLISHED_PARAMS[cls], rel=0.05)
    assert n_params(cls(in_channels=13)) == pytest.approx(PUBLISHED_PARAMS[cls], rel=0.05)
    # the published widths: stage k has 16 * 2**(k-1) channels, 2/2/3/3 units
    widths = [[u.conv.out_channels for u in stage] for stage in cls().encoder]
    assert widths == [[16, 16], [32, 32], [64, 64, 64], [128, 128, 128]]


@pytest.mark.parametrize("cls", list(PUBLISHED_PARAMS))
def test_output_shape_and_size_multiple(cls):
    net = tiny(cls)
    pre, post = pair()
    assert net(pre, post).shape == (2, 1, 32, 48)
    assert net.size_multiple == 16
    with pytest.raises(ValueError, match=r"\(40, 48\) must be divisible by 2\*\*depth = 16"):
        net(*pair(h=40))
    with pytest.raises(ValueError, match="same shape"):
        net(pre, post[..., :32])
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        net(pre[:, :2], post[:, :2])
    with pytest.raises(ValueError, match="size_multiple"):
        check_window(net, 40)
    with pytest.raises(ValueError, match="model.dropout"):
        cls(dropout=1.0)


@pytest.mark.parametrize("cls", list(PUBLISHED_PARAMS))
def test_every_tap_runs_once_and_explanations_match_autograd(cls):
    net = tiny(cls)
    assert list(find_taps(net)) == expected_taps(cls) == net.tap_names
    pre, post = pair()
    roi = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(2)) > 0.6
    acts: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, out):
            out.retain_grad()
            acts.setdefault(name, []).append(out)

        return hook

    handles = [t.register_forward_hook(keep(n)) for n, t in find_taps(net).items()]
    logits = net(pre, post)
    for h in handles:
        h.remove()
    assert {n: len(v) for n, v in acts.items()} == {n: 1 for n in expected_taps(cls)}
    (roi.float() * logits).sum().backward()
    net.zero_grad(set_to_none=True)

    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    assert exp.taps == ("pre/input", "post/input", *expected_taps(cls))  # input: every model
    for name, (act,) in acts.items():
        by_hand = (act.grad * act).sum(1).detach()
        torch.testing.assert_close(exp.map(name), by_hand, atol=1e-5, rtol=1e-5)
        assert exp.map(name, upsampled=True).shape == (2, 32, 48)
    assert exp.map("head_in").abs().max() > 0.1, "a near-zero map proves nothing"

    shares = explain_batch(net, pre, post).post_shares()  # the default target, every tap
    if cls is FCEF:
        assert list(shares) == ["input"]  # the dates meet at the input: no inner per-date layer
    else:
        assert list(shares) == ["input", "enc1", "enc2", "enc3", "enc4"]
        assert all(((s >= 0) & (s <= 1)).all() for s in shares.values())


@pytest.mark.parametrize("cls", SIAMESE)
def test_the_encoder_is_shared_and_only_post_enters_the_deepest_path(cls):
    """One encoder for both dates; as in the authors' forward, the first upsampling takes the
    post date's pooled stage 4, so the pre date's stage 4 reaches the decoder only through
    its skip ``fuse4``."""
    net = tiny(cls)
    pre, post = pair()
    taps = find_taps(net)
    got: dict[str, torch.Tensor] = {}
    handles = [
        taps[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
        for n in ("pre/enc4", "post/enc4", "fuse4")
    ]
    with torch.no_grad():
        reference = net(pre, post)
    for h in handles:
        h.remove()
    for date, x in (("pre", pre), ("post", post)):
        for k, stage in enumerate(net.encoder):
            x = stage(x if k == 0 else F.max_pool2d(x, 2))
        torch.testing.assert_close(got[f"{date}/enc4"], x)

    def output_with_stage4_zeroed(date: str) -> torch.Tensor:
        """Zero one date's stage 4 but keep the fused skip as it was: only other paths change."""
        handles = [
            taps[f"{date}/enc4"].register_forward_hook(lambda m, i, o: torch.zeros_like(o)),
            taps["fuse4"].register_forward_hook(lambda m, i, o: got["fuse4"]),
        ]
        try:
            with torch.no_grad():
                return net(pre, post)
        finally:
            for h in handles:
                h.remove()

    torch.testing.assert_close(output_with_stage4_zeroed("pre"), reference)
    assert (output_with_stage4_zeroed("post") - reference).abs().max() > 1e-3


@pytest.mark.parametrize("cls", list(PUBLISHED_PARAMS))
def test_the_config_rebuilds_the_network_and_loads_its_weights(cls):
    net = tiny(cls)
    config = net.config()
    assert config == {
        "_target_": f"changecam.models.fc_siam.{cls.__name__}",
        "in_channels": 3,
        "base_channels": 4,
        "dropout": 0.2,
    }
    rebuilt = build_network(config)
    assert type(rebuilt) is cls
    missing, unexpected = rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert not missing and not unexpected
    pre, post = pair()
    torch.testing.assert_close(rebuilt.eval()(pre, post), net(pre, post))


@pytest.mark.parametrize("name", list(NETS))
def test_the_config_group_builds_the_published_network(name):
    from omegaconf import OmegaConf

    group = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    net = build_network(group)
    assert type(net) is NETS[name] and net.config() == group == NETS[name]().config()


def fdr_overrides(root) -> list[str]:
    """The suite's tiny overrides (32 px tiles, width 4) without ``model.depth``, which these
    fixed-depth networks do not take."""
    return tiny_overrides(root, model=["model.base_channels=4"])


@pytest.mark.parametrize("name", list(NETS))
def test_fast_dev_run_with_the_quickstart_experiment(tmp_path, tiny_synthetic, name):
    cfg = compose_train(
        tmp_path,
        [
            "experiment=quickstart",
            f"model={name}",
            "debug=fdr",
            "logger=none",
            *fdr_overrides(tiny_synthetic),
            # FC-EF's panels use its per-date input layer
            "callbacks.cam_panels.mode=inline",
            "callbacks.cam_panels.k=2",
        ],
    )
    assert cfg.model._target_ == f"changecam.models.fc_siam.{NETS[name].__name__}"
    assert cfg.model.base_channels == 4
    metrics = train(cfg)
    assert {"val/f1", "val/iou", "test/f1", "test/precision", "test/recall"} <= set(metrics)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    # the CAM panels of the two fixed validation samples (FC-EF's at its input layer)
    assert len(list((tmp_path / "run" / "cam").rglob("*.png"))) == 2


@pytest.mark.parametrize("name", list(NETS))
def test_a_plain_state_dict_is_matched_to_its_own_network(name):
    """The three have the same key names: FC-EF, tried first, took the tie although its widths
    fit no FC-Siam file, and the refusal suggested model=fc_ef again and again (helper-93)."""
    from changecam.training.model_match import match_state

    match, score = match_state(NETS[name](base_channels=4).state_dict())
    assert score == 1.0 and match.name == name and match.fitted["base_channels"] == 4

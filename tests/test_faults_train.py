"""Faults of training and of checkpoints: each stops the command once, with a message that names
the file or key (and never advises unsafe loading), and leaves nothing that looks finished.

* a diverged run (``module.optimizer.lr=1e6``) stops naming the epoch, the learning rate and the
  non-finite tensors, with no ``best.ckpt`` and no ``metrics.json``; a NaN score never becomes
  the best checkpoint;
* eval, predict and explain refuse a checkpoint with non-finite weights, an empty, foreign or
  damaged file, and a pickle that needs code (naming the global);
* ``train.py ckpt_path=<file>`` goes through the same checks, with the same suggested
  overrides, before Lightning reads the file;
* an architecture mismatch suggests the ``model=`` of ``conf/model/*.yaml`` that fits, found
  generically (a preset added to the folder is found without code).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import Tensor, nn
from torch.utils.data import DataLoader

from changecam.cli.common import load_model
from changecam.cli.evaluate import evaluate
from changecam.cli.explain import explain
from changecam.cli.predict import predict
from changecam.cli.train import train
from changecam.models import ChangeNetwork, SiameseUNet
from changecam.training.callbacks.finite_checkpoint import FiniteModelCheckpoint
from changecam.training.checkpoint import (
    CheckpointError,
    load_network,
    suggest_model,
)
from changecam.training.module import ChangeDetectionModule, DivergenceError
from helpers import REPO, compose_train, quiet_trainer, run_script, tiny_overrides

UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False`", "add_safe_globals")
# What a finished run, evaluation or prediction leaves; none may exist after a refusal.
FINISHED = (
    "metrics.json",
    "predictions.json",
    "explanations.json",
    "per_image.csv",
    "*.ckpt",
    "*.png",
)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def finished_outputs(folder: Path) -> list[str]:
    """The files under ``folder`` that look like the result of a finished command."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for pattern in FINISHED for p in folder.rglob(pattern))


def changecam_checkpoint(path: Path, net: nn.Module, lightning: bool = True) -> Path:
    """A checkpoint in changecam's format (network config and ``net.`` weights)."""
    obj = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    obj["net_config"] = net.config()
    if lightning:
        obj["pytorch-lightning_version"] = L.__version__
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def tiny_net(**kwargs) -> SiameseUNet:
    torch.manual_seed(0)
    return SiameseUNet(**{"in_channels": 3, "base_channels": 4, "depth": 2, **kwargs})


# --- bad checkpoint files: one table for the loader, eval/predict/explain and resume -------------


class MakeDirs:
    """A pickle whose loading would call ``os.makedirs`` (the issue's repro)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (str(self.target),))


def _nan_weights(path: Path) -> None:
    net = tiny_net()
    with torch.no_grad():
        net.encoder1.conv1.conv.weight[0, 0, 0, 0] = float("nan")
        net.bottleneck.bn.running_var.fill_(float("inf"))
    changecam_checkpoint(path, net)


def _truncated(path: Path) -> None:
    changecam_checkpoint(path, tiny_net())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _plain_pickle(path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f, protocol=4)


# name -> (writer, substrings of the message)
BAD_FILES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "empty": (
        lambda p: p.write_bytes(b""),
        ("not a readable PyTorch checkpoint", "the file is empty (0 bytes)"),
    ),
    "text": (
        lambda p: p.write_text("hello\n"),
        ("not a readable PyTorch checkpoint", "neither a torch.save file nor a pickle"),
    ),
    "truncated": (_truncated, ("not a readable PyTorch checkpoint", "damaged or cut short")),
    "plain_pickle": (
        _plain_pickle,
        (
            "not a readable PyTorch checkpoint",
            "a pickle that torch.load(weights_only=True) cannot read",
        ),
    ),
    "makedirs": (
        lambda p: torch.save({"state_dict": {}, "x": MakeDirs(p.parent / "pwned")}, p),
        (
            "needs pickled Python code",
            "the global os.makedirs",
            "do not load this file by other means",
        ),
    ),
    "module": (
        lambda p: torch.save(tiny_net(), p),
        ("needs pickled Python code", "the global changecam.models.siamese_unet.SiameseUNet"),
    ),
    "nan_weights": (
        _nan_weights,
        (
            "holds non-finite weights (NaN or inf) in encoder1.conv1.conv.weight, bottleneck.bn.running_var (2 of",
            "module.optimizer.lr",
        ),
    ),
}


def write_bad(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    writer, expected = BAD_FILES[case]
    path = tmp_path / "files" / f"{case}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path)
    return path, expected


def assert_refusal(err: BaseException, path: Path, expected: tuple[str, ...]) -> None:
    message = str(err)
    assert str(path) in message, message
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    for advice in UNSAFE_ADVICE:
        assert advice.lower() not in message.lower(), message
    shown = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    assert shown is None or not any(a in str(shown) for a in UNSAFE_ADVICE), "advice in the chain"
    assert "\x1b[" not in message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_the_loader_refuses_bad_files_naming_file_and_cause(tmp_path, case):
    path, expected = write_bad(tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        load_network(path, tiny_net().config())
    assert_refusal(err.value, path, expected)
    assert not (tmp_path / "files" / "pwned").exists(), "the pickle's code ran"


def test_torch_wordings_of_a_refusal_are_matched_case_insensitively(tmp_path):
    """Other torch versions word the refusal differently; the global is named either way."""
    from changecam.training.checkpoint import refused_global

    wordings = {
        "Unsupported global: GLOBAL os.makedirs was not an allowed global by default.": "os.makedirs",
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.": "posix.system",
        "WEIGHTS ONLY LOAD FAILED ... unsupported global: global builtins.eval WAS NOT AN ALLOWED GLOBAL": "builtins.eval",
        "Trying to call reduce for unrecognized function <built-in function exec>": "<built-in function exec>",
        "Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got <class 'foo.Bar'>": "<class 'foo.Bar'>",
    }
    for text, name in wordings.items():
        assert refused_global(pickle.UnpicklingError(text)) == name, text


@pytest.mark.parametrize(
    ("command", "case"),
    [
        ("eval", "nan_weights"),
        ("predict", "nan_weights"),
        ("explain", "nan_weights"),
        ("predict", "makedirs"),
        ("eval", "empty"),
    ],
)
def test_eval_predict_explain_refuse_before_any_output(tmp_path, tiny_synthetic, command, case):
    path, expected = write_bad(tmp_path, case)
    common = [f"ckpt_path={path}", "device=cpu"]
    run = {
        "eval": (
            evaluate,
            [
                *common,
                f"data.root={tiny_synthetic}",
                "data.synthetic=null",
                "data.patch_size=32",
                "logger=none",
            ],
        ),
        "predict": (
            predict,
            [*common, f"input.dir={tiny_synthetic / 'test'}", "sliding_window.window=32"],
        ),
        "explain": (explain, [*common, f"input.dir={tiny_synthetic / 'test'}"]),
    }[command]
    cfg = compose_train(tmp_path / "out", run[1], config_name=command)
    with pytest.raises(CheckpointError) as err:
        run[0](cfg)
    assert_refusal(err.value, path, expected)
    assert finished_outputs(tmp_path / "out") == []


def test_a_good_checkpoint_still_loads_through_the_shared_loader(tmp_path):
    net = tiny_net()
    path = changecam_checkpoint(tmp_path / "good.ckpt", net)
    cfg = compose_train(tmp_path / "out", [f"ckpt_path={path}"], config_name="predict")
    loaded, _ = load_model(cfg)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


# --- resume: train.py ckpt_path=<file> gets the same checks before Lightning reads it ------------


def resume_cfg(tmp_path: Path, synthetic: Path, ckpt: Path, *extra: str):
    return compose_train(
        tmp_path / "run",
        [
            "experiment=quickstart",
            *tiny_overrides(synthetic),
            "logger=none",
            "callbacks.cam_panels=null",
            "trainer.max_epochs=2",
            f"ckpt_path={ckpt}",
            *extra,
        ],
    )


@pytest.mark.parametrize("case", ["text", "empty", "makedirs", "nan_weights", "truncated"])
def test_resume_refuses_bad_files_before_lightning(tmp_path, tiny_synthetic, case):
    path, expected = write_bad(tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        train(resume_cfg(tmp_path, tiny_synthetic, path))
    assert str(err.value).startswith("cannot resume ckpt_path: ")
    assert_refusal(err.value, path, expected)
    assert finished_outputs(tmp_path / "run") == []


def test_resume_width_mismatch_suggests_what_eval_suggests(tmp_path, tiny_synthetic):
    path = changecam_checkpoint(tmp_path / "wide.ckpt", tiny_net(base_channels=8))
    with pytest.raises(CheckpointError) as err:
        train(resume_cfg(tmp_path, tiny_synthetic, path))  # the run's model: base_channels=4
    message = str(err.value)
    fits = (
        "a config that fits: model=siamese_unet model.in_channels=3 model.base_channels=8 "
        "model.depth=2"
    )
    assert message.endswith(fits) and str(path) in message
    assert (
        "shape mismatches: encoder1.conv1.conv.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3)"
        in message
    )
    assert message.count("\n") < 10, "a summary, not one line per tensor"
    with pytest.raises(CheckpointError) as eval_err:
        load_network(path, tiny_net().config())  # eval/predict with the same wrong model
    assert str(eval_err.value).endswith(fits)
    assert finished_outputs(tmp_path / "run") == []


def test_resume_from_a_plain_state_dict_says_what_resuming_needs(tmp_path, tiny_synthetic):
    path = tmp_path / "weights.pth"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(
        CheckpointError, match="plain state_dict, not a checkpoint written by train.py"
    ) as err:
        train(resume_cfg(tmp_path, tiny_synthetic, path))
    assert str(path) in str(err.value) and "last.ckpt" in str(err.value)
    assert f"module.init_from={path}" in str(err.value)
    assert "model=siamese_unet" in str(err.value)  # the config that fits it
    assert finished_outputs(tmp_path / "run") == []


# --- divergence ---------------------------------------------------------------------------------


def diverging(synthetic: Path) -> list[str]:
    """The issue's repro made tiny: quickstart with lr=1e6 for three epochs."""
    return [
        "experiment=quickstart",
        *tiny_overrides(synthetic),
        "logger=none",
        "callbacks.cam_panels=null",
        "module.optimizer.lr=1e6",
        "trainer.max_epochs=3",
    ]


@pytest.mark.parametrize(
    ("extra", "moment"),
    [
        ([], "before validation at epoch 0"),
        (["+trainer.limit_val_batches=0"], "after the training epoch at epoch 0"),  # no validation
    ],
)
def test_a_diverged_run_stops_naming_epoch_cause_and_tensors(
    tmp_path, tiny_synthetic, extra, moment
):
    with pytest.raises(FloatingPointError) as err:
        train(compose_train(tmp_path, [*diverging(tiny_synthetic), *extra]))
    message = str(err.value)
    assert moment in message
    assert "module.optimizer.lr=1e+06 is probably too high" in message
    assert "non-finite values" in message and "running_var" in message
    assert finished_outputs(tmp_path / "run") == [], "no best.ckpt, last.ckpt or metrics.json"


class Exploding(nn.Module):
    """A network with finite but huge weights: its logits overflow to +-inf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1e38)
            self.conv.bias.zero_()

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        return self.conv(torch.cat([pre, post - 2 * pre], 1)) * 10


def overflow_batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    pre, post = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    return [{"pre": pre, "post": post, "mask": mask, "name": ["a", "b"]}]


def test_a_nan_validation_loss_stops_evaluation_with_finite_weights(tmp_path):
    module = ChangeDetectionModule(Exploding(), loss="bce")
    with pytest.raises(DivergenceError) as err:
        quiet_trainer(enable_checkpointing=False).validate(
            module, DataLoader(overflow_batches(), batch_size=None), verbose=False
        )
    message = str(err.value)
    assert "val/loss is nan when evaluating (validate) the loaded weights" in message
    assert "the weights are finite" in message


def test_non_finite_logits_stop_an_evaluation_without_a_loss(tmp_path):
    """eval.py on a plain state_dict has no loss whose NaN would tell; the scores count a NaN
    probability as no change."""
    module = ChangeDetectionModule(Exploding(), loss=None)
    with pytest.raises(
        DivergenceError,
        match=r"^\d+ of the network's val logits are not finite when evaluating \(validate\) "
        "the loaded weights; the weights are finite",
    ):
        quiet_trainer(enable_checkpointing=False).validate(
            module, DataLoader(overflow_batches(), batch_size=None), verbose=False
        )


def test_a_nan_in_the_sanity_check_stops_before_training(tmp_path):
    module = ChangeDetectionModule(
        Exploding(), optimizer=lambda params: torch.optim.SGD(params, lr=0.1), loss="bce"
    )
    loader = DataLoader(overflow_batches(), batch_size=None)
    checkpoint = FiniteModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/f1", mode="max"
    )
    with pytest.raises(
        DivergenceError, match="val/loss is nan in the sanity check before training"
    ):
        quiet_trainer(max_epochs=1, callbacks=[checkpoint]).fit(module, loader, loader)
    assert finished_outputs(tmp_path) == []


class ScoreLogger(L.LightningModule):
    """A real module that logs a given val/f1 per epoch (to test the checkpoint callback)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.layer = nn.Linear(1, 1)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.layer(batch).sum()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.log("val/f1", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def best_checkpoint(folder: Path) -> FiniteModelCheckpoint:
    """``best.ckpt`` in ``folder``, by the highest val/f1 (as conf/callbacks keeps it)."""
    return FiniteModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor="val/f1",
        mode="max",
        enable_version_counter=False,
    )


def best_and_last(folder: Path) -> list[L.Callback]:
    """:func:`best_checkpoint` and a ``last.ckpt`` beside it, as a run's folder holds them."""
    last = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=folder, filename="last", enable_version_counter=False
    )
    return [best_checkpoint(folder), last]


@pytest.mark.parametrize(
    ("scores", "best_epoch"),
    [
        ([float("nan"), 0.5, 0.25], 1),
        ([float("nan"), float("nan")], None),
        ([0.5, float("nan")], 0),
    ],
)
def test_a_nan_score_never_becomes_best(tmp_path, scores, best_epoch):
    checkpoint = best_checkpoint(tmp_path)
    loader = DataLoader(torch.ones(2, 1), batch_size=1)
    trainer = quiet_trainer(max_epochs=len(scores), callbacks=[checkpoint], num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="val/f1=nan at epoch"):
        trainer.fit(ScoreLogger(scores), loader, loader)
    best = tmp_path / "best.ckpt"
    if best_epoch is None:
        assert not best.exists() and checkpoint.best_model_path == ""
    else:
        saved = torch.load(best, weights_only=True)
        assert saved["epoch"] == best_epoch and checkpoint.best_model_score == scores[best_epoch]


def test_a_run_resumed_into_another_folder_keeps_the_earlier_best(tmp_path):
    """ckpt_path=<another run's last.ckpt>: Lightning forgets the best score when the folder
    changes, so the first validation after the resume became best.ckpt however bad it was
    (helper-82). The earlier best is copied in with its score and stays the best."""
    scores = [0.8, 0.3, 0.5]
    loader = DataLoader(torch.ones(2, 1), batch_size=1)

    first = best_and_last(tmp_path / "first")
    quiet_trainer(max_epochs=1, callbacks=first, num_sanity_val_steps=0).fit(
        ScoreLogger(scores), loader, loader
    )
    second = best_and_last(tmp_path / "second")
    quiet_trainer(max_epochs=3, callbacks=second, num_sanity_val_steps=0).fit(
        ScoreLogger(scores), loader, loader, ckpt_path=tmp_path / "first/last.ckpt"
    )
    best = second[0]
    assert best.best_model_path == str(tmp_path / "second/best.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.8)
    assert torch.load(tmp_path / "second/best.ckpt", weights_only=True)["epoch"] == 0
    assert (tmp_path / "first/best.ckpt").is_file()  # copied, not moved
    scoring = best_and_last(tmp_path / "scoring")  # train=false: only scores (helper-83)
    quiet_trainer(callbacks=scoring).validate(
        ScoreLogger(scores), loader, ckpt_path=tmp_path / "first/last.ckpt", verbose=False
    )
    assert not (tmp_path / "scoring").exists()


def test_a_checkpoint_of_lightnings_own_model_checkpoint_keeps_its_best_when_resumed(tmp_path):
    """changecam wrote its checkpoints with Lightning's ModelCheckpoint before 2026-12-01: its
    state, under that class's key, was never read by FiniteModelCheckpoint, so a resume into
    another folder forgot the earlier best (helper-193)."""
    from changecam.training.callbacks.step_checkpoint import StepCheckpoint

    def best_and_last(folder: Path) -> list[L.Callback]:  # changecam's own classes, as train.py
        last = StepCheckpoint(dirpath=folder, filename="last", enable_version_counter=False)
        return [best_checkpoint(folder), last]

    scores = [0.8, 0.3, 0.5]
    loader = DataLoader(torch.ones(2, 1), batch_size=1)
    first = best_and_last(tmp_path / "first")
    quiet_trainer(max_epochs=1, callbacks=first, num_sanity_val_steps=0).fit(
        ScoreLogger(scores), loader, loader
    )
    last = torch.load(tmp_path / "first/last.ckpt", weights_only=True)
    own = [callback.state_key for callback in first]  # best's and last's
    assert own[0].startswith("FiniteModelCheckpoint{") and own[1].startswith("StepCheckpoint{")
    legacy_keys = {k: "ModelCheckpoint" + k[k.index("{") :] for k in own}
    last["callbacks"] = {legacy_keys[k]: v for k, v in last["callbacks"].items() if k in own}
    torch.save(last, tmp_path / "first/last.ckpt")
    second = best_and_last(tmp_path / "second")
    quiet_trainer(max_epochs=3, callbacks=second, num_sanity_val_steps=0).fit(
        ScoreLogger(scores), loader, loader, ckpt_path=tmp_path / "first/last.ckpt"
    )
    assert float(second[0].best_model_score) == pytest.approx(0.8)
    assert torch.load(tmp_path / "second/best.ckpt", weights_only=True)["epoch"] == 0
    # changecam's module puts the state under the callback's own key before Lightning looks:
    # it warned "Please add the following callbacks" for the state just read (helper-195)
    from changecam.models import SiameseUNet
    from changecam.training.module import ChangeDetectionModule

    module = ChangeDetectionModule(SiameseUNet(3, 4, 2))
    module.trainer = quiet_trainer(callbacks=best_and_last(tmp_path / "third"))
    legacy = torch.load(tmp_path / "first/last.ckpt", weights_only=True)
    module.on_load_checkpoint(legacy)
    assert sorted(legacy["callbacks"]) == sorted(own)


def test_a_run_folder_moved_with_its_checkpoints_keeps_its_best_when_resumed(tmp_path):
    """``mv run moved`` and ``ckpt_path=last`` there: the recorded best was looked for at its
    old path only, called gone, and the first validation after the resume became best.ckpt;
    the run then scored a file that no longer existed (helper-115). The best kept in the moved
    folder stays the best; a best that is really gone is not scored."""
    scores = [0.8, 0.3, 0.5]
    loader = DataLoader(torch.ones(2, 1), batch_size=1)

    quiet_trainer(
        max_epochs=2, callbacks=best_and_last(tmp_path / "run"), num_sanity_val_steps=0
    ).fit(ScoreLogger(scores), loader, loader)
    (tmp_path / "run").rename(tmp_path / "moved")
    own = (tmp_path / "moved/best.ckpt").read_bytes()
    # another run in the old folder: its best.ckpt is not the moved run's (helper-116)
    quiet_trainer(
        max_epochs=1, callbacks=best_and_last(tmp_path / "run"), num_sanity_val_steps=0
    ).fit(ScoreLogger([0.1]), loader, loader)
    assert (tmp_path / "run/best.ckpt").read_bytes() != own
    moved = best_and_last(tmp_path / "moved")
    quiet_trainer(max_epochs=3, callbacks=moved, num_sanity_val_steps=0).fit(
        ScoreLogger(scores), loader, loader, ckpt_path=tmp_path / "moved/last.ckpt"
    )
    assert moved[0].best_model_path == str(tmp_path / "moved/best.ckpt")
    assert float(moved[0].best_model_score) == pytest.approx(0.8)
    assert torch.load(tmp_path / "moved/best.ckpt", weights_only=True)["epoch"] == 0
    assert (tmp_path / "moved/best.ckpt").read_bytes() == own

    (tmp_path / "moved/best.ckpt").unlink()  # gone: counted anew, the stale path not kept
    (tmp_path / "moved").rename(tmp_path / "again")
    again = best_and_last(tmp_path / "again")
    with pytest.warns(UserWarning, match="is gone"):
        quiet_trainer(callbacks=again, max_epochs=3, num_sanity_val_steps=0).fit(
            ScoreLogger(scores), loader, loader, ckpt_path=tmp_path / "again/last.ckpt"
        )
    assert again[0].best_model_path == ""


def test_a_best_checkpoint_is_taken_only_where_it_records_its_score(tmp_path):
    """Resumed into a new folder from a moved run's last.ckpt, the best was looked for at its
    recorded path only (gone, or another run's file there); a last.ckpt copied alone into a
    folder holding an unrelated best.ckpt adopted that file (helper-117). The best is taken
    beside the checkpoint resumed, where it was recorded, or here, and only from a file whose
    own state records its score."""
    scores = [0.8, 0.3, 0.5]
    loader = DataLoader(torch.ones(2, 1), batch_size=1)

    def fit(folder: Path, epochs: int, ckpt: Path | None = None, run_scores=scores):
        made = best_and_last(folder)
        quiet_trainer(max_epochs=epochs, callbacks=made, num_sanity_val_steps=0).fit(
            ScoreLogger(run_scores), loader, loader, ckpt_path=ckpt
        )
        return made[0]

    fit(tmp_path / "run", 2)
    (tmp_path / "run").rename(tmp_path / "moved")
    own = (tmp_path / "moved/best.ckpt").read_bytes()
    fit(tmp_path / "run", 1, run_scores=[0.1])  # another run where the best was recorded
    best = fit(tmp_path / "fresh", 3, tmp_path / "moved/last.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.8)
    assert (tmp_path / "fresh/best.ckpt").read_bytes() == own

    fit(tmp_path / "a", 2)
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a/last.ckpt", tmp_path / "c/last.ckpt")
    shutil.copy(tmp_path / "run/best.ckpt", tmp_path / "c/best.ckpt")  # an unrelated best
    best = fit(tmp_path / "c", 3, tmp_path / "c/last.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.8)
    assert (tmp_path / "c/best.ckpt").read_bytes() == (tmp_path / "a/best.ckpt").read_bytes()
    # an unrelated best of the very same score beside it: the recorded one (helper-120)
    fit(tmp_path / "tie", 1, run_scores=[0.8])
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a/last.ckpt", tmp_path / "d/last.ckpt")
    shutil.copy(tmp_path / "tie/best.ckpt", tmp_path / "d/best.ckpt")
    fit(tmp_path / "e", 3, tmp_path / "d/last.ckpt")
    assert (tmp_path / "e/best.ckpt").read_bytes() == (tmp_path / "a/best.ckpt").read_bytes()


def test_the_default_callbacks_use_the_finite_checkpoint(tmp_path, tiny_synthetic):
    cfg = compose_train(tmp_path, ["experiment=quickstart", *tiny_overrides(tiny_synthetic)])
    assert cfg.callbacks.model_checkpoint._target_.endswith("FiniteModelCheckpoint")


@pytest.mark.slow
def test_train_py_divergence_exits_non_zero_with_the_message(tmp_path, tiny_synthetic):
    proc = run_script(
        "train.py",
        [*diverging(tiny_synthetic), f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "module.optimizer.lr=1e+06 is probably too high" in out and "at epoch 0" in out
    assert finished_outputs(tmp_path / "run") == []


@pytest.mark.slow
def test_predict_py_refuses_nan_weights(tmp_path, tiny_synthetic):
    path, _ = write_bad(tmp_path, "nan_weights")
    proc = run_script(
        "predict.py",
        [
            f"ckpt_path={path}",
            f"input.dir={tiny_synthetic / 'test'}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        check=False,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"{path} holds non-finite weights" in out, out[-3000:]
    assert finished_outputs(tmp_path / "run") == []


# --- the model= that fits, for any architecture of conf/model/ ----------------------------------


class TinyEarlyFusion(ChangeNetwork):
    """An early-fusion network standing in for an architecture changecam's code does not know."""

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 2) -> None:
        super().__init__()
        layers, cin = [], 2 * in_channels
        for k in range(depth):
            layers.append(nn.Conv2d(cin, base_channels * 2**k, 3, padding=1))
            cin = base_channels * 2**k
        self.stages = nn.ModuleList(layers)
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        x = torch.cat([pre, post], 1)
        for layer in self.stages:
            x = torch.relu(layer(x))
        return self.head(x)


@pytest.fixture
def conf_with_new_presets(tmp_path, monkeypatch) -> Path:
    """conf/ plus a new architecture's preset, one that needs a user target, and a broken one."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "model" / "tiny_ef.yaml").write_text(
        f"_target_: {__name__}.TinyEarlyFusion\nin_channels: 3\nbase_channels: 16\ndepth: 2\n"
    )
    (conf / "model" / "external.yaml").write_text("_target_: some.user.Model\ntarget: ???\n")
    (conf / "model" / "broken.yaml").write_text("_target_: [unclosed\n")
    monkeypatch.setenv("CHANGECAM_CONFIG_DIR", str(conf))
    return conf


@pytest.mark.parametrize(
    ("net", "expected"),
    [
        (
            lambda: TinyEarlyFusion(3, 6, 2),
            "model=tiny_ef model.in_channels=3 model.base_channels=6",
        ),
        (
            lambda: TinyEarlyFusion(4, 16, 3),
            "model=tiny_ef model.in_channels=4 model.base_channels=16 model.depth=3",
        ),
        (lambda: TinyEarlyFusion(), "model=tiny_ef"),
        (lambda: SiameseUNet(3, 64, 4, "concat", shared_encoder=False), "model=siamese_unet_seed"),
        (
            lambda: SiameseUNet(3, 4, 2, "diff"),
            "model=siamese_unet model.in_channels=3 model.base_channels=4 model.depth=2 "
            "model.fusion=diff (or model.fusion=absdiff: the weights cannot tell diff from absdiff)",
        ),
        (
            lambda: SiameseUNet(3, 4, 2, "concat"),
            "model=siamese_unet model.in_channels=3 model.base_channels=4 model.depth=2",
        ),
    ],
)
def test_a_plain_state_dict_gets_the_model_that_fits(conf_with_new_presets, net, expected):
    assert suggest_model(net().state_dict()) == expected


def test_a_mismatch_names_the_new_architecture(tmp_path, conf_with_new_presets):
    path = tmp_path / "ef.pth"
    torch.save(TinyEarlyFusion(3, 6, 2).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_network(path, tiny_net().config())
    message = str(err.value)
    assert "missing keys: encoder1.conv1.conv.weight" in message
    assert "a config that fits: model=tiny_ef model.in_channels=3 model.base_channels=6" in message
    with pytest.raises(CheckpointError, match="the weights fit: model=tiny_ef model.in_channels=3"):
        load_network(path)  # no model= at all


def test_a_changecam_checkpoint_suggests_from_its_recorded_class(tmp_path, conf_with_new_presets):
    path = changecam_checkpoint(tmp_path / "ef.ckpt", TinyEarlyFusion(3, 8, 2))
    with pytest.raises(CheckpointError) as err:
        load_network(path, tiny_net().config())  # eval with a wrong model=
    assert "a config that fits: model=tiny_ef model.in_channels=3 model.base_channels=8" in str(
        err.value
    )
    assert isinstance(load_network(path), TinyEarlyFusion)  # and without model= it loads


def test_an_unknown_network_says_so(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="fits none of the networks of conf/model"):
        load_network(path, tiny_net().config())

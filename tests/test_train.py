"""Every experiment composes and runs (fast_dev_run); a run leaves its files; sweeps and errors."""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from changecam.cli.config_checks import HYDRA_KEYS, target_nodes
from changecam.cli.train import train
from changecam.explain import ExplainSettings
from changecam.training.callbacks.cam_panels import CamPanels
from helpers import REPO, compose_train, run_script, tiny_overrides
from wandb_offline import exit_code, history, job_type, summary

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_experiments_are_found():
    assert {"quickstart", "siamese_unet", "siamese_unet_seed"} <= set(EXPERIMENTS)


# arguments the code passes when it instantiates a node (train.py: the module gets the network)
SUPPLIED = {"module": {"net"}}


def signature_problems(path: str, node: dict) -> list[str]:
    """What is wrong with one ``_target_`` node: an unimportable target, keys its signature does
    not take, or (for nodes built as they are, not ``_partial_``) required arguments missing."""
    try:
        target = hydra.utils.get_object(node["_target_"])
    except Exception as err:  # report every node, not just the first
        return [f"{path}: {node['_target_']} does not import ({err})"]
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    keys = set(node) - HYDRA_KEYS
    problems = []
    if not any(p.kind == p.VAR_KEYWORD for p in params) and keys - names:
        problems.append(f"{path}: {node['_target_']} takes no {sorted(keys - names)}")
    required = {
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    missing = required - keys - SUPPLIED.get(path, set())
    if not node.get("_partial_") and missing:
        problems.append(f"{path}: {node['_target_']} needs {sorted(missing)}")
    return problems


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_overfit_runs_its_30_epochs_with_every_experiment(tmp_path, experiment):
    """real_small's early stopping ended debug=overfit at epoch 9 of its 30, silently
    (helper-158): the overfit check builds no early stopping."""
    from lightning.pytorch.callbacks import EarlyStopping

    from changecam.cli.common import instantiate_callbacks

    cfg = compose_train(tmp_path, [f"experiment={experiment}", "debug=overfit"])
    assert cfg.trainer.max_epochs == 30 and cfg.trainer.overfit_batches == 3
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert callbacks and not any(isinstance(c, EarlyStopping) for c in callbacks)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    """Every ``_target_`` of the composed config imports and takes its keys, and the groups
    train.py builds (data without prepare_data, network, module, callbacks, trainer) build."""
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    if cfg.data.root is None:  # a required data.root (experiment=real_small)
        cfg = compose_train(tmp_path, [f"experiment={experiment}", f"data.root={tmp_path}"])
    assert cfg.model._target_ == "changecam.models.SiameseUNet"
    assert cfg.trainer.max_epochs >= 1 and cfg.data.patch_size > 0

    nodes = dict(target_nodes(OmegaConf.to_container(cfg, resolve=False)))
    groups = {"data", "model", "module", "module.optimizer", "trainer", "trainer.plugins[0]"}
    assert groups | {"callbacks.model_checkpoint", "logger.wandb"} <= set(nodes)
    assert [p for path, node in nodes.items() for p in signature_problems(path, node)] == []

    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net)
    callbacks = [
        hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c and "_target_" in c
    ]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert isinstance(datamodule, L.LightningDataModule)
    assert datamodule.patch_size == cfg.data.patch_size and datamodule.root == Path(cfg.data.root)
    assert isinstance(net, nn.Module) and net.base_channels == cfg.model.base_channels
    assert isinstance(module, L.LightningModule) and module.net is net
    optimizers = module.configure_optimizers()  # the partial optimiser (and scheduler) nodes
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert type(optimizer) is hydra.utils.get_class(cfg.module.optimizer._target_)
    assert optimizer.defaults["lr"] == cfg.module.optimizer.lr
    if cfg.module.scheduler is None:
        assert not isinstance(optimizers, dict)
    else:
        scheduler = optimizers["lr_scheduler"]["scheduler"]
        assert type(scheduler) is hydra.utils.get_class(cfg.module.scheduler._target_)
    callback_nodes = [n for n in nodes if n.startswith("callbacks.") and n.count(".") == 1]
    assert len(callbacks) == len(callback_nodes)
    cam_panels = [c for c in callbacks if isinstance(c, CamPanels)]
    assert len(cam_panels) == 1 and isinstance(cam_panels[0].settings, ExplainSettings)
    assert cam_panels[0].settings.threshold == cfg.module.threshold
    assert all(isinstance(c, L.Callback) for c in callbacks)
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs
    assert all(any(c is t for t in trainer.callbacks) for c in callbacks)
    checkpoint_io = hydra.utils.get_class(cfg.trainer.plugins[0]._target_)
    assert type(trainer.strategy.checkpoint_io) is checkpoint_io


@pytest.mark.parametrize("data", ["synthetic", "levir_cd"])
def test_the_overrides_the_readme_and_the_messages_name_need_no_plus(tmp_path, data):
    """``data.change_crops=`` (README) and ``trainer.gradient_clip_val=`` (the divergence
    guard's advice) are keys of the configs, not Hydra ``+`` additions."""
    cfg = compose_train(
        tmp_path,
        [
            f"data={data}",
            "data.train_protocol=random_crop",
            "data.change_crops=0.5",
            "trainer.gradient_clip_val=1.0",
        ],
    )
    assert hydra.utils.instantiate(cfg.data).change_crops == 0.5
    assert cfg.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_experiment(tmp_path, tiny_synthetic, levir256_tiny, experiment):
    overrides = [
        f"experiment={experiment}",
        "debug=fdr",
        "logger=none",
        *tiny_overrides(tiny_synthetic),
    ]
    if experiment != "quickstart":  # the LEVIR recipes run on the flat LEVIR-CD-256 fixture
        overrides += [f"data.root={levir256_tiny}", "data.layout=auto", "data.patch_size=64"]
    if experiment.startswith("real_small"):  # its own random crops (tiny_overrides: tiles)
        overrides.append("data.train_protocol=random_crop")
    if experiment == "siamese_unet_seed":
        overrides += [
            "model.base_channels=64",
            "model.depth=4",
            "data.batch_size=1",
            "data.eval_batch_size=1",
        ]
        overrides += ["data.train_protocol=resize", "data.eval_protocol=resize"]
    if experiment == "real_small_finetune":  # starts from a checkpoint it requires
        net = hydra.utils.instantiate(compose_train(tmp_path / "start", overrides).model)
        GlobalHydra.instance().clear()
        torch.save(net.state_dict(), tmp_path / "start.pt")
        overrides.append(f"module.init_from={tmp_path / 'start.pt'}")
    cfg = compose_train(tmp_path, overrides)
    metrics = train(cfg)
    assert {
        "val/f1",
        "val/iou",
        "test/f1",
        "test/precision",
        "test/recall",
        "test/accuracy",
    } <= set(metrics)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)


def test_short_run_leaves_checkpoints_metrics_and_wandb(tmp_path, tiny_synthetic):
    epochs = 3
    cfg = compose_train(
        tmp_path,
        [
            "experiment=quickstart",
            f"trainer.max_epochs={epochs}",
            "logger=many",
            "callbacks.cam_panels=null",
            # an early best epoch: the summary tells the best checkpoint from the last epoch
            "module.optimizer.lr=0.03",
            "module.pos_weight=5",
            *tiny_overrides(tiny_synthetic),
        ],
    )
    metrics = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (
        run / "checkpoints" / "last.ckpt"
    ).is_file()
    assert json.loads((run / "metrics.json").read_text())["val/f1"] == pytest.approx(
        metrics["val/f1"]
    )
    (offline,) = (run / "wandb").glob("offline-run-*")  # an offline W&B run in the run folder
    assert exit_code(offline) == 0
    # the val/* history holds the epochs trained; the best checkpoint's scores, computed again
    # after the fit, are the run's summary, not one more epoch at a step never trained
    val_rows = [r for r in history(offline) if "val/f1" in r]
    assert [r["epoch"] for r in val_rows] == list(range(epochs))
    with (run / "csv/metrics.csv").open() as file:
        csv_val = [r for r in csv.DictReader(file) if r["val/f1"]]
    assert [int(r["epoch"]) for r in csv_val] == list(range(epochs))
    best_epoch = max(range(epochs), key=lambda e: val_rows[e]["val/f1"])
    assert best_epoch < epochs - 1  # else the summary would be the last epoch's either way
    assert metrics["val/f1"] == pytest.approx(val_rows[best_epoch]["val/f1"])
    shown = summary(offline)
    for key in ("val/f1", "val/loss", "val/recall"):
        assert shown[key] == pytest.approx(metrics[key])
    assert job_type(offline) == "train"


def test_a_fast_dev_run_puts_no_scores_into_wandb(tmp_path, tiny_synthetic):
    """Lightning gives a fast_dev_run a placeholder logger: the best checkpoint's scores,
    like its history, stay out of the W&B run (its summary got a one-batch val/f1, helper-170)."""
    overrides = ["experiment=quickstart", "debug=fdr", "logger=wandb"]
    train(compose_train(tmp_path, [*overrides, *tiny_overrides(tiny_synthetic)]))
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert exit_code(offline) == 0
    assert not [key for key in summary(offline) if key.startswith(("val/", "test/"))]


def test_a_failed_run_is_a_failed_wandb_run(tmp_path, tiny_synthetic):
    """task_wrapper finished the W&B run before W&B's own hook saw the exception, so a crash or
    a Ctrl-C showed as a successful run (exit code 0) once synced (helper-99)."""
    cfg = compose_train(
        tmp_path,
        [
            "experiment=quickstart",
            "trainer.max_epochs=2",
            "logger=wandb",
            *tiny_overrides(tiny_synthetic),
            "+callbacks.stop._target_=slow_steps.StopAt",
            "+callbacks.stop.at='1:0'",
        ],
    )
    with pytest.raises(SystemExit, match="stopped at step 1:0"):
        train(cfg)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert exit_code(offline) == 1


def test_checkpoint_is_weights_only_loadable_and_train_false_scores_it(
    tmp_path, tiny_synthetic, caplog
):
    base = [
        "experiment=quickstart",
        "trainer.max_epochs=1",
        "logger=none",
        *tiny_overrides(tiny_synthetic),
    ]
    # a model that predicts change (its scores are not all 0), trained and scored with
    # other values than the composed config's
    trained_with = ["module.pos_weight=20", "module.loss=bce", "module.threshold=0.4"]
    trained = train(compose_train(tmp_path, [*base, *trained_with]))
    best = tmp_path / "run/checkpoints/best.ckpt"
    ckpt = torch.load(best, weights_only=True, map_location="cpu")
    assert ckpt["net_config"]["_target_"] == "changecam.models.siamese_unet.SiameseUNet"
    assert ckpt["net_config"]["base_channels"] == 4
    # train=false with ckpt_path: that checkpoint's scores, not the initial weights', with the
    # loss, pos_weight and threshold it was trained and scored with (Lightning restores only
    # the weights: the config's were used, helper-147)
    with caplog.at_level("INFO"):
        scored = train(
            compose_train(tmp_path / "score", [*base, "train=false", f"ckpt_path={best}"])
        )
    assert scored == trained
    for used, composed in (
        ("threshold=0.4", "0.5"),
        ("loss=bce", "bce_dice"),
        ("pos_weight=20", "None"),
    ):
        assert (
            f"train=false uses {best}'s module.{used}, as it was trained and scored (the "
            f"config's {composed} is not used" in caplog.text
        )
    # one given on the command line (or by a sweep) is used as given, with a warning
    caplog.clear()
    given = train(
        compose_train(
            tmp_path / "given",
            [*base, *trained_with[:2], "module.threshold=0.95", "train=false", f"ckpt_path={best}"],
        )
    )
    assert (
        "trained and scored with module.threshold=0.4; train=false uses module.threshold=0.95 "
        "as given" in caplog.text
    )
    assert given["val/loss"] == trained["val/loss"] and given["val/recall"] < trained["val/recall"]
    initial = train(compose_train(tmp_path / "initial", [*base, *trained_with, "train=false"]))
    assert initial["val/loss"] != trained["val/loss"]
    # a resume goes on with them too: it trained and scored at the config's 0.5 (helper-193)
    caplog.clear()
    with caplog.at_level("INFO"):
        train(compose_train(tmp_path, [*base, "ckpt_path=last", "trainer.max_epochs=2"]))
    assert (
        "the resumed run uses" in caplog.text and "module.threshold=0.4, as it was" in caplog.text
    )
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert {k: last["hyper_parameters"][k] for k in ("threshold", "loss", "pos_weight")} == {
        "threshold": 0.4,
        "loss": "bce",
        "pos_weight": 20,
    }


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``train.py`` expected to fail: the exit status and short error messages are checked."""
    return run_script("train.py", args, cwd, timeout, check=False, env={"HYDRA_FULL_ERROR": "0"})


def test_levir_experiment_without_data_fails_fast_with_help(tmp_path):
    proc = run_cli(
        ["experiment=siamese_unet", f"paths.data_dir={tmp_path}", "logger=none"], cwd=tmp_path
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert str(tmp_path / "LEVIR-CD") in out
    assert "{train,val,test}/{A,B,label}" in out and "data=synthetic" in out and "LEVIR" in out
    # fast: it stops before fitting starts (no wall-clock bound: the machine may be slow)
    assert "Trainable params" not in out and not list(tmp_path.rglob("*.ckpt"))


def test_config_typo_is_rejected(tmp_path):
    proc = run_cli(["experiment=quickstart", "model.fusoin=diff"], cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "fusoin" in proc.stderr


@pytest.mark.slow
def test_multirun_sweep(tmp_path, tiny_synthetic):
    args = [
        "-m",
        "experiment=quickstart",
        "model.fusion=diff,concat",
        "trainer.max_epochs=1",
        "logger=none",
    ]
    args += [o for o in tiny_overrides(tiny_synthetic)] + [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    overrides = [(r.parent / ".hydra" / "overrides.yaml").read_text() for r in runs]
    assert any("model.fusion=diff" in o for o in overrides) and any(
        "model.fusion=concat" in o for o in overrides
    )


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.change_crops=1.0", r"data.change_crops=1.0 places training crops, but .*tiles"),
        ("data.crops_per_image=50", r"data.crops_per_image=50 counts random crops"),
        # 0 meant "as many as tiles" and -1 no crop of the dataset's own images (helper-81)
        ("data.crops_per_image=0", r"data.crops_per_image=0 must be a whole number of crops"),
        ("data.crops_per_image=-1", r"data.crops_per_image=-1 must be a whole number"),
        ("data.augment.jitter=-0.2", r"data.augment.jitter=-0.2 must be a strength >= 0"),
    ],
)
def test_crop_settings_the_protocol_would_ignore_are_refused(tmp_path, override, match):
    """Under the default tiles protocol they changed nothing, silently (helper-69)."""
    cfg = compose_train(tmp_path, ["experiment=quickstart", override])
    with pytest.raises(hydra.errors.InstantiationException, match=match):
        hydra.utils.instantiate(cfg.data)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("++data.augment.hfilp=0.0", r"data.augment.hfilp: unknown key \(did you mean 'hflip'\?\)"),
        ("data.augment.hflip=abc", r"data.augment.hflip='abc' must be a number"),
        (
            "++data.synthetic.trian=2",
            r"data.synthetic.trian: unknown key \(did you mean 'train'\?\)",
        ),
        ("data.synthetic.train=2.5", r"data.synthetic.train=2.5 must be an integer"),
    ],
)
def test_keys_of_the_nested_data_blocks_are_named(tmp_path, override, match):
    """The config guards check each _target_'s own arguments, not the blocks they build into
    dataclasses: a typo gave a TypeError naming neither key nor block (helper-73)."""
    cfg = compose_train(tmp_path, ["experiment=quickstart", override])
    with pytest.raises(hydra.errors.InstantiationException, match=match):
        hydra.utils.instantiate(cfg.data)


def test_adopting_a_checkpoints_settings_is_said_by_rank_zero_only(tmp_path, caplog, monkeypatch):
    """Every DDP rank of a resume adopts the recorded threshold; each said so (helper-195)."""
    from omegaconf import OmegaConf

    import changecam.cli.train as train_module

    torch.save({"hyper_parameters": {"threshold": 0.4}}, tmp_path / "last.ckpt")
    for rank_zero, said in ((True, 1), (False, 0)):
        cfg = OmegaConf.create({"train": True, "module": {"threshold": 0.5}})
        monkeypatch.setattr(train_module, "is_rank_zero", lambda r=rank_zero: r)
        caplog.clear()
        with caplog.at_level("WARNING"):
            train_module.score_as_trained(cfg, str(tmp_path / "last.ckpt"))
        assert cfg.module.threshold == 0.4
        assert len([r for r in caplog.records if "the resumed run uses" in r.getMessage()]) == said

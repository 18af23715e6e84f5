"""Guards: a non-finite loss stops training naming step and samples; config typos and invalid
values fail at start with the allowed values; device switches work or say why not."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import DataLoader

from changecam.cli.config_checks import ConfigError, check_device, check_value
from changecam.cli.train import check_training_settings, train
from changecam.models import SiameseUNet
from changecam.training.module import ChangeDetectionModule, NonFiniteLossError
from helpers import PLATEAU, compose_train, run_script, tiny_overrides


def tiny(synthetic) -> list[str]:
    return [
        "experiment=quickstart",
        *tiny_overrides(synthetic),
        "logger=none",
        "callbacks.cam_panels=null",
    ]


def batch(name: str, value: float = 0.5) -> dict:
    pre = torch.full((2, 3, 16, 16), value)
    return {
        "pre": pre,
        "post": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
        "mask": torch.zeros(2, 1, 16, 16),
        "name": [f"{name}_0", f"{name}_1"],
    }


def test_nan_loss_stops_training_naming_step_and_samples():
    torch.manual_seed(0)
    module = ChangeDetectionModule(
        SiameseUNet(3, 4, 2), optimizer=functools.partial(torch.optim.SGD, lr=0.01)
    )
    batches = [batch("good"), batch("corrupt", float("nan")), batch("never")]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    message = str(err.value)
    assert "training loss is nan at global step 1 (epoch 0, batch 1)" in message
    assert "corrupt_0, corrupt_1" in message and "good_0" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.fusion=dif", "model.fusion='dif' is not allowed; expected one of 'concat', 'diff', 'absdiff'"),
        ("module.loss=focal", "module.loss='focal' is not allowed; expected one of 'bce', 'dice', 'bce_dice'"),
        ("data.train_protocol=tile", "data.train_protocol='tile' is not allowed; expected one of 'tiles', 'random_crop', 'resize', 'full'"),
        ("data.layout=flat", "data.layout='flat' is not allowed; expected one of 'auto', 'levir', 'levir256'"),
        ("module.scheduler_interval=batch", "expected one of 'epoch', 'step'"),
        ("trainer.precision=15-mixed", "trainer.precision='15-mixed' is not allowed; expected one of 64, 32, 16, "),
        ("trainer.deterministic=maybe", "trainer.deterministic='maybe' is not allowed; expected one of 'warn' or bool or None"),
        ("module.channels_last=yes", "module.channels_last='yes' is not allowed; expected bool"),
        ("data.patch_size=31.5", "data.patch_size=31.5 is not allowed; expected int"),
        ("++model.fusoin=diff", "model.fusoin: unknown key for changecam.models.SiameseUNet (did you mean 'fusion'?); allowed keys: in_channels, base_channels, depth, fusion, shared_encoder"),
        ("++trainer.max_epoch=3", "trainer.max_epoch: unknown key for lightning.pytorch.trainer.Trainer (did you mean 'max_epochs'?)"),
        ("++module.optimizer.learning_rate=0.1", "module.optimizer.learning_rate: unknown key for torch.optim.AdamW"),
        # outside every _target_ node: compared with the config as composed without them
        ("++trian=false", "trian: unknown key (+/++ added it, but nothing reads it; did you mean 'train'?)"),
        ("+ckpt_pth=x", "ckpt_pth: unknown key (+/++ added it, but nothing reads it; did you mean 'ckpt_path'?)"),
    ],
)  # fmt: skip
def test_invalid_config_fails_at_start_with_allowed_values(
    tmp_path, tiny_synthetic, override, expected
):
    cfg = compose_train(tmp_path, [*tiny(tiny_synthetic), override])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert expected in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.parametrize(
    "overrides",
    [
        ["++threshold=0.3"],  # a key the eval config has: an override like any other
        ["+run_label=x", "task_name=${run_label}"],  # an interpolation reads the added key
        ["+run={label: x}", "task_name=${run.label}"],  # or a part of it (helper-77)
        ["+labels=[a,b]", "task_name=${labels[0]}"],
        ["++tags.0=foo"],  # a list item
        ["+logger@logger.csv2=csv"],  # a config group under another package
        ["+data.extra=1"],  # inside a _target_ node: left to its signature check
    ],
    ids=["existing", "interpolated", "part", "item", "list-item", "group", "in-target"],
)
def test_legitimate_added_keys_pass_the_added_key_check(tmp_path, overrides):
    from changecam.cli.config_checks import added_key_problems, resolved

    cfg = compose_train(tmp_path, ["ckpt_path=x.ckpt", *overrides], "eval")
    assert added_key_problems(cfg, resolved(cfg)) == []


@pytest.mark.parametrize(
    ("command", "override"),
    [
        ("train", "+max_epochs=1"),  # ${trainer.max_epochs} reads trainer's, not this one
        ("train", "+data_dir=/x"),  # ${paths.data_dir}
        ("eval", "+patch_size=64"),  # ${data.patch_size}
    ],
)
def test_added_keys_that_only_end_an_interpolations_path_are_refused(tmp_path, command, override):
    """helper-73: train.py +max_epochs=1 trained 2 epochs, accepted because an interpolation
    ended in the key's name."""
    from changecam.cli.config_checks import added_key_problems, resolved

    extra = ["ckpt_path=x.ckpt"] if command == "eval" else []
    cfg = compose_train(tmp_path, [*extra, override], command)
    problems = added_key_problems(cfg, resolved(cfg))
    assert len(problems) == 1 and override.lstrip("+").split("=")[0] in problems[0]


def test_all_errors_are_listed_together_on_the_command_line(tmp_path):
    proc = run_script(
        "train.py",
        ["experiment=quickstart", "model.fusion=dif", "module.loss=dice2"],
        cwd=tmp_path,
        timeout=120,
        check=False,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode != 0
    assert "model.fusion='dif' is not allowed" in proc.stderr
    assert "module.loss='dice2' is not allowed" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "data").exists()
    # reported once, without a traceback on the console; the traceback is in the log file
    assert proc.stderr.count("model.fusion='dif' is not allowed") == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    logs = list(tmp_path.rglob("quickstart.log"))
    assert logs and "Traceback" in logs[0].read_text()


QUICK_CHECK = """
import sys
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from changecam.cli.config_checks import ConfigError
from changecam.cli.launch import config_dir, run_task
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose("train", ["experiment=quickstart", "model.fusion=dif"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
try:
    run_task("changecam.cli.train:train_and_score", cfg)
except ConfigError as err:
    heavy = sorted(m for m in ("torch", "lightning") if m in sys.modules)
    print("refused", "model.fusion='dif'" in str(err), heavy)
"""


def test_changecam_config_errors_fail_before_torch_and_lightning_are_imported(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", QUICK_CHECK],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "refused True []", proc.stderr[-2000:]


def test_the_source_signatures_agree_with_the_imported_ones():
    """The quick check reads changecam's targets from source; it must see what import sees."""
    from omegaconf import OmegaConf

    from changecam.cli.config_checks import imported_signature, static_signature, target_nodes
    from changecam.cli.launch import config_dir

    targets = set()
    for path in Path(config_dir()).rglob("*.yaml"):
        tree = OmegaConf.to_container(OmegaConf.load(path))
        targets |= {node["_target_"] for _, node in target_nodes(tree)}
    checked = 0
    for target in sorted(t for t in targets if t.startswith("changecam.")):
        static, imported = static_signature(target), imported_signature(target)
        if static is None:  # inherited constructors are left to the full check
            continue
        checked += 1
        assert static.named == imported.named, target
        assert static.takes_any_key == imported.takes_any_key, target
        for key, hint in static.hints.items():
            for value in ("zz-not-a-choice", 3, None, True):
                assert check_value(value, hint) == check_value(value, imported.hints[key]), (
                    target,
                    key,
                    value,
                )
    assert checked >= 6


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.precision=16-mixed"], "float16 needs a CUDA GPU and this run uses the CPU"),
        (["trainer=ddp_cpu", "trainer.sync_batchnorm=true"], "SyncBatchNorm runs on GPUs only"),
        (
            ["trainer.accelerator=gpu"],
            "trainer.accelerator=gpu: this machine has no usable CUDA GPU",
        ),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine says")
def test_device_switches_say_why_not_on_this_machine(tmp_path, tiny_synthetic, overrides, expected):
    cfg = compose_train(tmp_path, [*tiny(tiny_synthetic), *overrides])
    with pytest.raises(ConfigError, match="not possible on this machine") as err:
        train(cfg)
    assert expected in str(err.value)


def test_compile_without_a_cpp_compiler_says_so(tmp_path, tiny_synthetic, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an environment without g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    cfg = compose_train(
        tmp_path, [*tiny(tiny_synthetic), "trainer.accelerator=cpu", "module.compile=true"]
    )
    with pytest.raises(ConfigError, match="torch.compile .* needs a C\\+\\+ compiler"):
        check_device(cfg)
    # Inductor takes $CXX or g++ alone: a c++ on the PATH does not make it compile (helper-175)
    real = shutil.which("c++", path=os.defpath)
    if real is None:
        pytest.skip("this machine has no c++ to put on the PATH")
    (tmp_path / "c++").symlink_to(real)
    with pytest.raises(ConfigError, match="torch.compile .* needs a C\\+\\+ compiler"):
        check_device(cfg)
    monkeypatch.setenv("CXX", "c++")
    check_device(cfg)  # named in CXX, it is the one Inductor uses
    gxx = shutil.which("g++", path=os.defpath)
    if gxx is None:
        pytest.skip("this machine has no g++ to put on the PATH")
    (tmp_path / "g++").symlink_to(gxx)
    monkeypatch.delenv("CXX")
    check_device(cfg)  # g++, Inductor's default
    monkeypatch.setenv("CXX", "")  # set empty, Inductor takes it as it is, and fails
    with pytest.raises(ConfigError, match="CXX='', the one it uses, is not a command on the PATH"):
        check_device(cfg)


class FormatProbe(L.Callback):
    """What reaches the network's convolutions during training steps, written as JSON to
    ``path`` when training ends (a config callback: ``+callbacks.probe._target_=...``).

    Records the memory format of the network's inputs and of its 4-D convolution weights
    (those with more than one input channel and a kernel wider than 1x1, whose layout tells
    the formats apart) and the dtype of every ``Conv2d``/``ConvTranspose2d`` output.

    Args:
        path: the JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[str, set] = {"inputs": set(), "weights": set(), "conv_dtypes": set()}
        self.handles: list = []
        self.steps = 0
        self.in_step = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        self.handles.append(net.register_forward_pre_hook(self._inputs))
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                self.handles.append(m.register_forward_hook(self._conv))

    def _inputs(self, module: torch.nn.Module, args: tuple) -> None:
        if self.in_step:
            self.seen["inputs"] |= {
                x.is_contiguous(memory_format=torch.channels_last) for x in args
            }

    def _conv(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.in_step:
            self.seen["conv_dtypes"].add(str(output.dtype))

    def _weights(self, pl_module: L.LightningModule) -> None:
        self.seen["weights"] |= {
            p.is_contiguous(memory_format=torch.channels_last)
            for p in pl_module.net.parameters()
            if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._weights(pl_module)
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.in_step = False
        self.steps += 1
        self._weights(pl_module)  # after the optimiser step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()
        seen = {key: sorted(values) for key, values in self.seen.items()}
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps({"steps": self.steps, **seen}))


@pytest.mark.parametrize(
    ("overrides", "dtype", "channels_last"),
    [
        (["trainer.precision=bf16-mixed"], "torch.bfloat16", False),
        (["module.channels_last=true"], "torch.float32", True),
    ],
    ids=["bf16", "channels_last"],
)
def test_bf16_and_channels_last_train_on_the_cpu(
    tmp_path, tiny_synthetic, overrides, dtype, channels_last
):
    """Each switch takes effect in the training step, and only its own: bf16-mixed runs the
    convolutions in bfloat16 (in channels-first format), channels_last keeps the weights and
    the network's inputs channels-last (in float32)."""
    probe = [
        "+callbacks.probe._target_=test_guards.FormatProbe",
        "+callbacks.probe.path=${paths.output_dir}/format_probe.json",
    ]
    metrics = train(
        compose_train(tmp_path, [*tiny(tiny_synthetic), "debug=fdr", *overrides, *probe])
    )
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert 0 <= metrics["val/f1"] <= 1
    seen = json.loads((tmp_path / "run" / "format_probe.json").read_text())
    assert seen == {
        "steps": 1,
        "inputs": [channels_last],
        "weights": [channels_last],
        "conv_dtypes": [dtype],
    }


def test_compile_switch_compiles_the_network_in_place():
    module = ChangeDetectionModule(
        SiameseUNet(3, 4, 2), optimizer=functools.partial(torch.optim.SGD, lr=0.01), compile=True
    )
    keys = list(module.state_dict())
    module.setup("validate")
    assert module.net._compiled_call_impl is None  # only training is compiled
    module.setup("fit")
    assert module.net._compiled_call_impl is not None
    assert list(module.state_dict()) == keys  # checkpoints keep the network's keys


def test_check_value_reads_literal_union_and_plain_annotations():
    assert check_value("diff", Literal["concat", "diff"]) is None
    assert check_value("dif", Literal["concat", "diff"]) == "one of 'concat', 'diff'"
    assert check_value(None, Literal["a"] | None) is None
    assert check_value(True, bool | Literal["warn"]) is None
    assert check_value(1, bool) == "bool"
    assert check_value(True, int) == "int"  # a bool is no number here
    assert check_value(3, float) is None
    assert check_value("x", int | str) is None
    assert check_value([1, 2], int) is None  # lists are left to the constructors
    assert check_value("x", functools.partial) == "partial"


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["predict.resume=no"], "predict.resume='no' must be true or false"),
        (["predict.block_size=big"], "predict.block_size='big' must be a number"),
        (["predict.resume=true", "threshold=0.3"], None),
        (["threshold='0.3'", "sliding_window.window='64'"], None),  # text that reads as a number
        (["sliding_window.window=${oc.env:CHANGECAM_TEST_WINDOW,64}"], None),
        (["threshold=${oc.env:CHANGECAM_TEST_THR,0.3}"], None),  # an interpolation: text
        # text Python reads as true whatever it says
        (
            ["predict.resume=${oc.env:CHANGECAM_TEST_RESUME,false}"],
            "must be true or false (from an environment variable: "
            "predict.resume='${oc.decode:${oc.env:NAME}}')",
        ),
        (["predict.resume='${oc.decode:${oc.env:CHANGECAM_TEST_RESUME,false}}'"], None),
        (["predict.gdal_threads=2"], None),  # its default is null: its consumer checks it
    ],
)
def test_plain_keys_keep_their_defaults_type(tmp_path, overrides, problem):
    from changecam.cli.common import checked_threshold
    from changecam.cli.config_checks import ConfigError, check_config
    from helpers import compose_train

    cfg = compose_train(tmp_path, ["ckpt_path=x.ckpt", "input.dir=.", *overrides], "predict")
    if problem is None:
        check_config(cfg, import_targets=False)
        # threshold's default is null: its consumer reads text that reads as a number
        given = any(o.startswith("threshold=") for o in overrides)
        assert checked_threshold(cfg.threshold) == (0.3 if given else None)
        assert type(cfg.sliding_window.window) is int  # text that reads as a number: a number
    else:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            check_config(cfg, import_targets=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["module.scheduler_interval=step"], r"module.scheduler.T_max is \$\{trainer.max_epochs\}"),
        (
            [
                "module.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
                "~module.scheduler.T_max",
            ],
            r"add \+module.scheduler.mode=max",
        ),
        (["callbacks.model_checkpoint.save_top_k=2"], "save_top_k=2 keeps several checkpoints"),
        (  # Lightning's version counter: best.ckpt would hold the latest kept one
            [
                "callbacks.model_checkpoint.save_top_k=-1",
                "callbacks.model_checkpoint.enable_version_counter=true",
            ],
            "save_top_k=-1 keeps several checkpoints",
        ),
        (["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=5"], "is beyond"),
        (
            [
                *PLATEAU,
                "+trainer.limit_val_batches=0",
            ],
            r"ReduceLROnPlateau follows val/f1, but validation is off",
        ),
        (  # stepped at every step, or every epoch, with a stale val/f1 (helper-88)
            [
                *PLATEAU,
                "module.scheduler_interval=step",
            ],
            r"would step at every optimizer step \(module.scheduler_interval=step\)",
        ),
        (
            [
                *PLATEAU,
                "trainer.check_val_every_n_epoch=null",
                "+trainer.val_check_interval=8",
            ],
            r"would step at every epoch \(trainer.check_val_every_n_epoch=null\)",
        ),
        (  # training by steps: CosineAnnealingLR(T_max=-1) (helper-73)
            ["trainer.max_epochs=-1", "+trainer.max_steps=4"],
            r"module.scheduler.T_max=-1 \(from \$\{trainer.max_epochs\}\): a schedule of no length",
        ),
        # refused by the module after the earlier results were removed, alone (helper-106)
        (["module.pos_weight=-1"], r"module.pos_weight=-1 must be a finite number > 0"),
        # the callback's own threshold was passed over it, without a word (helper-116)
        (
            ["+callbacks.cam_panels.explain.threshold=0.3"],
            r"callbacks.cam_panels.explain.threshold=0.3 is not read",
        ),
    ],
)
def test_training_options_that_would_silently_do_something_else_are_refused_first(
    tmp_path, tiny_synthetic, overrides, match
):
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=csv"]
    earlier = {"metrics.json": b"{}", "csv/metrics.csv": b"epoch,step\r\n0,1\r\n"}
    for name, data in earlier.items():  # an earlier run's results in the same folder
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(data)
    with pytest.raises(ConfigError, match=match):
        train(compose_train(tmp_path, [*base, *overrides]))
    files = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")}
    assert files == {"metrics.json", "csv", "csv/metrics.csv"}, "refused before any write"
    assert all((tmp_path / "run" / n).read_bytes() == d for n, d in earlier.items())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        # each matched by its own refuser's words (torchmetrics' own threshold check passed
        # a match of "threshold" without changecam's, helper-162)
        ("module.threshold=1.5", r"module\.threshold=1\.5 must be a probability in \[0, 1\)"),
        ("module.freeze=[encodr1]", r"'encodr1' names no part of SiameseUNet"),
        ("callbacks.cam_panels.k=0", r"cam_panels.k, every_n_epochs"),
        ("trainer.accelerator=cpuu", r"invalid accelerator name: `accelerator='cpuu'`"),
        # WandbLogger passes **kwargs to wandb.init, which refused this one only at the first
        # log, after the earlier run's results were removed (helper-125)
        (
            "++logger.wandb.projct=x",
            r"logger.wandb.projct: unknown key for lightning.pytorch.loggers.wandb.WandbLogger "
            r"\(did you mean 'project'\?\)",
        ),
    ],
)
def test_a_value_the_module_a_callback_or_the_trainer_refuses_leaves_the_earlier_run(
    tmp_path, tiny_synthetic, override, match
):
    """Refused as they are built: the earlier run's results, CAM panels and W&B run id in the
    folder stay as they were (helper-111: they were removed before these were built)."""
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=wandb"]
    earlier = {
        "metrics.json": b"{}",
        "cam/epoch_000/panel.png": b"png",
        "wandb/run_id.txt": b"earlier1\n",
    }
    for name, data in earlier.items():
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(data)
    with pytest.raises(Exception, match=match):
        train(compose_train(tmp_path, [*base, override]))
    assert all((tmp_path / "run" / n).read_bytes() == d for n, d in earlier.items())


@pytest.mark.parametrize(
    "overrides",
    [
        ["module.scheduler_interval=step", "module.scheduler.T_max=20"],  # 20 steps, 20 epochs
        [
            *PLATEAU,
        ],
        [
            "callbacks.model_checkpoint.save_top_k=2",
            "callbacks.model_checkpoint.filename='best-{epoch}'",
        ],
        [
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=5",
            "+trainer.limit_val_batches=0",
        ],
    ],
)
def test_the_same_options_set_to_fit_pass(tmp_path, tiny_synthetic, overrides):
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic)]
    check_training_settings(compose_train(tmp_path, [*base, *overrides]))


def test_a_plateau_schedule_with_validation_every_other_epoch_trains(tmp_path, tiny_synthetic):
    """Lightning stopped after the first epoch: no val/f1 for the scheduler there (helper-82);
    then it stepped at every epoch with the last val/f1 again (helper-83). It steps at the
    epochs that validate."""
    plateau = [
        *PLATEAU,
        "+module.scheduler.patience=0",
        "trainer.max_epochs=4",
        "trainer.check_val_every_n_epoch=2",
        "test=false",
        "logger=none",
    ]
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "callbacks.cam_panels=null"]
    metrics = train(compose_train(tmp_path, [*base, *plateau]))
    assert "val/f1" in metrics
    # last.ckpt is written by epoch 3's validation, before that epoch's step: one step so far
    # (after epoch 1's validation), none after epoch 2, which does not validate
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert last["lr_schedulers"][0]["last_epoch"] == 1


def test_pos_weight_with_a_dice_loss_is_said_to_do_nothing():
    with pytest.warns(UserWarning, match="module.pos_weight=5.0 has no effect"):
        ChangeDetectionModule(SiameseUNet(3, base_channels=4, depth=2), loss="dice", pos_weight=5.0)


def test_a_run_whose_validation_never_comes_is_refused_and_one_without_is_scored(
    tmp_path, tiny_synthetic
):
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=none"]
    with pytest.raises(ConfigError, match="check_val_every_n_epoch=5 is beyond"):
        train(
            compose_train(
                tmp_path / "never",
                [*base, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=5"],
            )
        )
    assert not (tmp_path / "never" / "run" / "checkpoints").exists()
    # validation off: no best.ckpt, the final weights scored on test
    metrics = train(
        compose_train(
            tmp_path / "off",
            [*base, "trainer.max_epochs=1", "+trainer.limit_val_batches=0", "test=true"],
        )
    )
    assert "test/f1" in metrics and "val/f1" not in metrics
    assert json.loads((tmp_path / "off" / "run" / "metrics.json").read_text())["test/f1"] >= 0


def test_a_run_that_writes_no_checkpoint_says_so(tmp_path, tiny_synthetic, caplog):
    """Validation every second epoch, but the run stops after one step: neither checkpoint is
    written, although an earlier run's are in the folder."""
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=none", "test=false"]
    train(compose_train(tmp_path, [*base, "trainer.max_epochs=1"]))
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="changecam"):
        train(compose_train(tmp_path, [*base, "trainer.max_epochs=1"]))
    assert "no checkpoint was written" not in caplog.text
    # resuming a finished run trains nothing and so writes nothing: no warning for it
    with caplog.at_level(logging.WARNING, logger="changecam"):
        train(compose_train(tmp_path, [*base, "trainer.max_epochs=1", "ckpt_path=last"]))
    assert "no checkpoint was written" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="changecam"):
        train(
            compose_train(
                tmp_path,
                [
                    *base,
                    "trainer.max_epochs=-1",
                    "+trainer.max_steps=1",
                    "module.scheduler.T_max=1",  # its default counts epochs: -1 is refused
                    "trainer.check_val_every_n_epoch=2",
                ],
            )
        )
    assert "no checkpoint was written" in caplog.text
    # the earlier runs' checkpoints would pass for this one's (helper-73): removed, said so
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert "an earlier run's checkpoint this run did not replace" in caplog.text


def test_typos_leave_an_earlier_runs_results_in_place(tmp_path, tiny_synthetic):
    """train.py's ckpt_path=lsat, eval.py's split=tset, seed_batch_size=2.5 and a misspelt
    blend are refused before an earlier run's results in the folder are removed (helper-73:
    they were removed first)."""
    from changecam.cli.evaluate import evaluate

    run = tmp_path / "run"
    run.mkdir()
    earlier = {"metrics.json": "{}", "per_image.csv": "name\n"}
    for name, text in earlier.items():
        (run / name).write_text(text)
    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=none"]
    with pytest.raises(FileNotFoundError, match="ckpt_path=lsat does not exist"):
        train(compose_train(tmp_path, [*base, "ckpt_path=lsat"]))
    for bad, match in (
        ("split=tset", "split='tset'"),
        ("seed_batch_size=2.5", "seed_batch_size=2.5 must be an integer"),
        ("sliding_window.enabled=true sliding_window.blend=gausian", "blend='gausian'"),
    ):
        overrides = ["ckpt_path=x.ckpt", "logger=none", *bad.split()]
        with pytest.raises(ValueError, match=match):
            evaluate(compose_train(tmp_path, overrides, "eval"))
    assert {n: (run / n).read_text() for n in earlier} == earlier


def test_optimized_metric_is_judged_first_and_a_run_without_it_returns_none(
    tmp_path, tiny_synthetic, caplog
):
    """A typo (val/F1) was found only after training (in a sweep, after its first trial), and
    validation off (no val/* scores) made the documented command exit 1 after it had scored
    (helper-73): refused before anything is built, and a warning with no value."""
    from changecam.cli.train import check_optimized_metric, train_and_score

    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic), "logger=none", "test=false"]
    with pytest.raises(ConfigError, match=r"optimized_metric=val/F1 .*did you mean val/f1\?"):
        train(compose_train(tmp_path / "typo", [*base, "optimized_metric=val/F1"]))
    assert not (tmp_path / "typo" / "run" / "checkpoints").exists()
    # Optuna maximises by default: a loss would be searched for its worst (helper-82)
    with pytest.raises(ConfigError, match=r"shrinks .*set hydra.sweeper.direction=minimize"):
        train(
            compose_train(
                tmp_path / "typo", [*base, "hparams_search=optuna", "optimized_metric=val/loss"]
            )
        )
    minimised = [*base, "hparams_search=optuna", "optimized_metric=val/loss"]
    check_optimized_metric(
        compose_train(tmp_path, [*minimised, "hydra.sweeper.direction=minimize"])
    )
    # a sweep needs the value of every trial: a split the config leaves out is refused up
    # front (its first trial failed after training, helper-101); a single run only warns
    for split_off, metric in (
        (["test=false"], "test/f1"),
        (["+trainer.limit_val_batches=0"], "val/f1"),
    ):
        left_out = compose_train(tmp_path, [*base, *split_off, f"optimized_metric={metric}"])
        with pytest.raises(ConfigError, match=f"{split_off[0].lstrip('+')}: no run returns"):
            check_optimized_metric(left_out, sweep=True)
        check_optimized_metric(left_out, sweep=False)
    # none under Optuna: every trial trained, then failed for want of a value (helper-111)
    unset = compose_train(tmp_path, [*base, "hparams_search=optuna", "optimized_metric=null"])
    with pytest.raises(ConfigError, match=r"optimized_metric is null, but the sweeper optimises"):
        check_optimized_metric(unset, sweep=True)
    check_optimized_metric(unset, sweep=False)  # a single run has no trial to score
    off = [*base, "trainer.max_epochs=1", "+trainer.limit_val_batches=0", "test=true"]
    with caplog.at_level(logging.WARNING, logger="changecam"):
        assert train_and_score(compose_train(tmp_path / "off", off)) is None
    assert "optimized_metric=val/f1 is not among this run's metrics" in caplog.text
    assert (tmp_path / "off" / "run" / "metrics.json").is_file()


def test_the_resume_hint_does_not_offer_an_earlier_runs_last_checkpoint(tmp_path, tiny_synthetic):
    """Stopped before its first checkpoint in an earlier run's folder, a new run was told to
    resume with ckpt_path=last, which would continue the other run (helper-73)."""
    import os
    import time

    from changecam.cli.common import resume_hint

    base = ["experiment=quickstart", *tiny_overrides(tiny_synthetic)]
    cfg = compose_train(tmp_path, base)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"an earlier run's")
    os.utime(last, (time.time() - 3600,) * 2)
    assert resume_hint(cfg).startswith("run it again")
    assert resume_hint(compose_train(tmp_path, [*base, "ckpt_path=last"])).startswith("resume it")
    last.touch()  # this run's first checkpoint
    assert resume_hint(cfg).startswith("resume it")


def test_an_optuna_sweep_stopped_says_to_continue_its_study_not_to_resume(tmp_path):
    """The hint said ckpt_path=last, but an Optuna study's trials start in new folders (none
    resumes), and the same sampler seed proposed the interrupted trial's point again
    (helper-101): it says to continue the study with another seed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from changecam.cli.common import resume_hint
    from changecam.cli.launch import CONF_DIR

    GlobalHydra.instance().clear()
    for search, expected in (
        (["hparams_search=optuna"], "continue its study"),
        ([], "resume its sweep"),
    ):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train", [*search, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True
            )
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.paths.output_dir = str(tmp_path / "0")
        HydraConfig.instance().set_config(cfg)
        try:
            hint = resume_hint(cfg)
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
        assert hint.startswith(expected) and str(tmp_path) in hint, hint
        # with another seed: the same one proposes the interrupted trial's point again
        assert ("another hydra.sweeper.sampler.seed" in hint) == bool(search), hint


def test_the_wandb_runs_of_a_continued_study_have_names_of_their_own(tmp_path):
    """Named <task_name>/<job number>, the first trial of a continued Optuna study had the name
    of the first study's first trial, in the same group (helper-99): named by the job folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from changecam.cli.common import configure_wandb
    from changecam.cli.launch import CONF_DIR

    GlobalHydra.instance().clear()
    overrides = ["hparams_search=optuna", "logger=wandb", f"hydra.sweep.dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    names = []
    try:
        for started in ("2026-12-06_18-07-56", "2026-12-06_18-08-10"):  # two invocations
            run = cfg.copy()
            configure_wandb(run, tmp_path / f"{started}_0")
            names.append(run.logger.wandb.name)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    assert names == ["train/2026-12-06_18-07-56_0", "train/2026-12-06_18-08-10_0"]


def test_trainer_enable_progress_bar_false_turns_the_progress_bar_callback_off(
    tmp_path, tiny_synthetic
):
    """``callbacks`` always lists a progress bar, which Lightning refuses beside
    ``enable_progress_bar=false`` (helper-111: every such run failed)."""
    overrides = [
        "experiment=quickstart",
        *tiny_overrides(tiny_synthetic),
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "callbacks.cam_panels=null",
    ]
    metrics = train(compose_train(tmp_path, overrides))
    assert "test/f1" in metrics


@pytest.mark.parametrize(
    "target",
    ["lightning.pytorch.loggers.wandb.WandbLogger", "lightning.pytorch.loggers.WandbLogger"],
)
def test_the_wandb_run_id_is_kept_however_the_logger_is_spelled(tmp_path, target):
    """``lightning.pytorch.loggers.WandbLogger`` got no run id, so a resume started another
    W&B run (helper-130)."""
    from changecam.cli.common import RUN_ID_FILE, configure_wandb

    cfg = compose_train(tmp_path, ["logger=wandb", f"logger.wandb._target_={target}"])
    configure_wandb(cfg, tmp_path)
    assert cfg.logger.wandb.id == (tmp_path / RUN_ID_FILE).read_text().strip()
    resumed = compose_train(tmp_path, ["logger=wandb", f"logger.wandb._target_={target}"])
    configure_wandb(resumed, tmp_path, resumes=True)
    assert resumed.logger.wandb.id == cfg.logger.wandb.id

"""``python study.py``: config errors before any work, and the whole study on tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from changecam.cli.config_checks import ConfigError
from changecam.cli.study import per_architecture, study_settings, train_zoo, zoo_architectures
from changecam.data.io import read_label, write_png
from helpers import compose_train, run_script


def test_per_architecture_values_and_zoo_names(tmp_path):
    assert per_architecture({"default": 6, "bit": 2}, "bit", "epochs") == 2
    assert per_architecture({"default": 6, "bit": 2}, "fc_ef", "epochs") == 6
    assert per_architecture(3, "bit", "epochs") == 3
    with pytest.raises(ConfigError, match="no value for fc_ef"):
        per_architecture({"bit": 2}, "fc_ef", "epochs")
    assert "siamese_unet" in zoo_architectures(None) and "external" not in zoo_architectures(None)
    with pytest.raises(ConfigError, match="unknown architecture"):
        zoo_architectures(["unet3000"])


def test_study_config_composes_and_refuses_unknown_keys(tmp_path):
    cfg = compose_train(tmp_path, ["study.max_objects=5"], config_name="study")
    settings = study_settings(cfg, "bit")
    assert settings.max_objects == 5 and settings.layer_ig.steps == 2
    cfg = compose_train(tmp_path, ["+study.methds=[hirescam]"], config_name="study")
    with pytest.raises(ConfigError, match="study.methds: unknown key"):
        study_settings(cfg, "bit")


def test_study_needs_checkpoints_or_train_zoo(tmp_path):
    proc = run_script(
        "study.py",
        [f"hydra.run.dir={tmp_path}/run", "logger=none"],
        cwd=tmp_path,
        check=False,
        env={"HYDRA_FULL_ERROR": "0"},
        timeout=120,
    )
    assert proc.returncode == 1
    assert "either study.checkpoints" in proc.stderr
    assert not (tmp_path / "run" / "study.json").exists()


def test_a_failed_zoo_training_names_the_log_it_wrote(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            f"study.zoo_dir={tmp_path}/zoo",
            "study.train_overrides=['experiment=quickstart','logger=none','model.fusion=dif']",
        ],
        config_name="study",
    )
    with pytest.raises(RuntimeError, match="training siamese_unet for the study failed") as err:
        train_zoo(cfg, ["siamese_unet"])
    log = str(err.value).split("see ")[1].split(" and the output")[0]
    assert log.endswith("quickstart.log") and "model.fusion='dif'" in open(log).read()


def test_a_bad_checkpoint_fails_before_any_model_is_studied(tmp_path, tiny_synthetic, monkeypatch):
    import changecam.cli.study as study_module
    from test_checkpoint import make_lightning_checkpoint

    good = make_lightning_checkpoint(tmp_path / "good" / "best.ckpt", tiny_synthetic, steps=1)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:4000])
    studied = []
    monkeypatch.setattr(study_module, "study_model", lambda *a, **k: studied.append(a))
    cfg = compose_train(
        tmp_path, [f"study.checkpoints=[{good},{cut}]", "logger=none"], config_name="study"
    )
    with pytest.raises(Exception, match="cut.ckpt"):
        study_module.study(cfg)
    assert studied == []


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("study.methods=[hirescm]", "unknown method"),
        ("study.split=tset", "study.split='tset': expected one of train, val, test"),
        ("study.max_images=-1", "study.max_images=-1 must be a whole number >= 1"),
        ("study.max_objects=-1", "study.max_objects=-1 must be >= 0"),
        ("study.pass_spearman=-1", r"study.pass_spearman=-1 must be in \(0, 1\]"),
        ("study.names=[a,b]", "study.names has 2 names for 1 study.checkpoints"),
        ("study.ig.steps=0", r"^study.ig.steps=0 must be >= 1"),  # was named explain.ig.steps
        # helper-97: these removed the earlier results, then failed (a float after a whole model)
        ("study.dilation=1.5", "study.dilation=1.5 must be a whole number"),
        ("study.bootstrap=10.5", "study.bootstrap=10.5 must be a whole number"),
        ("study.pass_spearman=true", "study.pass_spearman=True must be a number"),
        ("study.data={tmp}/absent", "study.data=.*absent is not a folder"),
        ("study.data={tmp}/vacant", r"dataset root .*vacant holds neither known layout"),
        # helper-172: a study of no change, or at a layer after the fusion, exited 0 with a
        # study.json of empty results
        ("study.data={tmp}/unchanged", r"split 'val' of .*unchanged hold no change"),
        # the data group's folder, as study.data's (helper-173: refused after the removal)
        ("data.root={tmp}/unchanged data.synthetic=null", r"split 'val' of .*unchanged hold no"),
        # the data group's layout, which the study reads it with (helper-177)
        (
            "data.root={tmp}/unchanged data.synthetic=null data.layout=levir256",
            r"split list .*unchanged/list/val.txt does not exist",
        ),
        (
            "study.layers=[input,bottleneck]",
            "bottleneck is not among best's per-date layers .*: input, enc1, enc2",
        ),
        ("+study.max_objects.unet=2", "study.max_objects.unet: no model of this study"),
        # its advice, model=..., was eval's: study.py has no model key (helper-172)
        (
            "study.checkpoints=[{tmp}/plain.pth]",
            "plain.pth holds weights without a network config: study.py reads",
        ),
        # helper-119: refused after the earlier results were removed
        ("device=bogus", "device='bogus' is not a device"),
    ],
)
def test_bad_study_settings_leave_an_earlier_studys_results(
    tmp_path, tiny_synthetic, override, match
):
    """They were refused after the earlier study.json and report.md in the folder were removed
    (helper-87); a negative max_objects or max_images studied an arbitrary part silently."""
    from changecam.cli.study import study
    from test_checkpoint import make_lightning_checkpoint

    (tmp_path / "vacant").mkdir()
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), tmp_path / "plain.pth")
    unchanged = Path(shutil.copytree(tiny_synthetic, tmp_path / "unchanged"))
    for label in (unchanged / "val" / "label").iterdir():
        write_png(label, np.zeros_like(read_label(label), np.uint8))
    override = override.format(tmp=tmp_path)
    good = make_lightning_checkpoint(tmp_path / "good" / "best.ckpt", tiny_synthetic, steps=1)
    earlier = {"study.json": "{}", "report.md": "# an earlier study"}
    (tmp_path / "run").mkdir()
    for name, text in earlier.items():
        (tmp_path / "run" / name).write_text(text)
    cfg = compose_train(
        tmp_path,
        [f"study.checkpoints=[{good}]", "logger=none", *override.split(" ")],
        config_name="study",
    )
    with pytest.raises(Exception, match=match):
        study(cfg)
    assert {n: (tmp_path / "run" / n).read_text() for n in earlier} == earlier


def test_layers_a_zoo_model_lacks_are_refused_before_any_training(tmp_path, monkeypatch):
    """study.layers=[input,enc2] with BIT in the zoo failed after training every model and
    studying the ones before it (helper-87)."""
    import changecam.cli.study as study_module

    trained = []
    monkeypatch.setattr(study_module, "train_zoo", lambda *a: trained.append(a) or {})
    cfg = compose_train(
        tmp_path,
        [
            "study.train_zoo=true",
            "study.zoo=[siamese_unet,bit]",
            "study.layers=[input,enc2]",
            f"study.zoo_dir={tmp_path}/zoo",
            "logger=none",
        ],
        config_name="study",
    )
    with pytest.raises(ConfigError, match=r"study.layers=\['input', 'enc2'\] does not fit bit: "):
        study_module.study(cfg)
    assert trained == []


def test_a_rerun_into_a_studys_folder_keeps_none_of_its_plots(tmp_path, tiny_synthetic):
    """The earlier study's plots stayed beside the new report (helper-87)."""
    from changecam.cli.study import study
    from test_checkpoint import make_lightning_checkpoint

    good = make_lightning_checkpoint(tmp_path / "good" / "best.ckpt", tiny_synthetic, steps=1)
    stale = tmp_path / "run" / "plots" / "panel_first_of_an_earlier_study.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not this run's")
    quick = [
        "study.methods=[hirescam]",
        "study.max_images=1",
        "study.randomisation_images=0",
        "study.bootstrap=10",
        "study.context=32",
    ]
    cfg = compose_train(
        tmp_path, [f"study.checkpoints=[{good}]", "logger=none", *quick], config_name="study"
    )
    study(cfg)
    assert (tmp_path / "run" / "report.md").is_file() and not stale.exists()
    record = json.loads((tmp_path / "run" / "study.json").read_text())
    assert record["settings"]["seed"] == cfg.seed  # its intervals depend on it (helper-188)


@pytest.mark.slow
def test_study_trains_a_tiny_zoo_and_writes_the_report(tmp_path):
    tiny = [
        "data.synthetic.image_size=64",
        "data.synthetic.train=4",
        "data.synthetic.val=2",
        "data.synthetic.test=2",
        "data.patch_size=32",
        "data.batch_size=4",
    ]
    args = [
        "study.train_zoo=true",
        "study.zoo=[siamese_unet,fc_siam_diff]",
        *tiny,
        'study.train_overrides=["experiment=quickstart","logger=csv",'
        '"callbacks.cam_panels=null","model.base_channels=4"]',
        "study.epochs=1",
        "study.context=32",
        "study.randomisation_points=2",
        "logger=csv",
        f"paths.log_dir={tmp_path}/logs",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",
    ]
    run_script("study.py", args, cwd=tmp_path, timeout=900)
    record = json.loads((tmp_path / "run" / "study.json").read_text())
    assert record["order"] == ["siamese_unet", "fc_siam_diff"]
    assert set(record["architectures"]) == set(record["order"])
    seconds = record["seconds"]
    assert set(seconds["study"]) == set(record["order"])
    assert seconds["total"] >= seconds["setup_and_training"] + sum(seconds["study"].values())
    unet = record["architectures"]["siamese_unet"]
    assert set(unet["results"]) == {
        "hirescam",
        "gradcam",
        "contrastive",
        "integrated_gradients",
        "layer_ig",
        "random",
    }
    entry = unet["results"]["contrastive"]["enc2"]
    for metric in ("date_accuracy", "causal_agreement", "pointing", "randomisation"):
        assert metric in entry
    assert len(entry["date_accuracy"]["ci95"]) == 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Headline" in report and "plots/date_accuracy.png" in report
    # the logger gets what was studied beside the numbers (W&B showed no config: helper-172)
    logged = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert logged["study"]["zoo"] == ["siamese_unet", "fc_siam_diff"]
    for name in (
        "date_accuracy",
        "post_share",
        "deletion_curves",
        "randomisation",
        "panel_siamese_unet_best",
        "panel_fc_siam_diff_worst",
    ):
        assert (tmp_path / "run" / "plots" / f"{name}.png").is_file(), name
    # a second run reuses the finished training runs
    again = run_script("study.py", [*args[:-1], f"hydra.run.dir={tmp_path}/run2"], cwd=tmp_path)
    assert (
        again.stdout.count("reusing the finished run")
        + again.stderr.count("reusing the finished run")
        == 2
    )


def test_the_zoo_folder_depends_on_the_data_it_is_trained_on(tmp_path):
    """train_zoo passes paths.data_dir to train.py: models trained on one data folder are not
    reused for another (helper-70), and the same folder, however written, finds its run."""
    from omegaconf import OmegaConf

    from changecam.cli.study import zoo_run

    def folder(data_dir: str) -> Path:
        cfg = OmegaConf.create(
            {
                "study": {"train_overrides": [], "epochs": {"default": 2}, "zoo_dir": "zoo"},
                "paths": {"data_dir": data_dir},
            }
        )
        return zoo_run(cfg, "fc_ef")[0]

    assert folder(str(tmp_path / "a")) != folder(str(tmp_path / "b"))
    assert folder(str(tmp_path / "a")) == folder(f"{tmp_path}/b/../a/")


def test_the_early_layer_check_reads_forced_model_overrides_and_refuses_shared_taps(tmp_path):
    """++model.depth=3 was not read, so the check built the preset's depth (helper-89); a
    layer that two taps of a model share passed the check and failed in the study."""
    from changecam.cli.study import check_layers, model_overrides
    from changecam.explain import LayerTaps
    from test_external_models import PairOfUNets

    assert model_overrides(["++model.depth=3", "+model.fusion=diff", "model.a.b=2", "seed=1"]) == {
        "depth": 3,
        "fusion": "diff",
    }
    cfg = compose_train(tmp_path, ["study.layers=[input,enc1]"], config_name="study")
    with pytest.raises(ConfigError, match="does not fit ens: two different Tap modules share"):
        check_layers(cfg, "ens", LayerTaps(PairOfUNets()))


def test_one_architectures_value_is_added_to_a_per_architecture_map(tmp_path):
    """``+study.max_objects.m2=2`` (conf/study.yaml: per architecture) was refused as a key
    nothing reads, and only a whole new map could set one model's value (helper-97): the
    command goes on to its own checks (here: the checkpoint is not there)."""
    proc = run_script(
        "study.py",
        ["study.checkpoints=[absent.ckpt]", "study.names=[m2]", "+study.max_objects.m2=2",
         "+study.epochs.fc_ef=3", "logger=none"],
        cwd=tmp_path, timeout=120, check=False, env={"HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "absent.ckpt" in output, output[-2000:]
    assert "nothing reads it" not in output


def test_an_empty_zoo_and_a_single_unbracketed_checkpoint(tmp_path, tiny_synthetic):
    """study.zoo=[] wrote a finished study of no model; study.checkpoints=<one path> was split
    into its characters (helper-119)."""
    from changecam.cli.config_checks import ConfigError
    from changecam.cli.study import given_checkpoints, zoo_architectures
    from test_checkpoint import make_lightning_checkpoint

    with pytest.raises(ConfigError, match=r"study.zoo=\[\] names no architecture"):
        zoo_architectures([])
    good = make_lightning_checkpoint(tmp_path / "good" / "best.ckpt", tiny_synthetic, steps=1)
    cfg = compose_train(tmp_path, [f"study.checkpoints={good}"], config_name="study")
    assert given_checkpoints(cfg) == {"best": good}
    # and its one name, and one architecture (helper-120: split into letters)
    cfg = compose_train(
        tmp_path, [f"study.checkpoints={good}", "study.names=bit"], config_name="study"
    )
    assert given_checkpoints(cfg) == {"bit": good}
    assert zoo_architectures("bit") == ["bit"]
    cfg = compose_train(
        tmp_path, [f"study.checkpoints={good}", "study.names=2020"], config_name="study"
    )
    assert given_checkpoints(cfg) == {"2020": good}
    from changecam.cli.study import zoo_run

    cfg = compose_train(
        tmp_path,
        ["study.train_zoo=true", "study.train_overrides='model.base_channels=8'"],
        config_name="study",
    )
    assert zoo_run(cfg, "bit")[1][0] == "model.base_channels=8"


def test_the_zoo_folder_is_found_whatever_folder_train_py_runs_in(tmp_path, monkeypatch):
    """train.py runs in paths.root_dir (CHANGECAM_ROOT): a relative study.zoo_dir was written
    there and looked for here, so a finished training was reported failed (helper-119)."""
    from changecam.cli.study import zoo_run

    monkeypatch.chdir(tmp_path)
    cfg = compose_train(
        tmp_path, ["study.train_zoo=true", "study.zoo_dir=zoo"], config_name="study"
    )
    run_dir, _ = zoo_run(cfg, "siamese_unet")
    assert run_dir.is_absolute() and run_dir.parent == tmp_path / "zoo"


def test_a_synthetic_split_of_no_pairs_is_named_by_the_study(tmp_path):
    """``data.synthetic.val=0`` with the study's default split gave LEVIR-CD download advice
    (helper-142)."""
    from changecam.cli.study import study_root

    cfg = compose_train(
        tmp_path,
        [f"data.root={tmp_path}/syn", "data.synthetic.image_size=32", "data.synthetic.val=0"],
        config_name="study",
    )
    with pytest.raises(ValueError, match="^data.synthetic.val=0 writes no val pairs"):
        study_root(cfg)

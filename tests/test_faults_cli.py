"""Faults of the config stage: every command refuses a bad config before any work, says which key,
prints it once, and leaves nothing that looks finished.

Each case asserts the exit status (or the exception), that the message names the key, and that no
finished-looking output exists (checkpoints, metrics.json, predictions.json, masks, panels).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from changecam.cli.evaluate import evaluate
from changecam.cli.explain import explain
from changecam.cli.launch import Stopped, exit_reporting
from changecam.cli.predict import predict
from changecam.explain.hirescam import TapError
from helpers import compose_train, run_script
from test_checkpoint import make_lightning_checkpoint

FINISHED = ("*.ckpt", "metrics.json", "predictions.json", "explanations.json", "*.png", "*.csv")


def finished_outputs(root: Path) -> list[Path]:
    """Files under ``root`` that a finished command would leave."""
    return sorted(p for pattern in FINISHED for p in root.rglob(pattern))


# (command, overrides, text the message must contain)
CLI_CASES = [
    (
        "train.py",
        ["experiment=quickstart", "model.fusion=dif"],
        "model.fusion='dif' is not allowed",
    ),
    ("train.py", ["experiment=quickstart", "data.layot=flat"], "Key 'layot' is not in struct"),
    ("train.py", ["experiment=quickstart", "+model.depht=3"], "model.depht: unknown key"),
    ("train.py", ["experiment=quickstart", "module.loss=dice2"], "module.loss='dice2'"),
    ("train.py", ["experiment=nonexistent"], "Could not find 'experiment/nonexistent'"),
    ("predict.py", ["ckpt_path=x.ckpt", "explain.target=everything"], "explain.target"),
    ("explain.py", ["ckpt_path=x.ckpt", "explain.faithfulness.dates=[pre,later]"], "later"),
    ("eval.py", ["ckpt_path=x.ckpt", "data.train_protocol=crops"], "data.train_protocol='crops'"),
    # keys +/++ adds outside every _target_ node (Hydra suggests +treshold= for treshold=)
    ("eval.py", ["ckpt_path=x.ckpt", "++treshold=0.3"], "did you mean 'threshold'?"),
    (
        "predict.py",
        ["ckpt_path=x.ckpt", "input.dir=.", "++predict.resum=true"],
        "predict.resum: unknown key",
    ),
    # plain keys outside every _target_ node: a switch given as text would be taken as true
    (
        "predict.py",
        ["ckpt_path=x.ckpt", "input.dir=.", "predict.resume=no"],
        "predict.resume='no' must be true or false",
    ),
    # a hydra.* override with an interpolation (read as typed, not resolved) keeps the guard on
    (
        "eval.py",
        ["ckpt_path=x.ckpt", "post_share=no", "hydra.run.dir=out/${hydra.job.override_dirname}"],
        "post_share='no' must be true or false",
    ),
    (
        "eval.py",
        ["ckpt_path=x.ckpt", "seed_batch_size=abc", "post_share=maybe"],
        "seed_batch_size='abc' must be a number (like its default, 16)\n  post_share='maybe' must",
    ),
    # a path Hydra reads as a number (a folder named by its year) failed with a bare TypeError
    # (helper-93)
    (
        "predict.py",
        ["ckpt_path=x.ckpt", "input.dir=2023"],
        "input.dir=2023 is read as a number, not a path: quote it",
    ),
    ("eval.py", ["ckpt_path=2024"], "ckpt_path=2024 is read as a number"),
    # threshold's default is null (the checkpoint's): eval.py judges it before reading anything
    (
        "eval.py",
        ["ckpt_path=x.ckpt", "threshold=abc"],
        "threshold='abc' must be a probability in [0, 1) or null",
    ),
]


@pytest.mark.parametrize(("script", "overrides", "expected"), CLI_CASES)
def test_config_errors_fail_at_once_print_once_and_leave_nothing(
    tmp_path, script, overrides, expected
):
    proc = run_script(
        script, overrides, cwd=tmp_path, timeout=120, check=False, env={"HYDRA_FULL_ERROR": "0"}
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-2000:]
    assert expected in output
    # once: not by both the wrapper and Hydra (the config summary line echoes the overrides)
    messages = "\n".join(line for line in output.splitlines() if "(whole config: " not in line)
    assert messages.count(expected) == 1, output
    assert "Traceback" not in output
    assert finished_outputs(tmp_path) == []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("faults_ckpt") / "best.ckpt", tiny_synthetic, steps=1
    )


# Keys that only the network can judge: checked right after loading it, before any pair or batch.
MODEL_CASES = [
    (predict, "predict", ["explain.taps=[enc9]"], TapError, "enc9"),
    (predict, "predict", ["explain.panel_layer=enc7"], ValueError, "explain.panel_layer='enc7'"),
    (
        explain,
        "explain",
        ["explain.faithfulness.layer=dec1"],
        ValueError,
        "explain.faithfulness.layer",
    ),
    (explain, "explain", ["explain.taps=[fuse1]"], ValueError, "has no per-date layer"),
    (evaluate, "eval", ["post_share_layer=enc5"], ValueError, "post_share_layer='enc5'"),
    # the settings' own refusal, not inside Hydra's InstantiationException
    (
        explain,
        "explain",
        ["explain.methods=[gradcamm]"],
        ValueError,
        "explain.methods: unknown method",
    ),
    (predict, "predict", ["explain.methods=[gradcamm]"], ValueError, "did you mean 'gradcam'?"),
    # every pair failed in matplotlib, after the earlier run's outputs were gone (helper-84)
    (predict, "predict", ["explain.dpi=0"], ValueError, "explain.dpi=0 must be"),
    (explain, "explain", ["explain.max_pixels=-1"], ValueError, "explain.max_pixels=-1 must be"),
    # the run's threshold was passed over it, without a word (helper-114)
    (
        explain,
        "explain",
        ["+explain.threshold=0.3"],
        ValueError,
        "explain.threshold=0.3 is not read",
    ),
    (
        predict,
        "predict",
        ["+explain.threshold=0.3"],
        ValueError,
        "explain.threshold=0.3 is not read",
    ),
]


def test_the_curves_layer_is_not_judged_without_curves(tmp_path, ckpt, levir256_tiny):
    """explain.faithfulness.layer with the curves off: every pair was explained and saved, then
    the report failed on that layer, leaving no explanations.json (helper-114)."""
    overrides = [
        "device=cpu",
        f"ckpt_path={ckpt}",
        f"input.dir={levir256_tiny}",
        "explain.taps=[enc1]",
        "explain.faithfulness.enabled=false",
        "explain.faithfulness.layer=enc2",
    ]
    report = explain(compose_train(tmp_path, overrides, "explain"))
    assert report["faithfulness"]["layer"] is None
    assert (tmp_path / "run" / "explanations.json").is_file()


@pytest.mark.parametrize(("command", "config", "overrides", "error", "expected"), MODEL_CASES)
def test_model_dependent_keys_fail_before_any_pair(
    tmp_path, ckpt, levir256_tiny, tiny_synthetic, command, config, overrides, error, expected
):
    data = (
        [f"data.root={tiny_synthetic}", "data.synthetic=null"]
        if config == "eval"
        else [f"input.dir={levir256_tiny}"]
    )
    cfg = compose_train(tmp_path, ["device=cpu", f"ckpt_path={ckpt}", *data, *overrides], config)
    with pytest.raises(error, match=expected.replace("[", r"\[").replace("(", r"\(")):
        command(cfg)
    assert finished_outputs(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        (["gradcamm"], "unknown method(s) ['gradcamm']; known methods"),
        (["gradcamm"], "did you mean 'gradcam'?"),
        (["gradcam"], "must include explain.method=hirescam"),
    ],
)
def test_explain_methods_say_unknown_before_missing(methods, expected):
    from changecam.explain import ExplainSettings

    with pytest.raises(ValueError) as err:
        ExplainSettings(methods=methods)
    assert expected in str(err.value)


def test_a_tap_name_given_as_a_string_is_one_name(tmp_path, ckpt, levir256_tiny):
    report = explain(
        compose_train(
            tmp_path,
            [
                "device=cpu",
                f"ckpt_path={ckpt}",
                f"input.pre={levir256_tiny}/A/test_2_0000_0000.png",
                f"input.post={levir256_tiny}/B/test_2_0000_0000.png",
                "explain.taps=enc2",
                "explain.faithfulness.enabled=false",
            ],
            "explain",
        )
    )
    assert report["taps"] == ["pre/enc2", "post/enc2"]  # not ["e", "n", "c", "2"]


@pytest.mark.parametrize(
    ("rank", "err", "status", "printed"),
    [
        (0, Stopped("stopped by SIGTERM; resume it"), 143, True),
        (1, Stopped("stopped by SIGTERM; resume it"), 143, False),
        (1, ValueError("rank 1 only: bad batch"), 1, True),
    ],
)
def test_a_sigterm_is_named_by_rank_zero_only(rank, err, status, printed, monkeypatch, capsys):
    """A SIGTERM reaches every DDP rank: rank 0 names it with the resume hint, the others exit
    with the same status quietly (their hint names their own folder, wrong in a sweep). Any
    other error is named by the rank it happened on."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
    with pytest.raises(SystemExit) as stop:
        exit_reporting(err)
    assert stop.value.code == status
    assert (f"Error: {type(err).__name__}: {err}" in capsys.readouterr().err) == printed


def test_a_sigterm_is_taken_in_without_a_collective(monkeypatch):
    """Lightning's handler broadcast the signal from inside the handler, which pairs with
    whatever collective another rank is in: both ranks waited for ever in 3 of 5 real 2-rank
    runs (helper-139). Taken in quietly, the loops stop every rank at their safe point."""
    import os
    import pickle
    import signal

    import lightning as L
    import torch

    from changecam.training.sigterm import take_sigterm_quietly

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective inside the signal handler")

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    take_sigterm_quietly(trainer)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", no_collective)
    monkeypatch.setattr(type(trainer), "world_size", property(lambda self: 2))
    connector = trainer._signal_connector
    connector.register_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.received_sigterm
    finally:
        connector.teardown()
    pickle.dumps(connector)  # a spawned DDP start pickles the trainer (helper-142: a closure)


@pytest.mark.parametrize(
    ("script", "overrides"),
    [
        ("eval.py", ["ckpt_path=missing.ckpt", "threshold=0.4"]),
        ("explain.py", ["ckpt_path=missing.ckpt", "explain.taps=[enc2]"]),
        ("predict.py", ["ckpt_path=missing.ckpt", "input.dir=pairs"]),
        ("study.py", ["study.checkpoints=[missing.ckpt]", "seed=3"]),
    ],
)
def test_every_command_logs_its_config_before_it_fails(tmp_path, script, overrides):
    """Like train.py, each command writes its whole config to its log and names its choices and
    overrides on the console, so a failed run's log says what it was asked to do."""
    proc = run_script(script, overrides, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 1
    task = script.removesuffix(".py")
    summary = re.search(rf"\] - {task}:(.*) \| (.*) \(whole config: ", proc.stdout + proc.stderr)
    assert summary and summary[2] == " ".join(overrides), proc.stdout[-2000:]
    (log,) = (tmp_path / "outputs" / task / "runs").glob(f"*/{task}.log")
    text = log.read_text()
    assert "config:\n" in text and f"task_name: {task}\n" in text, text[:2000]
    assert f"{overrides[0].replace('=', ': ', 1)}\n" in text or "- missing.ckpt" in text


def test_the_resume_hint_names_ckpt_path_last_only_once_there_is_one(tmp_path):
    """A run stopped before its first checkpoint has nothing to resume: ``ckpt_path=last``
    would fail with "last.ckpt does not exist"."""
    from changecam.cli.common import resume_hint

    cfg = compose_train(tmp_path, ["experiment=quickstart"])
    assert resume_hint(cfg).startswith("run it again (it stopped before its first checkpoint")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"saved")
    assert resume_hint(cfg) == (
        f"resume it with the same command and ckpt_path=last hydra.run.dir={tmp_path / 'run'}"
    )


def test_a_device_that_is_not_one_and_a_missing_or_unread_roi_are_named(tmp_path):
    from changecam.cli.common import read_roi, resolve_device
    from changecam.explain import ExplainSettings

    with pytest.raises(ValueError, match="device='gpu' is not a device: use auto, cpu, cuda"):
        resolve_device("gpu")
    missing = tmp_path / "roi.png"
    with pytest.raises(FileNotFoundError, match=f"explain.roi={missing}: no such file"):
        read_roi(ExplainSettings(roi=str(missing), target="roi"))
    # a ROI only the roi target reads: with another target it would be silently ignored
    with pytest.raises(ValueError, match="explain.roi=roi.png is read only by explain.target=roi"):
        ExplainSettings(roi="roi.png", target="predicted")


@pytest.mark.parametrize("command", ["eval", "explain", "predict", "study"])
def test_a_config_composed_in_code_prints_its_config(tmp_path, command):
    """Benchmarks and notebooks compose a command's config in code (print_config on): its
    hydra node has no hydra.job.num, which the whole config's YAML would need."""
    from changecam.cli.common import compose_config, prepare_run

    cfg = compose_config(command, ["ckpt_path=x.ckpt"] if command != "study" else [], tmp_path)
    assert cfg.print_config
    assert prepare_run(cfg) == tmp_path / "run"


def test_the_threshold_is_the_checkpoints_unless_given(caplog):
    """eval, predict and explain score at the module.threshold the checkpoint was trained with
    (0.5 when it records none); a given threshold wins, and differing from the checkpoint's is
    named, as it scores otherwise than train.py did."""
    from changecam.cli.common import checked_threshold, run_threshold

    for bad in ("abc", [0.3], {"a": 1}, True):
        with pytest.raises(ValueError, match="must be a probability in \\[0, 1\\) or null"):
            checked_threshold(bad)
    assert checked_threshold(0) == 0.0 and checked_threshold(None) is None
    with caplog.at_level("INFO"):
        assert run_threshold(None, {"threshold": 0.3}) == 0.3
        assert run_threshold(None, {}) == 0.5  # a plain state_dict
        assert run_threshold(0.5, {"threshold": 0.5}) == 0.5
        assert run_threshold(0.5, {}) == 0.5
        assert run_threshold(0.5, {"threshold": 0.3}) == 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "the checkpoint was trained and scored with module.threshold=0.3; this run uses "
        "threshold=0.5 as given (threshold=null scores it as train did)"
    ]
    assert "threshold=0.3 (the checkpoint's module.threshold)" in caplog.text
    assert "threshold=0.5 (the checkpoint records no module.threshold)" in caplog.text

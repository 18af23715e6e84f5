"""DDP through Lightning (``trainer=ddp_cpu``: gloo, two processes): pooled metrics equal the
single-process metrics of the same weights; one output folder; files written once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from changecam.metrics import SCORE_NAMES
from changecam.training.checkpoint import load_network
from helpers import compose_train, run_script, tiny_overrides


def ddp_overrides(synthetic: Path) -> list[str]:
    return [
        "experiment=quickstart",
        *tiny_overrides(synthetic),
        "trainer.max_epochs=1",
        "module.loss=bce",
        "module.pos_weight=20",  # so that the model predicts change and every score is non-trivial
        "logger=csv",
        "callbacks.cam_panels=null",
        "print_config=false",
    ]


def evaluate_single_process(cfg, ckpt: Path) -> dict[str, float]:
    """val and test metrics of ``ckpt`` in this process, one device, same data config."""
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module, net=load_network(ckpt))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics.update(trainer.test(module, datamodule=datamodule, verbose=False)[0])
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
def test_ddp_cpu_pooled_metrics_equal_single_process(tmp_path, tiny_synthetic):
    overrides = ddp_overrides(tiny_synthetic)
    trace = [
        "+callbacks.trace._target_=loss_trace.LossTrace",
        f"+callbacks.trace.folder={tmp_path}/trace",
    ]
    tests = {"PYTHONPATH": str(Path(__file__).parent)}
    run_script("train.py", [*overrides, "trainer=ddp_cpu", *trace], cwd=tmp_path, env=tests)

    runs = list((tmp_path / "outputs" / "quickstart" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 re-runs the script but shares rank 0's folder
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert not list(tmp_path.rglob("*ddp_process*"))
    ddp = json.loads((run / "metrics.json").read_text())
    # train/loss_epoch: the mean over both ranks' samples, not rank 0's half (helper-86)
    batches = [json.loads(line) for r in (0, 1) for line in open(tmp_path / f"trace/rank{r}.jsonl")]
    whole = sum(n * loss for n, loss in batches) / sum(n for n, _ in batches)
    with open(run / "csv" / "metrics.csv", newline="") as file:
        logged = [
            float(r["train/loss_epoch"]) for r in csv.DictReader(file) if r["train/loss_epoch"]
        ]
    assert logged == [pytest.approx(whole, rel=1e-5)]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "strategy: ddp" in config and "devices: 2" in config

    single = evaluate_single_process(
        compose_train(tmp_path / "single", [*overrides, "trainer=cpu"]),
        run / "checkpoints/best.ckpt",
    )
    assert 0 < ddp["test/precision"] < 1 and 0 < ddp["val/f1"] < 1
    for stage in ("val", "test"):
        for name in SCORE_NAMES:  # from the pooled confusion matrix: exact
            assert ddp[f"{stage}/{name}"] == single[f"{stage}/{name}"], (stage, name)
        # mean over samples of the per-batch BCE: equal up to summation order
        assert ddp[f"{stage}/loss"] == pytest.approx(single[f"{stage}/loss"], rel=1e-6)


@pytest.mark.slow
def test_ddp_inside_a_multirun_reruns_only_its_job(tmp_path, tiny_synthetic):
    """Lightning re-runs the command line for rank 1; in a sweep that must be this job only,
    in this job's folder. The sweep folder's name has microseconds in it, so a rank that
    composed the sweep again would make a folder of its own. The second job starts its own
    rank 1 (the first job's launcher variables and process group are gone)."""
    run_script(
        "train.py",
        [
            "-m",
            *ddp_overrides(tiny_synthetic),
            "trainer=ddp_cpu",
            "model.fusion=diff,concat",
            "hydra.sweep.dir=sweep_${now:%H-%M-%S-%f}",
        ],
        cwd=tmp_path,
    )
    sweeps = list(tmp_path.glob("sweep_*"))
    assert len(sweeps) == 1, sweeps
    assert sorted(p.name for p in sweeps[0].iterdir()) == ["0", "1", "multirun.yaml"]
    for number, fusion in enumerate(("diff", "concat")):
        job = sweeps[0] / str(number)
        assert (job / "metrics.json").is_file()
        assert f"model.fusion={fusion}" in (job / ".hydra" / "overrides.yaml").read_text()
        config = (job / ".hydra" / "config.yaml").read_text()
        assert "strategy: ddp" in config and "devices: 2" in config
    assert not (tmp_path / "outputs").exists()  # no single-run folder for rank 1 either


@pytest.mark.slow
def test_a_ddp_run_resumes_on_every_rank(tmp_path, tiny_synthetic):
    """Each rank restores its own RNG states from the checkpoint (rank 1 crashed doing so)."""
    run = tmp_path / "run"
    common = [*ddp_overrides(tiny_synthetic), "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    run_script("train.py", common, cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    (run / "metrics.json").unlink()
    run_script("train.py", [*common, "trainer.max_epochs=2", "ckpt_path=last"], cwd=tmp_path)
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert "val/f1" in json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_a_ddp_sweep_resumed_with_ckpt_path_last_starts_the_jobs_without_one(
    tmp_path, tiny_synthetic
):
    """ckpt_path=last in a sweep: a job without last.ckpt starts anew, on every rank (rank 1
    is re-run as a plain run, and refused the missing checkpoint, which killed the sweep)."""
    sweep = tmp_path / "sweep"
    common = ["-m", *ddp_overrides(tiny_synthetic), "trainer=ddp_cpu", f"hydra.sweep.dir={sweep}"]
    run_script("train.py", [*common, "model.fusion=diff"], cwd=tmp_path)
    assert (sweep / "0/checkpoints/last.ckpt").is_file() and not (sweep / "1").exists()
    run_script("train.py", [*common, "model.fusion=diff,concat", "ckpt_path=last"], cwd=tmp_path)
    for job in ("0", "1"):
        assert "val/f1" in json.loads((sweep / job / "metrics.json").read_text())


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()

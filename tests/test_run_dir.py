"""Run and sweep folders: a run or multirun started in the same second as another gets a folder
of its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from changecam.cli.hydra_callbacks import (
    RANK_VARIABLES,
    SIZE_VARIABLES,
    ClaimRunDir,
    MakeSweepDir,
    claim_folder,
    sweep_dir_override,
)
from changecam.cli.launch import config_dir
from helpers import run_script


def composed(run_dir: str, key: str = "run") -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("predict", [f"hydra.{key}.dir='{run_dir}'"], return_hydra_config=True)


@pytest.fixture
def no_rank(monkeypatch):
    for name in (*RANK_VARIABLES, *SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)


SECOND = "${now:%Y-%m-%d_%H-%M-%S}"  # the default run folder's name


def test_runs_in_the_same_second_get_folders_of_their_own(tmp_path, no_rank):
    """The time-named folder taken (by a run started in the same second): ``_1``, then ``_2``."""
    folders = []
    for taken in range(3):
        cfg = composed(f"{tmp_path}/runs/{SECOND}")
        second = Path(cfg.hydra.run.dir)  # resolved once: the run's start
        for n in range(taken):
            second.with_name(second.name + (f"_{n}" if n else "")).mkdir(
                parents=True, exist_ok=True
            )
        ClaimRunDir().on_run_start(cfg)
        folders.append((second, Path(cfg.hydra.run.dir)))
    assert [claimed.name for _, claimed in folders] == [
        second.name + suffix for (second, _), suffix in zip(folders, ["", "_1", "_2"], strict=True)
    ]
    assert all(claimed.is_dir() for _, claimed in folders)


@pytest.mark.parametrize(
    "run_dir",
    [
        "TMP/the_run",  # given by name: a resume into it
        "TMP/runs/${now:%Y-%m-%d}",  # a day's runs in one folder, on purpose
        "${oc.env:CHANGECAM_TEST_RUN_DIR,TMP/runs/" + SECOND + "}",
    ],
    ids=["by name", "coarser time", "from the environment"],
)
def test_a_folder_meant_to_be_shared_is_used_as_it_is(tmp_path, no_rank, monkeypatch, run_dir):
    monkeypatch.setenv("CHANGECAM_TEST_RUN_DIR", str(tmp_path / "the_run"))
    cfg = composed(run_dir.replace("TMP", str(tmp_path)))
    folder = Path(cfg.hydra.run.dir)
    folder.mkdir(parents=True)  # an earlier run's
    ClaimRunDir().on_run_start(cfg)
    assert Path(cfg.hydra.run.dir) == folder


@pytest.mark.parametrize(
    "env", [{"LOCAL_RANK": "1"}, {"SLURM_NTASKS": "4"}, {"OMPI_COMM_WORLD_SIZE": "2"}]
)
def test_a_rank_of_a_multi_process_job_keeps_the_time_named_folder(
    tmp_path, no_rank, monkeypatch, env
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = composed(f"{tmp_path}/runs/{SECOND}")
    folder = Path(cfg.hydra.run.dir)
    folder.mkdir(parents=True)  # rank 0's
    ClaimRunDir().on_run_start(cfg)
    assert Path(cfg.hydra.run.dir) == folder, "its ranks must agree on one folder"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_concurrent_claims_never_share_a_folder(tmp_path):
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(claim_folder(tmp_path / "2026-12-06_10-00-00"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8


def predict_with_every_second_taken(folders: Path, key: str, *args: str) -> Path:
    """predict.py (refused at once: no checkpoint, and not a rank) with ``key`` set to
    ``folders/<second>`` while every second of the next two minutes already has its folder
    (other runs'); returns the one folder it made, ``<second>_1``, having checked that it wrote
    nothing into the others."""
    import time

    now = time.time()
    taken = {time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now + s)) for s in range(120)}
    for name in taken:
        (folders / name).mkdir(parents=True)
    proc = run_script(
        "predict.py",
        [*args, f"{key}={folders}/{SECOND}", "ckpt_path=missing.ckpt"],
        cwd=folders.parent,
        timeout=120,
        check=False,
        env={name: "" for name in (*RANK_VARIABLES, *SIZE_VARIABLES)},  # not a rank
    )
    assert proc.returncode != 0
    made = [p for p in folders.iterdir() if p.name not in taken]
    assert len(made) == 1 and made[0].name.endswith("_1") and made[0].name[:-2] in taken
    assert not any(any((folders / name).iterdir()) for name in taken), "nothing in another's"
    return made[0]


def test_a_command_whose_second_is_taken_writes_a_folder_of_its_own(tmp_path):
    """Through Hydra (the callback in conf/hydra/default.yaml): every second of the next two
    minutes already has its folder (other runs'), so predict.py, refused at once (no input),
    writes its config and log into ``<second>_1``."""
    made = predict_with_every_second_taken(tmp_path / "runs", "hydra.run.dir")
    assert (made / ".hydra" / "config.yaml").is_file() and (made / "predict.log").is_file()


def test_multiruns_in_the_same_second_get_sweep_folders_of_their_own(tmp_path, no_rank):
    """The sweep's time-named folder taken: ``_1``, and every job's config, composed again from
    the sweep's overrides, is given the claimed folder."""
    cfg = composed(f"{tmp_path}/multiruns/{SECOND}", key="sweep")
    second = Path(cfg.hydra.sweep.dir)
    second.mkdir(parents=True)  # another multirun's
    MakeSweepDir().on_multirun_start(cfg)
    claimed = second.with_name(second.name + "_1")
    assert Path(cfg.hydra.sweep.dir) == claimed and claimed.is_dir()
    assert cfg.hydra.overrides.hydra[-1] == f"hydra.sweep.dir='{claimed}'"


@pytest.mark.parametrize(
    "sweep_dir",
    ["TMP/the_study", "TMP/multiruns/${now:%Y-%m-%d}"],
    ids=["by name", "coarser time"],
)
def test_a_sweep_folder_meant_to_be_shared_is_used_as_it_is(tmp_path, no_rank, sweep_dir):
    """E.g. an Optuna study continued in its old folder."""
    cfg = composed(sweep_dir.replace("TMP", str(tmp_path)), key="sweep")
    folder = Path(cfg.hydra.sweep.dir)
    folder.mkdir(parents=True)
    overrides = list(cfg.hydra.overrides.hydra)
    MakeSweepDir().on_multirun_start(cfg)
    assert Path(cfg.hydra.sweep.dir) == folder and list(cfg.hydra.overrides.hydra) == overrides


def test_a_sweep_folder_is_made_when_it_is_free(tmp_path, no_rank):
    cfg = composed(f"{tmp_path}/multiruns/{SECOND}", key="sweep")
    overrides = list(cfg.hydra.overrides.hydra)
    MakeSweepDir().on_multirun_start(cfg)
    assert Path(cfg.hydra.sweep.dir).is_dir() and list(cfg.hydra.overrides.hydra) == overrides


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("/a b/c,d=e/2026_1", "hydra.sweep.dir='/a b/c,d=e/2026_1'"),
        ("/it's/2026_1", "hydra.sweep.dir='/it\\'s/2026_1'"),
        ("/a${b}/2026_1", None),  # Hydra would resolve it
        ("/a\\b/2026_1", None),
    ],
)
def test_a_claimed_sweep_folder_is_written_as_an_override_that_reads_back(folder, expected):
    assert sweep_dir_override(Path(folder)) == expected


def test_a_multirun_whose_second_is_taken_writes_a_folder_of_its_own(tmp_path):
    """Through Hydra: every second of the next two minutes already has its sweep folder, so
    predict.py's multirun (its job refused at once: no checkpoint) puts ``multirun.yaml`` and its
    job ``0`` into ``<second>_1``."""
    made = predict_with_every_second_taken(tmp_path / "multiruns", "hydra.sweep.dir", "-m")
    assert (made / "multirun.yaml").is_file()
    assert (made / "0" / ".hydra" / "config.yaml").is_file()

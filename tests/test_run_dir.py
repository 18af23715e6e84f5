"""Run folders: a run started in the same second as another gets a folder of its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from changecam.cli.hydra_callbacks import RANK_VARIABLES, ClaimRunDir, claim_folder
from changecam.cli.launch import config_dir
from helpers import run_script


def composed(run_dir: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("predict", [f"hydra.run.dir={run_dir}"], return_hydra_config=True)


@pytest.fixture
def no_rank(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)


def test_runs_in_the_same_second_get_folders_of_their_own(tmp_path, no_rank):
    pattern = f"{tmp_path}/runs/${{now:%Y}}"  # one folder name for the whole year
    folders = []
    for _ in range(3):
        cfg = composed(pattern)
        ClaimRunDir().on_run_start(cfg)
        folders.append(Path(cfg.hydra.run.dir))
    year = folders[0].name
    assert [f.name for f in folders] == [year, f"{year}_1", f"{year}_2"]
    assert all(f.is_dir() and f.parent == tmp_path / "runs" for f in folders)


def test_a_folder_given_by_name_or_a_ranks_folder_is_used_as_it_is(tmp_path, no_rank, monkeypatch):
    given = tmp_path / "the_run"
    given.mkdir()  # a resume into it
    cfg = composed(str(given))
    ClaimRunDir().on_run_start(cfg)
    assert cfg.hydra.run.dir == str(given)
    (tmp_path / "runs").mkdir()
    pattern = f"{tmp_path}/runs/${{now:%Y}}"
    for env in ({"LOCAL_RANK": "1"}, {"SLURM_NTASKS": "4"}):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            cfg = composed(pattern)
            ClaimRunDir().on_run_start(cfg)
        assert Path(cfg.hydra.run.dir).name.isdigit(), env  # the time's name: ranks agree
    assert list((tmp_path / "runs").iterdir()) == [], "a rank claims nothing"


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


def test_two_commands_in_the_same_run_second_write_two_folders(tmp_path):
    """Through Hydra (the callback in conf/hydra/default.yaml): two predict.py runs whose
    folder is named by the year, each refused at once (no checkpoint), each with its own
    folder, config and log."""
    for _ in range(2):
        proc = run_script(
            "predict.py",
            [f"hydra.run.dir={tmp_path}/runs/${{now:%Y}}", "ckpt_path=missing.ckpt"],
            cwd=tmp_path,
            timeout=120,
            check=False,
            env={name: "" for name in (*RANK_VARIABLES, "SLURM_NTASKS")},  # not a rank
        )
        assert proc.returncode != 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == [folders[0].name, f"{folders[0].name}_1"]
    for folder in folders:
        assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "predict.log").is_file()

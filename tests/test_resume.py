"""Resume: ``ckpt_path=last`` continues exactly (RNG states included), keeps the W&B run id and
the CSV history, survives a SIGKILL in mid-epoch; checkpoints are written atomically."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from changecam.atomic import remove_stale_temporaries
from changecam.cli.train import resolve_ckpt_path, train
from changecam.training.checkpoint_io import AtomicCheckpointIO
from helpers import PLATEAU, REPO, compose_train, quiet_trainer, tiny_overrides

EPOCHS = 2


def resume_overrides(synthetic: Path, epochs: int, cam: bool = False) -> list[str]:
    """Quickstart, tiny, deterministic, with augmentation (so RNG states matter); the CAM
    callback only where asked (the kill-and-resume test runs the default callbacks)."""
    return [
        "experiment=quickstart",
        *tiny_overrides(synthetic),
        f"trainer.max_epochs={epochs}",
        f"module.scheduler.T_max={EPOCHS}",  # the same schedule whether stopped early or not
        "trainer.deterministic=true",
        "seed=7",
        *([] if cam else ["callbacks.cam_panels=null"]),
    ]


def cam_post_shares(root: Path) -> list[tuple[str, str]]:
    """``(step, val/cam/post_share/enc2)`` of every CAM row of ``<root>/run``'s metrics.csv."""
    with open(root / "run/csv/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    key = "val/cam/post_share/enc2"
    return sorted((r["step"], r[key]) for r in rows if r.get(key))


def net_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = net_weights(a), net_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(autouse=True)
def _restore_global_state():
    yield
    GlobalHydra.instance().clear()
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it process-wide


def test_resume_matches_uninterrupted_and_keeps_wandb_id_and_csv_history(tmp_path, tiny_synthetic):
    """Every row of the resumed ``csv/metrics.csv`` equals the uninterrupted run's: the epochs
    before the stop are kept, and the first run's end-of-run scores (logged after its last
    checkpoint) are dropped."""
    per_step = "trainer.log_every_n_steps=1"
    full = train(
        compose_train(
            tmp_path / "full", [*resume_overrides(tiny_synthetic, EPOCHS), "logger=csv", per_step]
        )
    )

    split = tmp_path / "split"
    first = [*resume_overrides(tiny_synthetic, 1), "logger=many", per_step]
    train(compose_train(split, first))
    run = split / "run"
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["rng_states"]["torch"].shape[0] == 1  # one set per process
    first_id = (run / "wandb" / "run_id.txt").read_text().strip()
    first_rows = (run / "csv/metrics.csv").read_text().splitlines()
    resumed = train(
        compose_train(
            split,
            [*resume_overrides(tiny_synthetic, EPOCHS), "logger=many", per_step, "ckpt_path=last"],
        )
    )
    assert resumed == full  # exact, every key
    assert_same_weights(run / "checkpoints/last.ckpt", tmp_path / "full/run/checkpoints/last.ckpt")
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, plus "-1" when both runs started within the same second
    assert len(offline_runs) == 2 and all(p.name.split("-")[3] == first_id for p in offline_runs)
    full_rows = (tmp_path / "full/run/csv/metrics.csv").read_text().splitlines()
    assert (run / "csv/metrics.csv").read_text().splitlines() == full_rows
    kept = (run / "csv/metrics.csv").read_bytes()
    assert b"\n" not in kept.replace(b"\r\n", b""), "one line end, as Lightning writes"
    assert len(first_rows) == 8  # header, 4 steps, val and train epoch, the test scores
    assert first_rows[-1].startswith("1,4,")  # the test scores: after the last checkpoint
    assert len(full_rows) == 14


def test_resume_with_loader_workers_matches_uninterrupted(tmp_path, tiny_synthetic):
    """A worker process's generator is not in the checkpoint: with workers, each sample's
    augmentation seed comes from the sampler (seed, epoch), so a resume draws the same ones."""
    workers = ["data.num_workers=1", "logger=none", "test=false"]
    train(compose_train(tmp_path / "full", [*resume_overrides(tiny_synthetic, EPOCHS), *workers]))
    split = [*resume_overrides(tiny_synthetic, 1), *workers]
    train(compose_train(tmp_path / "split", split))
    again = [*resume_overrides(tiny_synthetic, EPOCHS), *workers, "ckpt_path=last"]
    train(compose_train(tmp_path / "split", again))
    assert_same_weights(
        tmp_path / "split/run/checkpoints/last.ckpt", tmp_path / "full/run/checkpoints/last.ckpt"
    )


def test_resume_without_rng_states_draws_other_batches(tmp_path, tiny_synthetic):
    """The control: without the RNG callback the resumed weights differ from the uninterrupted ones."""
    no_rng = ["logger=none", "callbacks.rng_state=null", "test=false"]
    train(compose_train(tmp_path / "full", [*resume_overrides(tiny_synthetic, 2), *no_rng]))
    train(compose_train(tmp_path / "split", [*resume_overrides(tiny_synthetic, 1), *no_rng]))
    train(
        compose_train(
            tmp_path / "split", [*resume_overrides(tiny_synthetic, 2), *no_rng, "ckpt_path=last"]
        )
    )
    a = net_weights(tmp_path / "full/run/checkpoints/last.ckpt")
    b = net_weights(tmp_path / "split/run/checkpoints/last.ckpt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_ckpt_path_last_without_checkpoint_says_how(tmp_path, tiny_synthetic):
    cfg = compose_train(
        tmp_path, [*resume_overrides(tiny_synthetic, 1), "logger=none", "ckpt_path=last"]
    )
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        train(cfg)


def cli(args: list[str], full_error: bool = True, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1" if full_error else "0",
        "PYTHONPATH": str(REPO / "tests"),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], env=env, text=True, **kwargs
    )


def run_cli(args: list[str], cwd: Path) -> None:
    proc = cli(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def pause_at(step: str) -> list[str]:
    """Overrides that hold the run after training step ``step`` (``"epoch:batch"``)."""
    return [
        "+callbacks.slow._target_=slow_steps.SlowSteps",
        "+callbacks.slow.seconds=0",
        f"+callbacks.slow.pause_at='{step}'",
    ]


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux ``/proc``), of any of its threads."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def spawned_worker(pid: int) -> bool:
    """Whether process ``pid`` is a ``multiprocessing`` spawn child (the CAM panel process),
    by its command line."""
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return False


def kill_when_paused(
    args: list[str],
    cwd: Path,
    log_path: Path,
    step: str = "1:0",
    sig: signal.Signals = signal.SIGKILL,
    full_error: bool = True,
    wait_s: float = 30,
) -> subprocess.Popen:
    """Run train.py with ``args`` held after ``step`` (:func:`pause_at`; by default the first
    step of the second epoch, after the first checkpoint), send it ``sig`` there and wait up to
    ``wait_s`` for it to end; its output is in ``log_path``."""
    epoch, batch = step.split(":")
    held = f"slow_steps epoch={epoch} batch={batch}"
    with open(log_path, "w") as log:
        proc = cli(
            [*args, *pause_at(step)],
            full_error=full_error,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while held not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"step {step} did not end within 240 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=wait_s)
    return proc


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_synthetic):
    base = [
        *resume_overrides(tiny_synthetic, EPOCHS, cam=True),
        "logger=none",
        "print_config=false",
    ]
    killed = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    proc = kill_when_paused([*base, f"hydra.run.dir={killed}"], tmp_path, log_path)
    last = killed / "checkpoints" / "last.ckpt"
    assert proc.returncode == -signal.SIGKILL
    steps = [line for line in log_path.read_text().splitlines() if line.startswith("slow_steps")]
    assert steps[-1] == "slow_steps epoch=1 batch=0", steps  # mid-epoch
    assert not (killed / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0

    run_cli([*base, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    full = tmp_path / "full"
    run_cli([*base, f"hydra.run.dir={full}"], cwd=tmp_path)
    assert json.loads((killed / "metrics.json").read_text()) == json.loads(
        (full / "metrics.json").read_text()
    )
    assert_same_weights(killed / "checkpoints/last.ckpt", full / "checkpoints/last.ckpt")


@pytest.mark.slow
def test_panels_being_drawn_at_a_kill_are_drawn_again_on_resume(tmp_path, tiny_synthetic):
    """Background CAM panels: the kill came while epoch 0's were drawn or not yet logged, and
    the resumed run never redid that validation, so its panels and scalars were lost for good
    (helper-82). The checkpoint records them in flight; the resumed network, holding that
    epoch's weights, draws them again: the same PNG files and csv rows as without the kill."""
    base = [
        *resume_overrides(tiny_synthetic, EPOCHS, cam=True),
        "callbacks.cam_panels.mode=background",
        "callbacks.cam_panels.k=2",
        "module.threshold=0.1",
        "logger=csv",
        "test=false",
        "print_config=false",
    ]
    killed, full = tmp_path / "killed", tmp_path / "full"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = cli(
            [*base, f"hydra.run.dir={killed}", *pause_at("1:0")],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stopped: set[int] = set()  # the panel process, held before it draws epoch 0's panels
        deadline = time.monotonic() + 240
        while "slow_steps epoch=1 batch=0" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "step 1:0 did not end within 240 s"
            # only the panel process, once it runs its own program: a child stopped between
            # its fork and its exec holds the parent in fork_exec for good (a CI run: the
            # stopped child still had train.py's command line; the resource tracker was
            # stopped too)
            for child in set(children(proc.pid)) - stopped:  # again: until its exec, a
                if spawned_worker(child):  # child's command line is its parent's
                    os.kill(child, signal.SIGSTOP)
                    stopped.add(child)
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=30)
        for child in stopped:
            os.kill(child, signal.SIGKILL)
    assert stopped and not (killed / "cam/epoch_000").exists(), "epoch 0's panels were lost"
    run_cli([*base, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    run_cli([*base, f"hydra.run.dir={full}"], cwd=tmp_path)

    def cam_rows(run: Path) -> list[dict[str, str]]:
        with open(run / "csv/metrics.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        return sorted(
            (r for r in rows if any(v for k, v in r.items() if k.startswith("val/cam/"))),
            key=lambda r: int(r["step"]),
        )

    assert len(cam_rows(full)) == EPOCHS and cam_rows(killed) == cam_rows(full)
    for epoch in range(EPOCHS):
        panels = sorted((full / "cam" / f"epoch_{epoch:03d}").glob("*.png"))
        assert len(panels) == 2
        for panel in panels:
            again = killed / "cam" / f"epoch_{epoch:03d}" / panel.name
            assert again.read_bytes() == panel.read_bytes(), again


@pytest.mark.parametrize(
    ("every", "stop", "inside"),
    [
        (1, "2:0", []),
        (2, "2:0", []),
        (1, "1:2", ["+trainer.val_check_interval=0.5"]),
        # the epoch's last validation is not on its last batch (helper-90)
        (1, "2:0", ["+trainer.val_check_interval=0.75"]),
    ],
)
def test_a_plateau_schedule_resumes_with_the_step_its_checkpoint_was_written_before(
    tmp_path, tiny_synthetic, every, stop, inside
):
    """last.ckpt is written at an epoch's end before ReduceLROnPlateau steps on its val/f1,
    and Lightning does not step it when a fit resumes there: the resumed run was one cut of
    the learning rate behind (helper-88). Nor at the end of an epoch a fit resumed into from
    a checkpoint written inside it (helper-89)."""
    plateau = [
        *resume_overrides(tiny_synthetic, 4),
        *PLATEAU,
        "+module.scheduler.patience=0",
        "+module.scheduler.threshold=100",  # every step cuts the rate
        f"trainer.check_val_every_n_epoch={every}",
        "test=false",
        "logger=none",
        *inside,
    ]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_train(full, plateau))
    at = ["+callbacks.stop._target_=slow_steps.StopAt", f"+callbacks.stop.at='{stop}'"]
    with pytest.raises(SystemExit, match=f"stopped at step {stop}"):
        train(compose_train(stopped, [*plateau, *at]))
    train(compose_train(stopped, [*plateau, "ckpt_path=last"]))
    ends = [torch.load(r / "run/checkpoints/last.ckpt", weights_only=True) for r in (stopped, full)]
    assert ends[0]["lr_schedulers"] == ends[1]["lr_schedulers"]
    assert_same_weights(stopped / "run/checkpoints/last.ckpt", full / "run/checkpoints/last.ckpt")


@pytest.mark.slow
def test_panels_of_a_validation_inside_an_epoch_lost_at_a_stop_are_drawn_again(
    tmp_path, tiny_synthetic
):
    """Two validations per epoch: the epoch's first panels, logged when the second were
    submitted, cleared the record of the second, and the epoch's mark said it was logged, so
    the second's were never drawn again (helper-83). Kept by step."""
    base = [
        *resume_overrides(tiny_synthetic, EPOCHS, cam=True),
        "callbacks.cam_panels.mode=background",
        "callbacks.cam_panels.k=2",
        "module.threshold=0.1",
        "+trainer.val_check_interval=0.5",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_train(full, base))
    stop = ["+callbacks.stop._target_=slow_steps.StopAt", "+callbacks.stop.at='1:0'"]
    with pytest.raises(SystemExit, match="stopped at step 1:0"):
        train(compose_train(stopped, [*base, *stop]))
    train(compose_train(stopped, [*base, "ckpt_path=last"]))

    assert len(cam_post_shares(full)) == 2 * EPOCHS
    assert cam_post_shares(stopped) == cam_post_shares(full)


@pytest.mark.slow
def test_background_panels_resume_with_validation_every_other_epoch(
    tmp_path, tiny_synthetic, caplog
):
    """check_val_every_n_epoch=2: a resumed fit (no sanity check) had no validation loader at
    its start, so the panels ran inline and a lost epoch's were never drawn again; a step
    checkpoint written after more training recorded the panels still in flight, to be drawn
    again from weights that were not theirs (helper-115)."""
    base = [
        *resume_overrides(tiny_synthetic, 4, cam=True),
        "callbacks.cam_panels.mode=background",
        "callbacks.cam_panels.k=2",
        "module.threshold=0.1",
        "trainer.check_val_every_n_epoch=2",
        "callbacks.last_checkpoint.every_n_epochs=null",
        "+callbacks.last_checkpoint.every_n_train_steps=3",
        "logger=csv",
        "test=false",
    ]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_train(full, base))
    stop = ["+callbacks.stop._target_=slow_steps.StopAt", "+callbacks.stop.at='2:1'"]
    with pytest.raises(SystemExit, match="stopped at step 2:1"):
        train(compose_train(stopped, [*base, *stop]))
    with caplog.at_level(logging.INFO, logger="changecam"):
        train(compose_train(stopped, [*base, "ckpt_path=last"]))
    assert "CAM panels: background process" in caplog.text

    assert len(cam_post_shares(full)) == 2
    assert cam_post_shares(stopped) == cam_post_shares(full)


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_sigterm_mid_epoch_fails_and_says_how_to_resume(tmp_path, tiny_synthetic, sweep):
    """A SIGTERM (a cluster's time limit, ``kill``) is not a success: exit 143 with the resume
    command; in a sweep the sweep stops (the next job does not run) and names its folder."""
    where = tmp_path / "sweep" if sweep else tmp_path / "run"
    args = [
        *(["-m"] if sweep else []),
        *resume_overrides(tiny_synthetic, EPOCHS),
        "logger=none",
        "print_config=false",
        *(["model.fusion=diff,concat", f"hydra.sweep.dir={where}"] if sweep else []),
        *([] if sweep else [f"hydra.run.dir={where}"]),
    ]
    log_path = tmp_path / "out.log"
    proc = kill_when_paused(
        args, tmp_path, log_path, sig=signal.SIGTERM, full_error=False, wait_s=120
    )
    out = log_path.read_text()
    assert proc.returncode == 143, out[-3000:]
    if sweep:
        assert (
            "Error: Stopped: stopped by SIGTERM; resume its sweep with the same command and "
            f"ckpt_path=last hydra.sweep.dir={where}"
        ) in out, out[-3000:]
        assert sorted(p.name for p in where.iterdir() if p.is_dir()) == ["0"]
    else:
        assert (
            "Error: Stopped: stopped by SIGTERM; resume it with the same command and "
            f"ckpt_path=last hydra.run.dir={where}"
        ) in out, out[-3000:]
    job = where / "0" if sweep else where
    assert not (job / "metrics.json").exists()
    assert (job / "checkpoints" / "last.ckpt").is_file()
    # the command it prints resumes the run, or the sweep (its second job starts anew)
    resume = [a for a in args if "hydra.run.dir" not in a]
    run_cli([*resume, "ckpt_path=last", *([] if sweep else [f"hydra.run.dir={where}"])], tmp_path)
    for job in [where / "0", where / "1"] if sweep else [where]:
        assert "val/f1" in json.loads((job / "metrics.json").read_text())


SAVER = """
import sys, time, torch
from changecam.training.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
i = 0
while True:
    i += 1
    start = time.monotonic()
    io.save_checkpoint({"step": i, "w": torch.full((4_000_000,), float(i))}, path)
    print(i, time.monotonic() - start, flush=True)
"""


def test_kill_during_save_never_corrupts_the_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    durations = [float(proc.stdout.readline().split()[1]) for _ in range(3)]
    time.sleep(min(durations) / 2)  # in the middle of the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # complete, never truncated
    assert ckpt["step"] >= 3
    assert torch.equal(ckpt["w"], torch.full_like(ckpt["w"], float(ckpt["step"])))
    # at most the temporary file of the interrupted save lies beside it, removed at the next start
    left = {p.name for p in path.parent.iterdir()} - {"last.ckpt"}
    assert len(left) <= 1 and all(n.startswith(".last.ckpt.cc") for n in left), left
    assert {p.name for p in remove_stale_temporaries(path.parent)} == left
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_trainer_uses_the_atomic_checkpoint_io(tmp_path, tiny_synthetic):
    import hydra

    cfg = compose_train(tmp_path, [*resume_overrides(tiny_synthetic, 1), "logger=none"])
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


RANK_RNG = """
import random
from types import SimpleNamespace
import numpy as np, torch
from changecam.training.callbacks.rng_state import (
    CHECKPOINT_KEY, RNGStateCallback, capture_rng_states,
)
drawn = []
for seed in (1, 2):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    states = capture_rng_states()
    drawn.append((states, torch.rand(3), np.random.rand(3), random.random()))
gathered = {k: torch.stack([drawn[0][0][k], drawn[1][0][k]]) for k in drawn[0][0]}
for rank, (_, torch_draw, numpy_draw, python_draw) in enumerate(drawn):
    callback = RNGStateCallback()
    trainer = SimpleNamespace(world_size=2, global_rank=rank)
    callback.on_load_checkpoint(trainer, None, {CHECKPOINT_KEY: gathered})
    torch.manual_seed(99)
    callback.on_fit_start(trainer, None)
    assert torch.equal(torch.rand(3), torch_draw), rank
    assert np.array_equal(np.random.rand(3), numpy_draw), rank
    assert random.random() == python_draw, rank
print("restored")
"""


def test_each_ddp_rank_restores_its_own_rng_states():
    """Rank 1's states are row 1 of the checkpoint's gathered tensors (a view torch cannot set
    as it is: it crashed every DDP resume). In a process of its own: a crash fails this test,
    not the whole run."""
    proc = subprocess.run(
        [sys.executable, "-c", RANK_RNG], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "restored", (
        proc.returncode,
        proc.stderr[-2000:],
    )


def test_a_requeued_slurm_job_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """SLURM_RESTART_COUNT > 0 (submitit requeued the job after a timeout or preemption, in
    the same folder): no ckpt_path means the folder's last.ckpt, if it has one."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path(None, tmp_path) is None, "requeued before its first checkpoint"
    last.parent.mkdir()
    last.write_bytes(b"a checkpoint")
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"another")
    # started from another checkpoint: the requeued job resumes its own progress, not that
    assert resolve_ckpt_path(str(other), tmp_path) == str(last)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resolve_ckpt_path(None, tmp_path) is None, "a first run starts anew"
    assert resolve_ckpt_path(str(other), tmp_path) == str(other)


def test_a_requeued_training_run_continues_its_epochs(
    tmp_path, tiny_synthetic, monkeypatch, caplog
):
    train(compose_train(tmp_path, [*resume_overrides(tiny_synthetic, 1), "logger=none"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    steps = torch.load(last, weights_only=True)["global_step"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.INFO):
        train(compose_train(tmp_path, [*resume_overrides(tiny_synthetic, 2), "logger=none"]))
    assert f"Restored all states from the checkpoint at {last}" in caplog.text, caplog.text
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * steps


def test_ckpt_path_last_in_a_sweep(tmp_path, monkeypatch):
    """A job that had not started when its sweep stopped starts anew; a sweep folder in which
    no job has a last.ckpt (a mistyped hydra.sweep.dir) is refused. A sweep job's DDP rank,
    re-run as a plain run, knows it is one from its environment."""
    from changecam.cli.ddp import SWEEP_JOB_ENV

    monkeypatch.setenv(SWEEP_JOB_ENV, "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"no job of the sweep folder .* has one"):
        resolve_ckpt_path("last", tmp_path / "1")
    last = tmp_path / "0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"a checkpoint")
    assert resolve_ckpt_path("last", tmp_path / "0") == str(last)
    assert resolve_ckpt_path("last", tmp_path / "1") is None


def csv_layout(run: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(epoch, step, the keys it holds) of every row of a run's ``csv/metrics.csv``."""
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    return [(r["epoch"], r["step"], tuple(k for k, v in r.items() if v)) for r in rows]


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_keeps_the_csv_rows_of_its_step(
    tmp_path, tiny_synthetic
):
    """A validation inside an epoch saves last.ckpt before Lightning counts that batch: the
    batch's row and the validation's, logged at that step, are kept on resume; rows logged after
    the checkpoint are dropped. The same rows, and values, as an uninterrupted run's: the
    resumed run trains on the rest of that epoch's batches (not its first ones again), with
    the same augmentations, and its train/loss_epoch averages the whole epoch (helper-82)."""
    base = [
        *resume_overrides(tiny_synthetic, EPOCHS),
        "+trainer.val_check_interval=0.5",  # 4 batches: validations after batches 1 and 3
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
        "print_config=false",
    ]
    killed = tmp_path / "killed"
    proc = kill_when_paused(
        [*base, f"hydra.run.dir={killed}"], tmp_path, tmp_path / "killed.log", "1:2"
    )
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(killed / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6  # saved by the validation after epoch 1's batch 1
    run_cli([*base, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    full = tmp_path / "full"
    run_cli([*base, f"hydra.run.dir={full}"], cwd=tmp_path)
    assert csv_layout(killed) == csv_layout(full)
    metrics = "csv/metrics.csv"
    assert (killed / metrics).read_text() == (full / metrics).read_text()
    resumed, uninterrupted = (net_weights(r / "checkpoints/last.ckpt") for r in (killed, full))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def step_saves_with_early_stopping(
    tiny_synthetic: Path, epochs: int, every: int, patience: int, *extra: str
) -> list[str]:
    """``last.ckpt`` every ``every`` training steps, early stopping on ``val/loss`` that never
    improves (it stops after ``patience`` validations past the first), a csv log of every
    step, no test."""
    return [
        *resume_overrides(tiny_synthetic, epochs),
        *extra,
        "callbacks.last_checkpoint.every_n_epochs=null",
        f"+callbacks.last_checkpoint.every_n_train_steps={every}",
        "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.early_stopping.monitor=val/loss",
        f"+callbacks.early_stopping.patience={patience}",
        "+callbacks.early_stopping.min_delta=100",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]


def stopped_at_1_2_and_resumed(
    tmp_path: Path, base: list[str], full_step: int, held_step: int, held: Any = None
) -> tuple[Path, Path]:
    """An uninterrupted run (ending at ``full_step``) and one stopped at epoch 1, batch 2 (its
    ``last.ckpt`` at ``held_step``, which ``held`` may check further), then resumed: their
    metrics.csv and last weights are the same. Returns both folders."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_train(full, base))
    last = "run/checkpoints/last.ckpt"
    assert torch.load(full / last, weights_only=True)["global_step"] == full_step
    stop = ["+callbacks.stop._target_=slow_steps.StopAt", "+callbacks.stop.at='1:2'"]
    with pytest.raises(SystemExit, match="stopped at step 1:2"):
        train(compose_train(stopped, [*base, *stop]))
    checkpoint = torch.load(stopped / last, weights_only=True)
    assert checkpoint["global_step"] == held_step
    if held is not None:
        held(checkpoint)
    train(compose_train(stopped, [*base, "ckpt_path=last"]))
    metrics = "run/csv/metrics.csv"
    assert (stopped / metrics).read_text() == (full / metrics).read_text()
    assert_same_weights(stopped / last, full / last)
    return full, stopped


def test_a_checkpoint_every_n_steps_on_a_validating_batch_holds_that_validation(
    tmp_path, tiny_synthetic
):
    """A checkpoint every so many training steps, due on a batch a validation follows, was saved
    before that validation (and the validation's own save skipped as of the same step): the
    resumed run never counted it, so its early stopping (here) or best checkpoint differed from
    an uninterrupted run's. It is saved after the validation instead."""
    # 4 batches: validations after batches 1 and 3, saves due on the same batches; early
    # stopping stops at the fourth validation (step 8)
    base = step_saves_with_early_stopping(
        tiny_synthetic, 3, 2, 3, "+trainer.val_check_interval=0.5"
    )
    stopped_at_1_2_and_resumed(tmp_path, base, full_step=8, held_step=6)


def test_a_checkpoint_every_n_steps_on_an_epochs_last_batch_holds_its_validation(
    tmp_path, tiny_synthetic
):
    """Due on an epoch's last batch, with one validation per epoch, the held save was written
    at the validation's end, before the best checkpoint and early stopping took that validation
    in at the epoch's end: the resumed run's best checkpoint and early stopping differed
    (helper-137). It is written at the epoch's end, after them."""

    def holds_the_validation(checkpoint: dict) -> None:
        states = checkpoint["callbacks"]
        assert any(
            k.startswith("FiniteModelCheckpoint") and v["best_k_models"] for k, v in states.items()
        )
        assert any(
            k.startswith("EarlyStopping")
            and v["wait_count"] == 0
            and math.isfinite(v["best_score"])
            for k, v in states.items()
        )

    # 4 batches per epoch, a save on each epoch's last batch; early stopping stops at the third
    # validation (step 12)
    base = step_saves_with_early_stopping(tiny_synthetic, 4, 4, 2)
    full, stopped = stopped_at_1_2_and_resumed(
        tmp_path, base, full_step=12, held_step=4, held=holds_the_validation
    )
    best = "run/checkpoints/best.ckpt"
    assert (
        torch.load(stopped / best, weights_only=True)["epoch"]
        == torch.load(full / best, weights_only=True)["epoch"]
    )


def test_a_fit_that_counts_steps_is_not_resumed_from_an_epochs_end(tmp_path, tiny_synthetic):
    """With trainer.max_steps set, Lightning resumed an epoch-end last.ckpt inside that epoch
    again: one epoch lost, and early stopping failed on its second epoch end (helper-140). It
    is refused, naming the setting and the epoch."""
    from changecam.training.checkpoint import CheckpointError

    base = [*resume_overrides(tiny_synthetic, 3), "+trainer.max_steps=100", "test=false"]
    stop = ["+callbacks.stop._target_=slow_steps.StopAt", "+callbacks.stop.at='1:2'"]
    with pytest.raises(SystemExit, match="stopped at step 1:2"):
        train(compose_train(tmp_path, [*base, *stop]))
    with pytest.raises(
        CheckpointError, match=r"trainer.max_steps=100: it was saved at the end of epoch 0"
    ):
        train(compose_train(tmp_path, [*base, "ckpt_path=last"]))
    # without max_steps the same checkpoint resumes (trainer.max_epochs ends the run)
    train(
        compose_train(
            tmp_path, [*resume_overrides(tiny_synthetic, 3), "test=false", "ckpt_path=last"]
        )
    )
    assert (
        torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 12
    )
    # a finished run is only scored (a requeue after a kill while it was scored), max_steps or
    # not (helper-142: refused too); also one that max_steps itself ended
    train(compose_train(tmp_path, [*base, "ckpt_path=last"]))
    ended = tmp_path / "ended"
    by_steps = [*resume_overrides(tiny_synthetic, 3), "+trainer.max_steps=8", "test=false"]
    train(compose_train(ended, by_steps))
    train(compose_train(ended, [*by_steps, "ckpt_path=last"]))
    assert torch.load(ended / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 8


@pytest.mark.parametrize(
    ("min_epochs", "min_steps", "goes_on"),
    [(None, None, False), (2, None, False), (4, None, True), (None, 100, True)],
)
def test_a_run_stopped_early_before_its_minimum_still_has_epochs_to_go(
    tmp_path, min_epochs, min_steps, goes_on
):
    """Early stopping flagged before ``trainer.min_epochs``/``min_steps`` does not stop the fit
    (Lightning trains on), so its epoch-end checkpoints are refused under max_steps like any
    unfinished run's (helper-143: taken as finished, and the resume crashed)."""
    from changecam.cli.train import epoch_to_go_on_from
    from changecam.training.loop_state import read_loop_state

    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "global_step": 8,
            "loops": {
                "fit_loop": {
                    "epoch_progress": {
                        "total": {"ready": 2, "started": 2, "processed": 2, "completed": 1}
                    }
                }
            },
            "callbacks": {
                "EarlyStopping{'monitor': 'val/f1'}": {"stopping_reason": 2, "stopped_epoch": 0}
            },
        },
        path,
    )
    state = read_loop_state(path)
    epoch = epoch_to_go_on_from(state, 100, 4, min_epochs, min_steps)
    assert epoch == (1 if goes_on else None)
    assert epoch_to_go_on_from(state, 8, 4, min_epochs, min_steps) is None  # max_steps reached


def test_a_resume_from_a_validation_every_other_epoch_is_exact(tmp_path, tiny_synthetic):
    """With trainer.check_val_every_n_epoch=2 last.ckpt is written by a validation before its
    epoch is closed; the resumed fit re-enters that epoch and creates a loader iterator, which
    draws from torch's generator: the RNG states restored at fit start were consumed by it and
    the next epoch augmented otherwise (helper-82)."""
    every_other = [
        "module.scheduler.T_max=4",
        "trainer.check_val_every_n_epoch=2",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    train(compose_train(full, [*resume_overrides(tiny_synthetic, 4), *every_other]))
    train(compose_train(split, [*resume_overrides(tiny_synthetic, 2), *every_other]))
    resumed = [*resume_overrides(tiny_synthetic, 4), *every_other, "ckpt_path=last"]
    train(compose_train(split, resumed))
    metrics = "run/csv/metrics.csv"
    assert (split / metrics).read_text() == (full / metrics).read_text()
    weights = [net_weights(r / "run/checkpoints/last.ckpt") for r in (split, full)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_scoring_a_checkpoint_in_its_run_keeps_the_csv_history(tmp_path, tiny_synthetic):
    """train=false ckpt_path=last only scores: the training rows stay and its rows follow (at
    step 0: Lightning's validate() has no training step). A later resume drops them, as they
    are no part of the training history, and ends with an uninterrupted run's rows."""
    per_step = ["logger=csv", "trainer.log_every_n_steps=1"]
    full = tmp_path / "full"
    train(compose_train(full, [*resume_overrides(tiny_synthetic, EPOCHS), *per_step]))
    split = tmp_path / "split"
    first = [*resume_overrides(tiny_synthetic, 1), *per_step, "test=false"]
    train(compose_train(split, first))
    trained = (split / "run/csv/metrics.csv").read_text().splitlines()
    train(compose_train(split, [*first, "train=false", "ckpt_path=last"]))
    scored = (split / "run/csv/metrics.csv").read_text().splitlines()
    assert scored[: len(trained)] == trained and len(scored) == len(trained) + 1
    assert scored[-1].startswith("0,0,")
    resumed = [*resume_overrides(tiny_synthetic, EPOCHS), *per_step, "ckpt_path=last"]
    train(compose_train(split, resumed))
    assert (split / "run/csv/metrics.csv").read_text() == (full / "run/csv/metrics.csv").read_text()


def test_a_csv_row_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from changecam.training.csv_logger import _HistoryKeepingWriter

    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text(
        "epoch,step,train/loss_step\r\n0,0,0.9\r\n0,1,0.8\r\n0,2\r\n1,"  # a short row, a cut line
    )
    writer = _HistoryKeepingWriter(str(log_dir), keep_before=10)
    assert writer.metrics_keys == ["epoch", "step", "train/loss_step"]
    writer.log_metrics({"train/loss_step": 0.7}, step=3)
    writer.save()
    assert (log_dir / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss_step",
        "0,0,0.9",
        "0,1,0.8",
        ",3,0.7",
    ]


def test_a_csv_without_steps_keeps_no_rows(tmp_path):
    from changecam.training.csv_logger import _HistoryKeepingWriter

    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,val/f1\r\n0,0.5\r\n")
    _HistoryKeepingWriter(str(log_dir), keep_before=10)
    assert (log_dir / "metrics.csv").read_text().splitlines() == ["epoch,val/f1"]


def test_a_new_run_in_an_old_run_folder_starts_its_own_history(tmp_path, tiny_synthetic):
    """Without ckpt_path the run is not the folder's earlier run resumed: it gets a W&B run of
    its own, and the earlier run's CAM panels go (a later epoch's would look like its own)."""
    base = [
        *resume_overrides(tiny_synthetic, 2, cam=True),
        "logger=wandb",
        "callbacks.cam_panels.mode=inline",
        "callbacks.cam_panels.k=2",
        "test=false",
    ]
    train(compose_train(tmp_path, base))
    run = tmp_path / "run"
    first_id = (run / "wandb" / "run_id.txt").read_text().strip()
    assert sorted(p.name for p in (run / "cam").iterdir()) == ["epoch_000", "epoch_001"]
    train(compose_train(tmp_path, [*base, "trainer.max_epochs=1"]))
    assert (run / "wandb" / "run_id.txt").read_text().strip() != first_id
    assert sorted(p.name for p in (run / "cam").iterdir()) == ["epoch_000"]


def test_a_requeued_job_without_a_checkpoint_starts_its_own_history(
    tmp_path, tiny_synthetic, monkeypatch
):
    """A SLURM requeue before the first checkpoint trains anew: a W&B run of its own too."""
    base = [*resume_overrides(tiny_synthetic, 1), "logger=wandb", "test=false"]
    train(compose_train(tmp_path, base))
    run = tmp_path / "run"
    first_id = (run / "wandb" / "run_id.txt").read_text().strip()
    (run / "checkpoints" / "last.ckpt").unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_train(tmp_path, base))
    assert (run / "wandb" / "run_id.txt").read_text().strip() != first_id


def test_late_background_cam_rows_neither_end_nor_leave_the_kept_history():
    """Background CAM scalars arrive after rows of later steps (helper-69: the history used to
    stop at them, dropping the epoch before the checkpoint): kept when logged before the
    checkpoint's step, dropped after it; a scoring appended at step 0 still ends the history."""
    from changecam.training.csv_logger import _history

    keys = {"train": "train/loss", "val": "val/f1", "cam": "val/cam/post_share/enc2"}
    keys["test"] = "test/f1"

    def row(step: int, **values: str) -> dict[str, str]:
        return {"step": str(step), "epoch": "", **{k: values.get(n, "") for n, k in keys.items()}}

    rows = [
        row(7, train="0.9"),
        row(15, val="0.1"),
        row(23, train="0.7"),
        row(15, cam="0.4"),  # epoch 0's panels, late
        row(31, val="0.2"),
        row(31, cam="0.5"),
        row(39, train="0.5"),  # after the checkpoint (step 32)
        row(47, val="0.3"),
        row(47, cam="0.6"),
        row(0, test="0.3"),  # a finished run's scoring
        row(15, cam="0.4"),
    ]
    kept = _history(rows, keep_before=32)
    assert [(r["step"], r["val/cam/post_share/enc2"] or "-") for r in kept] == [
        ("7", "-"),
        ("15", "-"),
        ("23", "-"),
        ("15", "0.4"),
        ("31", "-"),
        ("31", "0.5"),
    ]


def test_a_checkpoint_saved_after_fit_owes_no_plateau_step(tmp_path, tiny_synthetic):
    """trainer.save_checkpoint after fit() returned recorded the step fit() had taken already,
    and a resume took it twice (helper-89)."""

    from changecam.data import ChangeDetectionDataModule
    from changecam.models import SiameseUNet
    from changecam.training.module import PLATEAU_KEY, ChangeDetectionModule

    torch.manual_seed(0)
    module = ChangeDetectionModule(
        net=SiameseUNet(3, 4, 2),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max"),
    )
    data = ChangeDetectionDataModule(tiny_synthetic, layout="levir", patch_size=32, batch_size=4)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 1  # fit() stepped it
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert PLATEAU_KEY not in torch.load(tmp_path / "after.ckpt", weights_only=True)


@pytest.mark.parametrize(
    "rule",
    [
        # no epoch improves: stops after the second
        ["+callbacks.early_stopping.patience=0", "+callbacks.early_stopping.min_delta=100"],
        # a threshold met at the first validation: stopped at epoch 0 (helper-115)
        ["+callbacks.early_stopping.stopping_threshold=1000"],
    ],
)
def test_a_run_its_early_stopping_stopped_trains_no_further_when_resumed(
    tmp_path, tiny_synthetic, rule
):
    """A requeue of a run killed while it was scored after early stopping resumed the fit and
    trained until the next validation stopped it again (helper-90)."""
    stopping = [
        *resume_overrides(tiny_synthetic, 6),
        "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.early_stopping.monitor=val/loss",
        "+callbacks.early_stopping.mode=min",
        *rule,
        "test=false",
        "logger=none",
    ]
    train(compose_train(tmp_path, stopping))
    last = tmp_path / "run/checkpoints/last.ckpt"
    stopped = torch.load(last, weights_only=True)
    assert stopped["epoch"] < 5
    train(compose_train(tmp_path, [*stopping, "ckpt_path=last"]))
    again = torch.load(last, weights_only=True)
    assert (again["epoch"], again["global_step"]) == (stopped["epoch"], stopped["global_step"])


def test_a_run_validating_every_so_much_time_trains(tmp_path, tiny_synthetic):
    """``trainer.val_check_interval='00:00:10:00'`` (Lightning's time-based validation) failed
    building the train loader: Lightning sets no val_check_interval then (helper-98)."""
    timed = [*resume_overrides(tiny_synthetic, 1), "+trainer.val_check_interval='00:00:10:00'"]
    metrics = train(compose_train(tmp_path, [*timed, "logger=none", "test=false"]))
    assert "val/f1" in metrics


def test_a_run_max_steps_stopped_inside_an_epoch_resumes_with_the_metrics_of_an_uninterrupted_one(
    tmp_path, tiny_synthetic
):
    """trainer.max_steps that ends a fit inside an epoch logs that partial epoch's
    train/loss_epoch; resumed from a checkpoint a validation saved at that step (inside the
    epoch), the run logs the whole epoch's at the epoch's end, so the partial value goes:
    metrics.csv as an uninterrupted run's (helper-147: both were kept)."""
    base = [
        *resume_overrides(tiny_synthetic, EPOCHS),
        "+trainer.val_check_interval=0.5",  # 4 batches: validations after batches 1 and 3
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_train(full, base))
    train(compose_train(stopped, [*base, "+trainer.max_steps=6"]))  # epoch 1, batch 2
    partial = [row for row in csv_layout(stopped / "run") if "train/loss_epoch" in row[2]]
    assert [row[:2] for row in partial] == [("0", "3"), ("1", "5")]  # epoch 1: its first half
    train(compose_train(stopped, [*base, "ckpt_path=last"]))
    metrics = "run/csv/metrics.csv"
    assert (stopped / metrics).read_text() == (full / metrics).read_text()


def test_a_finished_runs_requeue_keeps_its_last_epochs_loss(tmp_path, tiny_synthetic):
    """last.ckpt written by the validation on the last epoch's last batch (before the epoch
    closed): the requeued run only scores, never logging that epoch's loss again, so the
    kept one stays (helper-152: dropped when the resume began)."""
    base = [
        *resume_overrides(tiny_synthetic, 1),
        "+trainer.val_check_interval=0.5",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    train(compose_train(tmp_path, base))
    before = [r[:2] for r in csv_layout(tmp_path / "run") if "train/loss_epoch" in r[2]]
    assert before == [("0", "3")]
    train(compose_train(tmp_path, [*base, "ckpt_path=last"]))
    after = [r[:2] for r in csv_layout(tmp_path / "run") if "train/loss_epoch" in r[2]]
    assert after == before


def test_a_checkpoint_max_steps_wrote_at_a_cut_epochs_end_is_resumed_with_a_warning(
    tmp_path, tiny_synthetic, caplog
):
    """Without a validation at the stop, last.ckpt is written by the cut epoch's end: Lightning
    resumes it with the next epoch, the rest of the cut one untrained (helper-149). Said at
    the resume; the partial epoch's train/loss_epoch, the mean of the batches it trained,
    stays. A checkpoint of a whole epoch is not warned about."""
    from changecam.training.loop_state import read_loop_state

    base = [
        *resume_overrides(tiny_synthetic, 3),
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    stopped = tmp_path / "stopped"
    train(compose_train(stopped, [*base, "+trainer.max_steps=6"]))  # epoch 1, batch 2 of 4
    last = stopped / "run/checkpoints/last.ckpt"
    assert read_loop_state(last).cut == (1, 2)
    with caplog.at_level("WARNING"):
        train(compose_train(stopped, [*base, "ckpt_path=last"]))
    assert (
        "was saved when the fit was stopped (trainer.max_steps or trainer.max_time) after 2 "
        "batch(es) of epoch 1: Lightning counts that epoch as trained, so the rest of epoch 1 is "
        "not trained (a run that trains on starts epoch 2"
    ) in caplog.text
    rows = [row[:2] for row in csv_layout(stopped / "run") if "train/loss_epoch" in row[2]]
    assert rows == [("0", "3"), ("1", "5"), ("2", "9")]
    assert read_loop_state(last).cut is None  # the resumed run ended with a whole epoch


def test_a_cut_epochs_checkpoint_refused_under_max_steps_is_named_as_cut(tmp_path, tiny_synthetic):
    """Refused with a larger trainer.max_steps as any epoch-end checkpoint, it was called one
    saved "at the end of epoch 1" (helper-161)."""
    from changecam.training.checkpoint import CheckpointError

    base = [*resume_overrides(tiny_synthetic, 3), "test=false"]
    train(compose_train(tmp_path, [*base, "+trainer.max_steps=6"]))  # epoch 1, batch 2 of 4
    with pytest.raises(
        CheckpointError,
        match=r"trainer.max_steps=10: it was saved when the fit was stopped after 2 batch\(es\) "
        r"of epoch 1, as that epoch's end",
    ):
        train(compose_train(tmp_path, [*base, "+trainer.max_steps=10", "ckpt_path=last"]))


@pytest.mark.parametrize(
    ("counts", "last_batch", "stepped", "expected"),
    [
        # (ready, started, processed, completed): at_epoch_end, inside_epoch, cut, resumed_step
        ((2, 2, 2, 1), True, 6, (True, False, None, 6)),  # an epoch's end
        ((2, 2, 2, 1), False, 5, (True, False, (1, 2), 6)),  # max_steps cut epoch 1 at batch 2
        ((2, 2, 1, 1), False, 5, (False, True, None, 6)),  # a validation inside epoch 1
        (None, None, None, (False, False, None, 6)),  # no loop state (not a fit's checkpoint)
        # partial counters, as a hand-made checkpoint may hold (the readers before took them)
        ({"processed": 2, "completed": 1}, False, 5, (False, False, (1, 2), 6)),
        ({"processed": 1, "completed": 1}, None, None, (False, True, None, 6)),
    ],
)
def test_where_a_checkpoint_was_saved_is_read_from_its_loop_counters(
    tmp_path, counts, last_batch, stepped, expected
):
    """The one reader of a checkpoint's fit-loop counters every resume decision uses."""
    from changecam.training.loop_state import read_loop_state

    fit_loop = {}
    if counts is not None:
        names = ("ready", "started", "processed", "completed")
        total = counts if isinstance(counts, dict) else dict(zip(names, counts, strict=True))
        fit_loop = {
            "epoch_progress": {"total": total},
            "epoch_loop.batch_progress": {"is_last_batch": last_batch, "current": {"processed": 2}},
            "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
        }
    torch.save({"epoch": 1, "global_step": 6, "loops": {"fit_loop": fit_loop}}, tmp_path / "c.ckpt")
    state = read_loop_state(tmp_path / "c.ckpt")
    assert (state.at_epoch_end, state.inside_epoch, state.cut, state.resumed_step) == expected
    # without global_step: the optimizer steps' count Lightning restores it from (0 kept no
    # row of metrics.csv, helper-163), else the batches that stepped (helper-164)
    optimizer = {"optimizer": {"step": {"total": {"completed": 6}}}}
    counted = {**fit_loop, "epoch_loop.automatic_optimization.optim_progress": optimizer}
    torch.save({"epoch": 1, "loops": {"fit_loop": counted}}, tmp_path / "d.ckpt")
    assert read_loop_state(tmp_path / "d.ckpt").resumed_step == expected[3]
    torch.save({"epoch": 1, "loops": {"fit_loop": fit_loop}}, tmp_path / "e.ckpt")
    bare = read_loop_state(tmp_path / "e.ckpt")
    assert bare.resumed_step == (None if stepped is None else stepped + (not bare.at_epoch_end))

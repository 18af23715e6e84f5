"""The CAM-panel callback: W&B panels, table and share history; PNG files with any logger; DDP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from changecam.cli.train import train
from changecam.explain import ExplainSettings, FaithfulnessSettings
from changecam.models import SiameseUNet
from changecam.training.callbacks import cam_panels
from changecam.training.callbacks.cam_panels import (
    DEFAULT_EXPLAIN,
    HELD_UP_WARN_S,
    CamPanels,
    select_samples,
)
from changecam.training.callbacks.cam_worker import (
    BackgroundExplainer,
    CamWorkerError,
    explain_samples,
)
from helpers import compose_train, run_script, tiny_overrides
from wandb_offline import history

K = 3


def cam_settings(steps: int, dpi: int):
    """The callback's default settings with a shorter curve and smaller panels."""
    return replace(
        DEFAULT_EXPLAIN,
        dpi=dpi,
        faithfulness=FaithfulnessSettings(steps=steps, dates=("both",)),
    )


def test_select_samples_is_fixed_and_includes_change():
    masks = [torch.zeros(1, 4, 4) for _ in range(10)]
    masks[7][..., :2, :] = 1
    masks[2][..., 0, 0] = 1
    chosen = select_samples(masks, 4)
    assert chosen == select_samples(masks, 4) and len(chosen) == 4 and len(set(chosen)) == 4
    assert {2, 7} <= set(chosen)
    assert select_samples(masks[:3], 8) == [0, 1, 2]


@pytest.mark.parametrize(
    ("mode", "threads", "processes", "cores", "background"),
    [
        ("auto", 2, 1, 2, False),  # training keeps every core busy: the work is cheaper inline
        ("auto", 1, 1, 2, True),
        ("auto", 1, 2, 2, False),  # two CPU DDP ranks of one thread (helper-158: background)
        ("auto", 1, 2, 4, True),
        ("background", 2, 1, 2, True),
        ("inline", 1, 1, 8, False),
    ],
)
def test_auto_mode_goes_to_the_background_only_with_a_free_core(
    monkeypatch, tmp_path, mode, threads, processes, cores, background
):
    monkeypatch.setattr(cam_panels, "usable_cores", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    module = torch.nn.Linear(1, 1)  # anything with a device: the CPU here
    module.device = torch.device("cpu")
    assert CamPanels(tmp_path, mode=mode)._background(module, processes) is background
    with pytest.raises(ValueError, match="mode='thread'"):
        CamPanels(tmp_path, mode="thread")
    with pytest.raises(ValueError, match="worker_device='gpu'.*'cpu', 'training'"):
        CamPanels(tmp_path, worker_device="gpu")
    # the ROI target needs a mask the callback never reads: refused at start, not after epoch 1
    with pytest.raises(ValueError, match="cam_panels.explain.target=roi"):
        CamPanels(tmp_path, explain=ExplainSettings(target="roi", roi="roi.png"))


def tiny_samples(k: int = 2, size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(k, 1, size, size)
    mask[:, :, 8:20, 4:16] = 1
    return {
        "pre": torch.rand(k, 3, size, size, generator=gen),
        "post": torch.rand(k, 3, size, size, generator=gen),
        "mask": mask,
        "name": [f"pair_{i}" for i in range(k)],
    }


def test_background_explains_a_snapshot_like_inline_and_raises_its_failures(tmp_path):
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2)
    samples = tiny_samples()
    settings = cam_settings(steps=2, dpi=30)
    expected = explain_samples(net, samples, settings, tmp_path / "in", 3, 17)
    worker = BackgroundExplainer(net.config(), samples, settings, tmp_path / "bg")
    try:
        assert worker.submit(net, epoch=3, step=17) == []
        assert worker.waited_s == 0.0  # nothing was in flight
        with torch.no_grad():  # training goes on: the queued job must keep the old weights
            for p in net.parameters():
                p.zero_()
        (got,) = worker.wait(0)
        assert (got.epoch, got.step, got.names) == (3, 17, ["pair_0", "pair_1"])
        assert got.shares.keys() == expected.shares.keys() and got.gap_layer == "enc2"
        for layer in got.shares:
            np.testing.assert_allclose(got.shares[layer], expected.shares[layer], atol=1e-4)
        np.testing.assert_allclose(got.gap, expected.gap, atol=1e-4)
        assert got.f1 == expected.f1 and got.iou == expected.iou
        np.testing.assert_array_equal(got.predicted, expected.predicted)
        assert len(got.panels) == 2 and got.panels[0].shape == expected.panels[0].shape
        assert np.abs(got.panels[0].astype(float) - expected.panels[0]).mean() < 1.0
        assert sorted(p.name for p in (tmp_path / "bg" / "epoch_003").iterdir()) == [
            "pair_0.png",
            "pair_1.png",
        ]
        assert worker.poll() == []

        worker.submit(SiameseUNet(3, 8, 2), epoch=4, step=20)  # weights of another network
        with pytest.raises(CamWorkerError, match=r"(?s)epoch 4.*size mismatch"):
            worker.wait(0)
    finally:
        worker.close()


def test_the_background_process_explains_on_the_device_it_is_given(tmp_path):
    """``worker_device=training`` hands the training device to the process (a meta device
    here, where explaining cannot finish: the failure names it)."""
    net = SiameseUNet(3, 4, 2)
    worker = BackgroundExplainer(
        net.config(), tiny_samples(), cam_settings(steps=2, dpi=30), tmp_path, device="meta"
    )
    try:
        worker.submit(net, epoch=0, step=0)
        with pytest.raises(CamWorkerError, match="meta tensor"):
            worker.wait(0)
    finally:
        worker.close()


def test_a_submit_waits_for_the_job_in_flight_and_says_how_long(tmp_path, caplog):
    net = SiameseUNet(3, 4, 2)
    worker = BackgroundExplainer(
        net.config(), tiny_samples(), cam_settings(steps=2, dpi=30), tmp_path
    )
    try:
        worker.submit(net, epoch=0, step=1)
        started = time.perf_counter()
        (first,) = worker.submit(net, epoch=1, step=2)  # returns once epoch 0's job is done
        assert first.epoch == 0
        assert 0 < worker.waited_s <= time.perf_counter() - started
        assert [r.epoch for r in worker.wait(0)] == [1]
    finally:
        worker.close()

    callback = CamPanels(tmp_path / "cam", k=2, mode="background")
    with caplog.at_level(logging.INFO, logger="changecam"):
        callback._report_held_up(3, HELD_UP_WARN_S / 2)  # short waits are not worth a line
        callback._report_held_up(4, 12.34)
        callback._report_held_up(5, 2.0)
    records = [r for r in caplog.records if "waited" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]  # warned once
    assert (
        records[0]
        .getMessage()
        .startswith("CAM panels: validation epoch 4 waited 12.3 s for the background process")
    )
    assert "callbacks.cam_panels.mode=inline" in records[0].getMessage()


def test_the_background_process_outlives_a_signal_to_the_process_group(tmp_path):
    """A scheduler's SIGTERM to the job's process group killed the process, and training ended
    with "the CAM panel process died" (status 1) instead of stopping with status 143 and its
    resume command (helper-184); Ctrl-C printed its traceback into the run's output."""
    net = SiameseUNet(3, 4, 2)
    worker = BackgroundExplainer(
        net.config(), tiny_samples(), cam_settings(steps=2, dpi=30), tmp_path
    )
    try:
        worker.submit(net, epoch=0, step=1)
        assert [r.epoch for r in worker.wait(0)] == [0]  # the process runs its body
        os.kill(worker._process.pid, signal.SIGTERM)
        os.kill(worker._process.pid, signal.SIGINT)
        worker.submit(net, epoch=1, step=2)
        assert [r.epoch for r in worker.wait(0)] == [1]
    finally:
        worker.close()
    assert not worker._process.is_alive()


def test_a_process_killed_by_the_signal_that_stops_training_loses_its_job_quietly(tmp_path, caplog):
    """Signalled in its first seconds, before it ignores signals (helper-191), the process
    dies: while training is stopping on that signal its job is lost with a warning, so the run
    still ends with status 143 and its resume command, not "the process died"."""
    net = SiameseUNet(3, 4, 2)
    worker = BackgroundExplainer(
        net.config(), tiny_samples(), DEFAULT_EXPLAIN, tmp_path, stopping=lambda: True
    )
    try:
        worker.submit(net, epoch=0, step=0)
        worker._process.terminate()  # SIGTERM, as if before the process ignored it
        worker._process.join(10)
        with caplog.at_level(logging.WARNING):
            assert worker.wait(0) == []
        assert "the panels in flight are lost" in caplog.text
    finally:
        worker.close()


@pytest.mark.parametrize("stopping", [False, True])
def test_a_dead_background_process_is_reported(tmp_path, stopping):
    """Also while training stops on a signal: a death by another one (a segfault, the OOM
    killer; SIGKILL here) is not the stop's."""
    net = SiameseUNet(3, 4, 2)
    worker = BackgroundExplainer(
        net.config(), tiny_samples(), DEFAULT_EXPLAIN, tmp_path, stopping=lambda: stopping
    )
    try:
        worker.submit(net, epoch=0, step=0)
        worker._process.kill()
        with pytest.raises(CamWorkerError, match="died"):
            worker.wait(0)
    finally:
        worker.close()


ORPHAN = """
import sys, time, torch
from pathlib import Path
from changecam.training.callbacks.cam_panels import DEFAULT_EXPLAIN
from changecam.training.callbacks.cam_worker import BackgroundExplainer
from changecam.models import SiameseUNet
net = SiameseUNet(3, 4, 2)
samples = {"pre": torch.rand(1, 3, 32, 32), "post": torch.rand(1, 3, 32, 32),
           "mask": torch.zeros(1, 1, 32, 32), "name": ["a"]}
out, job = Path(sys.argv[1]), sys.argv[2] == "job"
worker = BackgroundExplainer(net.config(), samples, DEFAULT_EXPLAIN, out)
if job:  # a result (with its panel picture, > 64 KiB) that nobody will read
    worker.submit(net, 0, 0)
    deadline = time.monotonic() + 300
    while not (out / "epoch_000" / "a.png").exists():
        if not worker._process.is_alive() or time.monotonic() > deadline:
            sys.exit("the CAM panel process wrote no panel")
        time.sleep(0.05)
print(worker._process.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.parametrize("state", ["idle", "job"])
def test_the_background_process_exits_when_training_is_killed(tmp_path, state):
    # "job": the process holds a finished result nobody reads; it must not wait to send it
    import os
    import signal
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, str(tmp_path), state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = parent.stdout.readline()
    assert line, f"the training stand-in ended early (exit code {parent.wait()})"
    pid = int(line)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # the process runs at idle priority: on a busy machine it waits its turn
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the CAM panel process outlived the killed training process")


def overrides(tiny_synthetic, logger: str) -> list[str]:
    return [
        "experiment=quickstart",
        "trainer.max_epochs=2",
        f"logger={logger}",
        f"callbacks.cam_panels.k={K}",
        *tiny_overrides(tiny_synthetic),
    ]


def test_two_epochs_log_panels_table_and_share_history_to_wandb(tmp_path, tiny_synthetic):
    # background: the results reach W&B after the epoch, logged at that epoch's step
    args = overrides(tiny_synthetic, "wandb") + ["callbacks.cam_panels.mode=background"]
    train(compose_train(tmp_path, args))
    run_dir = tmp_path / "run"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    rows = [r for r in history(offline) if "val/cam/panels/filenames" in r]
    assert len(rows) == 2, "one CAM log per validation epoch"
    val_steps = [r["trainer/global_step"] for r in history(offline) if "val/f1" in r]
    # at the step of the epoch's own val metrics
    assert [r["trainer/global_step"] for r in rows] == val_steps
    for row in rows:
        files = [offline / "files" / f for f in row["val/cam/panels/filenames"]]
        assert len(files) == K
        for f in files:
            image = np.asarray(Image.open(f).convert("RGB"))
            assert image.shape[0] > 200 and image.shape[1] > 400
            assert image.std() > 10, f"{f} is a real picture, not a constant colour"
        assert row["val/cam/overlays/count"] == K and "all_masks" in " ".join(row)
        table = json.loads((offline / "files" / row["val/cam/table/path"]).read_text())
        assert table["columns"][:2] == ["name", "panel"]
        assert {"post_share/enc1", "post_share/enc2", "f1", "iou", "target_score"} <= set(
            table["columns"]
        )
        assert len(table["data"]) == K
    share_rows = [r for r in history(offline) if "val/cam/post_share/enc2" in r]
    assert len(share_rows) >= 1  # NaN epochs (nothing predicted) are left out of the chart
    for r in share_rows:
        assert 0.0 <= r["val/cam/post_share/enc2"] <= 1.0
    for epoch in ("epoch_000", "epoch_001"):
        assert len(list((run_dir / "cam" / epoch).glob("*.png"))) == K


@pytest.mark.parametrize(("logger", "mode"), [("csv", "background"), ("none", "inline")])
def test_other_loggers_still_write_pngs(tmp_path, tiny_synthetic, logger, mode):
    args = overrides(tiny_synthetic, logger) + [f"callbacks.cam_panels.mode={mode}"]
    train(compose_train(tmp_path, args))
    for epoch in ("epoch_000", "epoch_001"):
        pngs = list((tmp_path / "run" / "cam" / epoch).glob("*.png"))
        assert len(pngs) == K
    if logger == "csv":
        header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
        assert "val/cam/post_share/enc1" in header


@pytest.mark.parametrize("kind", ["bfloat16", "float64", "compiled"])
def test_the_inline_path_explains_a_float32_eager_network_as_the_background_does(tmp_path, kind):
    """``trainer.precision=bf16-true`` or ``64-true`` gave the network float32 inputs, and
    ``module.compile=true``'s graph lost the taps' activations: the first validation failed
    (helper-137). The inline path explains float32 weights, eagerly, as the background process."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).eval()
    samples = tiny_samples()
    settings = cam_settings(steps=2, dpi=30)
    expected = explain_samples(net, samples, settings, tmp_path / "float32", 0, 0)
    if kind == "compiled":
        net.compile()
    else:
        net.to(getattr(torch, kind))
    with cam_panels.explained_inline(net) as explained:
        got = explain_samples(explained, samples, settings, tmp_path / kind, 0, 0)
    assert next(net.parameters()).dtype == (
        torch.float32 if kind == "compiled" else getattr(torch, kind)
    )
    tolerance = 0.05 if kind == "bfloat16" else 1e-5  # bf16 weights rounded
    for layer in expected.shares:
        np.testing.assert_allclose(got.shares[layer], expected.shares[layer], atol=tolerance)


def test_explain_block_options_reach_the_panels_and_enabled_false_turns_them_off(
    tmp_path, tiny_synthetic
):
    args = overrides(tiny_synthetic, "csv") + [
        "callbacks.cam_panels.mode=inline",
        "callbacks.cam_panels.explain.taps=[enc2]",
        "callbacks.cam_panels.explain.faithfulness.enabled=false",
    ]
    train(compose_train(tmp_path / "on", args))
    header = (tmp_path / "on" / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/cam/post_share/enc2" in header and "val/cam/post_share/enc1" not in header
    assert "faithfulness_gap" not in header, "the curves are off"
    assert len(list((tmp_path / "on" / "run" / "cam" / "epoch_001").glob("*.png"))) == K

    off = overrides(tiny_synthetic, "csv") + ["callbacks.cam_panels.explain.enabled=false"]
    train(compose_train(tmp_path / "off", off))
    assert not (tmp_path / "off" / "run" / "cam").exists()
    header = (tmp_path / "off" / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/cam" not in header


@pytest.mark.slow
def test_ddp_writes_panels_once(tmp_path, tiny_synthetic):
    args = overrides(tiny_synthetic, "none") + [
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        "print_config=false",
    ]
    proc = run_script("train.py", args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    writes = [line for line in out.splitlines() if "CAM panels to" in line]
    assert len(writes) == 2 and all("rank 0 wrote" in line for line in writes), writes
    assert len(list((tmp_path / "run" / "cam" / "epoch_001").glob("*.png"))) == K


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_samples_of_a_validation_split_of_several_sizes_share_one(tmp_path):
    """data.eval_protocol=full keeps each image's size: the panels' samples (one batch) are
    chosen among the images of the most common size (helper-69: torch.stack failed)."""
    from types import SimpleNamespace

    def item(name: str, height: int, width: int) -> dict:
        mask = torch.zeros(1, height, width)
        mask[0, :4, :4] = 1
        return {
            "pre": torch.rand(3, height, width),
            "post": torch.rand(3, height, width),
            "mask": mask,
            "name": name,
        }

    dataset = [item("a", 32, 32), item("b", 32, 48), item("c", 32, 48), item("d", 32, 32)]
    dataset.append(item("e", 32, 48))
    trainer = SimpleNamespace(val_dataloaders=SimpleNamespace(dataset=dataset))
    samples = CamPanels(tmp_path, k=8)._fixed_samples(trainer)
    assert sorted(samples["name"]) == ["b", "c", "e"] and samples["pre"].shape[-2:] == (32, 48)


def test_the_candidates_spread_over_the_whole_validation_split(tmp_path):
    """The stride rounded down and the list cut at max_candidates: of 500 samples only the
    first 256 were scanned, and the panels never showed the change in the rest (helper-99)."""
    from types import SimpleNamespace

    def item(index: int) -> dict:
        mask = torch.zeros(1, 4, 4)
        mask[0, : 1 + index % 4] = float(index >= 300)  # change in the last 200 only
        pre, post = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
        return {"pre": pre, "post": post, "mask": mask, "name": f"s{index:03d}"}

    trainer = SimpleNamespace(
        val_dataloaders=SimpleNamespace(dataset=[item(i) for i in range(500)])
    )
    samples = CamPanels(tmp_path, k=4)._fixed_samples(trainer)  # max_candidates=256
    indexes = sorted(int(name[1:]) for name in samples["name"])
    assert sum(i >= 300 for i in indexes) == 2, indexes  # half of k: the most change
    # as many candidates as max_candidates allows: rounding the stride up scanned 5 of 9
    small = SimpleNamespace(val_dataloaders=SimpleNamespace(dataset=[item(i) for i in range(9)]))
    assert len(CamPanels(tmp_path, k=8, max_candidates=8)._fixed_samples(small)["name"]) == 8
    # fewer samples than max_candidates: every one (i * n // 256 repeated the first, helper-105)
    for n in (3, 48):
        split = [item(300 * (i >= n // 2) + i) for i in range(n)]  # change in the second half
        names = CamPanels(tmp_path, k=4)._fixed_samples(
            SimpleNamespace(val_dataloaders=SimpleNamespace(dataset=split))
        )["name"]
        assert len(set(names)) == min(n, 4), names


def test_no_candidates_is_refused_naming_the_key(tmp_path):
    """max_candidates=0 trained until the first validation, then failed with an IndexError
    (helper-106)."""
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        CamPanels(tmp_path, max_candidates=0)

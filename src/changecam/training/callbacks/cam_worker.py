"""The work behind the CAM panels, inline or in a background process.

:func:`explain_samples` explains the fixed samples with one network state, computes the
faithfulness gap, renders and writes the panels: everything the :class:`CamPanels` callback
shows. :class:`BackgroundExplainer` runs it in a spawned CPU process on snapshots of the
weights, so a validation epoch only pays for copying the weights; results come back to be
logged by the training process, with the step of the epoch they belong to.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from changecam.atomic import DiskFullError, disk_full_error
from changecam.explain import (
    ExplainSettings,
    Explanation,
    Faithfulness,
    explain_tensors,
    render_panel,
    save_panel,
)
from changecam.metrics import confusion_counts, mean_of, scores_from_counts
from changecam.models.protocol import build_network

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a waiting side checks that the other one is still alive


# every scalar a CamResult logs starts so (training.csv_logger keeps them when they arrive late)
SCALAR_PREFIX = "val/cam/"


@dataclass
class CamResult:
    """One epoch's explanation of the fixed samples (plain CPU data, cheap to send)."""

    epoch: int
    step: int
    names: list[str]
    epoch_dir: Path
    shares: dict[str, list[float]]  # per-date layer -> post share of each sample
    f1: list[float]
    iou: list[float]
    target_score: list[float]
    gap_layer: str | None  # the layer whose faithfulness gap is given (None: no curves)
    gap: list[float]
    predicted: np.ndarray  # k×H×W uint8 predicted change
    panels: list[np.ndarray] = field(default_factory=list)  # uint8 RGB, if asked for
    busy_s: float = 0.0  # all of the work
    draw_s: float = 0.0  # of it, drawing and writing the panels

    def scalars(self) -> dict[str, float]:
        """Means over the samples: ``val/cam/post_share/<layer>`` and the faithfulness gap."""
        out = {f"{SCALAR_PREFIX}post_share/{layer}": mean_of(v) for layer, v in self.shares.items()}
        if self.gap_layer is not None:
            out[f"{SCALAR_PREFIX}faithfulness_gap/{self.gap_layer}"] = mean_of(self.gap)
        return {k: v for k, v in out.items() if v is not None}


def epoch_folder(out_dir: str | Path, epoch: int) -> Path:
    """The folder of one epoch's panels: ``<out_dir>/epoch_<NNN>``."""
    return Path(out_dir) / f"epoch_{epoch:03d}"


def explain_samples(
    model: nn.Module,
    samples: dict[str, Any],
    settings: ExplainSettings,
    out_dir: str | Path,
    epoch: int,
    step: int,
    *,
    return_panels: bool = True,
) -> CamResult:
    """Explain, score and draw the fixed samples; write their panels to ``epoch_<NNN>/``.

    Args:
        model: the network ``model(pre, post) -> logits``, with taps.
        samples: ``pre``, ``post`` (k×C×H×W), ``mask`` (k×1×H×W) tensors and their ``name`` list.
        settings: what to explain and draw (the callback's ``explain`` block).
        out_dir: folder of the ``epoch_<NNN>`` folders.
        epoch: the validation epoch (names the folder).
        step: the global step of that epoch (carried to the logs).
        return_panels: send the panel pictures back (only W&B needs them).
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    pre, post, mask = (samples[k].to(device) for k in ("pre", "post", "mask"))
    result = explain_tensors(model, pre, post, settings, label=mask)
    exp, faith, mask = result.explanation, result.faithfulness, mask.cpu()
    probs = torch.sigmoid(exp.logits)
    scores = scores_from_counts(*confusion_counts(probs, mask, settings.threshold).T)
    gaps = faith.gap("both") if faith is not None else torch.full((len(exp),), math.nan)
    epoch_dir = epoch_folder(out_dir, epoch)
    drawing = time.perf_counter()
    panels = [
        _draw(samples, i, exp, faith, settings, epoch_dir) for i in range(len(samples["name"]))
    ]
    draw_s = time.perf_counter() - drawing
    return CamResult(
        epoch=epoch,
        step=step,
        names=list(samples["name"]),
        epoch_dir=epoch_dir,
        shares={layer: v.tolist() for layer, v in exp.post_shares(settings.method).items()},
        f1=scores["f1"].tolist(),
        iou=scores["iou"].tolist(),
        target_score=exp.score.float().tolist(),
        gap_layer=faith.layer if faith is not None else None,
        gap=gaps.tolist(),
        predicted=(probs[:, 0] > settings.threshold).numpy().astype(np.uint8),
        panels=panels if return_panels else [],
        busy_s=time.perf_counter() - start,
        draw_s=draw_s,
    )


def _draw(
    samples: dict[str, Any],
    i: int,
    exp: Explanation,
    faith: Faithfulness | None,
    settings: ExplainSettings,
    epoch_dir: Path,
) -> np.ndarray:
    """Render and write the panel of sample ``i``; return it."""
    name = samples["name"][i]
    panel = render_panel(
        samples["pre"][i],
        samples["post"][i],
        exp,
        index=i,
        label=samples["mask"][i, 0],
        layer=settings.panel_layer,
        method=settings.method,
        faithfulness=faith,
        threshold=settings.threshold,
        title=name,
        dpi=settings.dpi,
        target=settings.target,
    )
    save_panel(panel, epoch_dir / f"{name}.png")
    return panel


def weights_snapshot(net: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``net``'s state dict that later training steps do not change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


@contextlib.contextmanager
def _stdlib_start_method() -> Iterator[None]:
    """Name a start method the spawned child knows while it starts.

    spawn tells the child the parent's process-wide start method. A joblib (loky) worker, as in
    a ``hydra/launcher=joblib`` sweep, has set it to ``loky``, which the child's plain
    :mod:`multiprocessing` cannot set, and it dies at start-up.
    """
    default = mp.context._default_context  # the only handle on the process-wide method
    actual = default._actual_context
    if actual is None or actual.get_start_method() in mp.get_all_start_methods():
        yield
        return
    default._actual_context = mp.get_context("spawn")
    try:
        yield
    finally:
        default._actual_context = actual


class CamWorkerError(RuntimeError):
    """The background CAM-panel process failed or died."""


class BackgroundExplainer:
    """A spawned process running :func:`explain_samples` on weight snapshots (on the CPU, or
    on another device such as the training GPU).

    At most one job is in flight: :meth:`submit` first waits for the previous one, so a worker
    slower than a training epoch delays the next validation epoch instead of piling up
    snapshots. Failures in the process are raised here as :class:`CamWorkerError`.

    Args:
        net_config: the network's config (:meth:`~changecam.models.ChangeNetwork.config`).
        samples: the fixed samples (CPU tensors and names).
        settings: what to explain and draw.
        out_dir: folder of the ``epoch_<NNN>`` panel folders.
        return_panels: send the panel pictures back (only W&B needs them).
        threads: torch threads of the process.
        device: where the process explains (``cpu``, ``cuda:0``, ...); it draws on the CPU.
        stopping: whether training is stopping on a signal (a SIGTERM to the whole process
            group can reach the process before it ignores signals, in its first seconds): its
            death then loses the jobs in flight, with a warning, instead of failing the run.
    """

    def __init__(
        self,
        net_config: dict[str, Any],
        samples: dict[str, Any],
        settings: ExplainSettings,
        out_dir: str | Path,
        return_panels: bool = True,
        threads: int = 1,
        device: str = "cpu",
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stopping = stopping
        ctx = mp.get_context("spawn")  # fork is unsafe with OpenMP and CUDA in the parent
        self._jobs = ctx.Queue()
        self._results = ctx.Queue()
        self._outstanding = 0
        self.waited_s = 0.0  # how long the last submit waited for the job before it
        self._process = ctx.Process(
            target=_worker_main,
            args=(
                net_config,
                samples,
                (settings, Path(out_dir), return_panels),
                (threads, device),
                self._jobs,
                self._results,
            ),
            name="changecam-cam-panels",
            daemon=True,
        )
        # spawn re-runs the parent's __main__ (e.g. train.py and all it imports, seconds) in the
        # child unless __main__ is a bare module; the worker's code lives in this package.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            with _stdlib_start_method():
                self._process.start()
        finally:
            sys.modules["__main__"] = main
        _yield_to_training(self._process.pid)  # now, not after the child's imports (seconds)

    def submit(self, net: nn.Module, epoch: int, step: int) -> list[CamResult]:
        """Wait for the previous job, then queue one for ``net``'s current weights.
        :attr:`waited_s` says how long it waited (0 when nothing was in flight).

        Returns:
            the results that arrived meanwhile.
        """
        started, busy = time.perf_counter(), self._outstanding > 0
        done = self.wait(0)
        self.waited_s = time.perf_counter() - started if busy else 0.0
        self._jobs.put((epoch, step, weights_snapshot(net)))
        self._outstanding += 1
        return done

    def poll(self) -> list[CamResult]:
        """The results that have arrived (never blocks)."""
        return self._collect(block=False)

    def wait(self, max_outstanding: int = 0) -> list[CamResult]:
        """Block until at most ``max_outstanding`` jobs are in flight; their results."""
        done = []
        while self._outstanding > max_outstanding:
            done += self._collect(block=True)
        return done + self._collect(block=False)

    def _collect(self, block: bool) -> list[CamResult]:
        done = []
        while self._outstanding:
            try:
                kind, payload = self._results.get(block=block, timeout=POLL_S if block else None)
            except queue.Empty:
                if not block:
                    break
                alive = self._process.is_alive()  # first: exitcode is set once it is not
                signalled = self._process.exitcode in (-signal.SIGTERM, -signal.SIGINT)
                if not alive and signalled and self._stopping():
                    log.warning(
                        "CAM panels: the panel process was stopped by the signal that stops "
                        "training (exit code %s); the panels in flight are lost",
                        self._process.exitcode,
                    )
                    self._outstanding = 0
                    break
                if not alive:
                    raise CamWorkerError(
                        f"the CAM panel process died (exit code {self._process.exitcode}) "
                        "with a job in flight"
                    ) from None
                continue
            self._outstanding -= 1
            if kind == "disk_full":
                raise DiskFullError(payload)
            if kind == "error":
                raise CamWorkerError(f"the CAM panel process failed:\n{payload}")
            done.append(payload)
            block = False  # one result is enough to return; take the rest only if ready
        return done

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process (pending jobs are dropped)."""
        if self._process.is_alive():
            self._jobs.put(None)
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()  # it ignores SIGTERM
            self._process.join(timeout)
        self._jobs.cancel_join_thread()
        self._results.cancel_join_thread()


def _yield_to_training(pid: int = 0) -> None:
    """Let process ``pid`` (0: this one) run only on CPU time that training leaves idle.

    Competing for a core would make training slower than doing the work inline: its parallel
    ops wait for their slowest thread. SCHED_IDLE (Linux) or the lowest priority elsewhere.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
        except (AttributeError, OSError):
            pass


def _worker_main(
    net_config: dict[str, Any],
    samples: dict[str, Any],
    job_settings: tuple[ExplainSettings, Path, bool],
    resources: tuple[int, str],
    jobs: mp.Queue,
    results: mp.Queue,
) -> None:
    """Process body: build the network once, then explain each snapshot until ``None``.

    SIGTERM and SIGINT are ignored: a scheduler (SLURM, systemd) or Ctrl-C signals the whole
    process group, and the training process stops on them in its own way (status 143 and the
    resume command) only if the job it waits for is finished; this process ends on ``None``,
    or when the training process is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _yield_to_training()
    threads, device = resources
    torch.set_num_threads(threads)
    settings, out_dir, return_panels = job_settings
    net = build_network(net_config).to(device)
    parent = mp.parent_process()
    while True:
        try:
            job = jobs.get(timeout=POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                # the training process is gone (e.g. killed): do not linger, nor wait at exit
                # to send a result nobody will read (a full pipe would block for ever)
                results.cancel_join_thread()
                return
            continue
        if job is None:
            results.cancel_join_thread()  # the parent has taken what it wanted
            return
        epoch, step, state = job
        try:
            net.load_state_dict(state)
            result = explain_samples(
                net, samples, settings, out_dir, epoch, step, return_panels=return_panels
            )
            results.put(("ok", result))
        except Exception as err:
            full = disk_full_error(err)  # the training process stops with the same message
            results.put(
                ("disk_full", full.filename)
                if full is not None
                else ("error", f"epoch {epoch}: {traceback.format_exc()}")
            )

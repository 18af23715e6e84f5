"""HiResCAM panels and pre/post evidence shares in W&B (and as PNG files) every validation epoch."""

from __future__ import annotations

import copy
import logging
import math
import typing
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from changecam.atomic import write_text
from changecam.environment import usable_cores
from changecam.explain import ExplainSettings, FaithfulnessSettings, with_threshold
from changecam.explain.render import to_mask, to_rgb
from changecam.models.protocol import network_config
from changecam.training.callbacks.cam_worker import (
    BackgroundExplainer,
    CamResult,
    epoch_folder,
    explain_samples,
)
from changecam.training.module import ChangeDetectionModule

CLASS_LABELS = {0: "no change", 1: "change"}
# written into an epoch's panel folder once its panels and scalars are logged: a resumed run
# draws again the in-flight epoch of its checkpoint when the mark is missing
LOGGED_MARK = ".logged"
# a validation epoch that waits longer than this for the background process's previous panels
# gets a warning: the process is slower than a training epoch and holds training up
HELD_UP_WARN_S = 1.0
Mode = Literal["auto", "background", "inline"]
MODES: tuple[str, ...] = typing.get_args(Mode)
WorkerDevice = Literal["cpu", "training"]
WORKER_DEVICES: tuple[str, ...] = typing.get_args(WorkerDevice)
log = logging.getLogger(__name__)
# What the callback explains when it is built in code (conf/explain/callback.yaml mirrors it):
# every tap and both methods, a short deletion curve of both dates, small panels.
DEFAULT_EXPLAIN = ExplainSettings(
    dpi=50, faithfulness=FaithfulnessSettings(steps=5, dates=("both",))
)


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this validation epoch's metrics at (one less than
    ``global_step`` when validation ends a training epoch), so the CAM charts line up."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def select_samples(masks: Sequence[Tensor], k: int) -> list[int]:
    """A fixed, deterministic choice of ``k`` samples that includes samples with change.

    Half (rounded up) are the samples with the largest changed fraction, the rest are spread
    evenly over the remaining ones, in dataset order.

    Args:
        masks: the candidate samples' change masks.
        k: how many to choose (all of them if there are fewer).
    """
    n = len(masks)
    if k >= n:
        return list(range(n))
    fractions = torch.tensor([float(m.float().mean()) for m in masks])
    order = torch.argsort(-fractions, stable=True).tolist()
    most = [i for i in order[: math.ceil(k / 2)] if fractions[i] > 0]
    if len(most) == k:  # k = 1: the one with the most change
        return most
    rest = [i for i in range(n) if i not in most]
    step = len(rest) / (k - len(most))
    spread = [rest[int(j * step)] for j in range(k - len(most))]
    return sorted(most + spread)


@contextmanager
def explained_inline(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` as the inline path explains it, as the background process does: with float32
    weights (a copy of a ``*-true`` precision's bf16 or float64 network, which float32 inputs
    do not fit), run eagerly (``module.compile``'s graph does not keep the taps' recorded
    activations)."""
    if any(p.dtype != torch.float32 for p in net.parameters()):
        net = copy.deepcopy(net).float()
    with torch.compiler.set_stance("force_eager"):
        yield net


class CamPanels(L.Callback):
    """Explain a fixed set of validation samples every ``every_n_epochs`` validation epochs.

    On rank 0 only, it logs to every :class:`WandbLogger` of the trainer: the 2×4 panel of each
    sample (``val/cam/panels``), the post image with toggleable ground-truth and prediction mask
    overlays (``val/cam/overlays``), a table with one row per sample (``val/cam/table``: name, panel,
    post share per layer, F1, IoU, target score, faithfulness gap), and to every logger the
    scalars ``val/cam/post_share/<layer>`` (mean over the samples) and
    ``val/cam/faithfulness_gap/<layer>`` (by default of the deepest layer), at the global step of the
    validation epoch. The same panels are written as PNG files to
    ``<out_dir>/epoch_<NNN>/<name>.png`` whatever the logger.

    In ``background`` mode the explanation, the faithfulness curves, the drawing and the PNG
    files are done by a spawned process (at idle CPU priority; explaining on the CPU, or with
    ``worker_device=training`` on the training device) on a copy of the weights taken at the
    end of the validation epoch; the results are logged when they arrive (at the latest when
    fitting ends), so validation only pays for the copy. At most one epoch is in flight: a
    process slower than a training epoch holds up the next validation epoch. That is free only
    where training leaves a CPU core idle; where it keeps every core busy the process takes its
    time from training, and more than the work costs inline. ``inline`` mode does the work in
    the validation epoch, on the training device; it is also used for networks that cannot be
    rebuilt in another process (not a :class:`~changecam.models.ChangeNetwork`). ``auto``
    (default) picks ``background``
    when training runs on an accelerator or its processes use fewer torch threads, together,
    than the usable CPU cores, else ``inline``.

    Args:
        out_dir: folder of the PNG files (typically ``<run dir>/cam``).
        k: number of fixed validation samples.
        threshold: probability threshold of the predicted change (the module's).
        every_n_epochs: explain every N-th validation epoch.
        max_candidates: validation samples scanned when choosing the fixed set.
        mode: ``auto``, ``background`` or ``inline`` (see above).
        worker_threads: torch threads of the background process.
        worker_device: where the background process explains: ``cpu`` (default), or
            ``training``, the training device (on a GPU: the explanation is a few forward and
            backward passes there instead of a minute of CPU work for a wide network; the
            drawing stays on the CPU).
        explain: what to explain and draw (taps, methods, target, panel layer, dpi and the
            faithfulness curves; the ``explain`` config group, ``conf/explain/callback.yaml``);
            default :data:`DEFAULT_EXPLAIN`. ``explain.enabled=false`` turns the panels off.
    """

    def __init__(
        self,
        out_dir: str | Path,
        k: int = 8,
        threshold: float = 0.5,
        every_n_epochs: int = 1,
        max_candidates: int = 256,
        mode: Mode = "auto",
        worker_threads: int = 1,
        worker_device: WorkerDevice = "cpu",
        explain: ExplainSettings | None = None,
    ) -> None:
        super().__init__()
        if k < 1 or every_n_epochs < 1 or worker_threads < 1 or max_candidates < 1:
            raise ValueError(
                "callbacks.cam_panels.k, every_n_epochs, worker_threads and max_candidates "
                "must be >= 1"
            )
        if mode not in MODES:
            raise ValueError(f"callbacks.cam_panels.mode={mode!r}; expected one of {MODES}")
        if worker_device not in WORKER_DEVICES:
            raise ValueError(
                f"callbacks.cam_panels.worker_device={worker_device!r}; expected one of "
                f"{WORKER_DEVICES}"
            )
        if explain is not None and explain.target == "roi":
            raise ValueError(
                "callbacks.cam_panels.explain.target=roi: the panels explain validation samples "
                "of every place, which one explain.roi mask does not fit; use predicted, "
                "ground_truth or all"
            )
        self.out_dir = Path(out_dir)
        self.k = k
        self.settings = with_threshold(explain or DEFAULT_EXPLAIN, threshold)
        self.every_n_epochs = every_n_epochs
        self.max_candidates = max_candidates
        self.mode = mode
        self.worker_threads = worker_threads
        self.worker_device = worker_device
        self.samples: dict[str, Any] | None = None
        self._worker: BackgroundExplainer | None = None
        self._warned_held_up = False
        # (epoch, step) of the panels the background process is drawing: checkpoints record
        # it, so a run resumed after a kill draws them again from the checkpoint's weights
        self._in_flight: tuple[int, int] | None = None
        self._redo: tuple[int, int] | None = None
        self._in_flight_at = -1  # the global step the panels in flight were submitted at
        self._fit_trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ChangeDetectionModule):
            raise TypeError(
                f"callbacks.cam_panels explains a ChangeDetectionModule's network, not a "
                f"{type(pl_module).__name__}"
            )
        self.settings.layers(pl_module.net)  # fail at start on unknown taps and layers
        self._fit_trainer = trainer

    @staticmethod
    def _return_panels(trainer: L.Trainer) -> bool:
        return any(isinstance(lg, WandbLogger) for lg in trainer.loggers)

    def _fixed_samples(self, trainer: L.Trainer) -> dict[str, Any]:
        if self.samples is None:
            loader = trainer.val_dataloaders
            dataset = (loader[0] if isinstance(loader, list | tuple) else loader).dataset
            n = len(dataset)
            count = min(n, self.max_candidates)  # evenly over the whole split
            candidates = [i * n // count for i in range(count)]
            items = [dataset[i] for i in candidates]
            # one batch, so one size (data.eval_protocol=full keeps every image's own)
            sizes = Counter(tuple(it["pre"].shape[-2:]) for it in items)
            size = sizes.most_common(1)[0][0]
            if len(sizes) > 1:
                log.info(
                    "CAM panels: the validation images are of %d sizes; the samples are chosen "
                    "from the %d of %dx%d",
                    len(sizes),
                    sizes[size],
                    *size,
                )
                items = [it for it in items if tuple(it["pre"].shape[-2:]) == size]
            chosen = select_samples([it["mask"] for it in items], self.k)
            picked = [items[i] for i in chosen]
            self.samples = {
                key: torch.stack([it[key] for it in picked]) for key in ("pre", "post", "mask")
            }
            self.samples["name"] = [it["name"] for it in picked]
        return self.samples

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the samples and start the background process while training runs; a resumed
        run draws again the panels its checkpoint's epoch lost."""
        if trainer.val_dataloaders is None and trainer.limit_val_batches:
            # Lightning builds it at the first validation unless the sanity check ran (a
            # resumed fit skips it; num_sanity_val_steps=0): without it the panels would run
            # inline and a lost epoch's panels would not be drawn again
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        self._start(trainer, pl_module)
        ready = self.settings.enabled and trainer.is_global_zero
        if ready and trainer.val_dataloaders is not None:
            self._redo_lost_epoch(trainer, pl_module)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.settings.enabled:
            log.info("CAM panels off (callbacks.cam_panels.explain.enabled=false)")
            return
        if not trainer.is_global_zero or trainer.val_dataloaders is None:
            return
        samples = self._fixed_samples(trainer)
        processes = max(1, int(trainer.num_devices))  # the ranks of a CPU DDP run
        background = self._background(pl_module, processes)
        device = str(pl_module.device) if self.worker_device == "training" else "cpu"
        log.info(
            "CAM panels: %s (mode=%s; %d torch threads%s, %d usable cores, training on %s)",
            f"background process explaining on {device}"
            if background
            else "inline, in the validation epoch",
            self.mode,
            torch.get_num_threads(),
            f" × {processes} processes" if processes > 1 else "",
            usable_cores(),
            pl_module.device.type,
        )
        if background and self._worker is None:
            config = network_config(pl_module.net)
            if config is None:
                log.warning(
                    "CAM panels run inline: %s is not a ChangeNetwork, so it cannot be rebuilt "
                    "in a background process",
                    type(pl_module.net).__name__,
                )
                return
            self._worker = BackgroundExplainer(
                config,
                samples,
                self.settings,
                self.out_dir,
                return_panels=self._return_panels(trainer),
                threads=self.worker_threads,
                device=device,
                stopping=lambda: bool(getattr(trainer, "received_sigterm", False)),
            )

    def state_dict(self) -> dict[str, Any]:
        # written with the checkpoint of the validation whose panels are in flight: its weights,
        # from which a resumed run draws them again; a checkpoint of a later step (trained on
        # since) waits for them instead, as its weights are not theirs
        trainer = self._fit_trainer
        if self._in_flight is not None and self._worker is not None and trainer is not None:
            if trainer.global_step != self._in_flight_at:
                self._log_results(trainer, self._worker.wait(0))
        return {"in_flight": list(self._in_flight)} if self._in_flight is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        in_flight = state_dict.get("in_flight")
        self._redo = (int(in_flight[0]), int(in_flight[1])) if in_flight else None

    def _logged_steps(self, epoch: int) -> set[int]:
        """The steps of ``epoch`` whose panels and scalars reached the loggers (one per
        validation; several with ``trainer.val_check_interval`` < 1): :data:`LOGGED_MARK`."""
        mark = epoch_folder(self.out_dir, epoch) / LOGGED_MARK
        try:
            return {int(line) for line in mark.read_text().split()}
        except (OSError, ValueError):
            return set()

    def _redo_lost_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run killed while the background process drew the panels of the epoch its
        checkpoint was written at lost them (and their scalars): the resumed network holds that
        epoch's weights, so they are drawn again."""
        redo, self._redo = self._redo, None
        if redo is None or redo[1] in self._logged_steps(redo[0]):
            return
        log.info(
            "CAM panels: epoch %d's were being drawn when the run stopped; drawn again from the "
            "checkpoint's weights",
            redo[0],
        )
        self._explain(trainer, pl_module, *redo)

    def _explain(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, step: int
    ) -> None:
        """Explain the fixed samples with the network as it is, for ``epoch`` at ``step``."""
        if self._worker is not None:
            results = self._worker.submit(pl_module.net, epoch, step)
            self._in_flight, self._in_flight_at = (epoch, step), trainer.global_step
            self._report_held_up(epoch, self._worker.waited_s)
            self._log_results(trainer, results)
        else:
            with explained_inline(pl_module.net) as net:
                result = explain_samples(
                    net,
                    self._fixed_samples(trainer),
                    self.settings,
                    self.out_dir,
                    epoch,
                    step,
                    return_panels=self._return_panels(trainer),
                )
            self._log_results(trainer, [result])

    def _background(self, pl_module: L.LightningModule, processes: int = 1) -> bool:
        """Whether the panels are drawn in a background process: ``mode=auto`` when training
        runs on a GPU or leaves a CPU core free (its ``processes`` on this machine, the ranks
        of a CPU DDP run, times torch's threads each, below the usable cores)."""
        if self.mode != "auto":
            return self.mode == "background"
        busy = torch.get_num_threads() * processes
        return pl_module.device.type != "cpu" or busy < usable_cores()

    def _report_held_up(self, epoch: int, waited_s: float) -> None:
        """Say when validation waited for the background process (a warning the first time)."""
        if waited_s < HELD_UP_WARN_S:
            return
        (log.info if self._warned_held_up else log.warning)(
            "CAM panels: validation epoch %d waited %.1f s for the background process to finish "
            "the previous panels: it is slower than a training epoch here and holds training "
            "up. callbacks.cam_panels.mode=inline explains on the training device; or raise "
            "callbacks.cam_panels.every_n_epochs or callbacks.cam_panels.worker_threads",
            epoch,
            waited_s,
        )
        self._warned_held_up = True

    def _due(self, trainer: L.Trainer) -> bool:
        """Validation epochs of fitting only (not the sanity check, not a later ``trainer.validate``)."""
        if not self.settings.enabled:
            return False
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        return fitting and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._due(trainer) and trainer.is_global_zero):
            return
        self._explain(trainer, pl_module, trainer.current_epoch, logging_step(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._worker is not None:
            self._log_results(trainer, self._worker.poll())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log what is still in flight, then stop the process."""
        if self._worker is not None:
            try:
                self._log_results(trainer, self._worker.wait(0))
            finally:
                self._stop_worker()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop_worker()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_worker()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _log_results(self, trainer: L.Trainer, results: list[CamResult]) -> None:
        for result in results:
            log.info(
                "rank %d wrote %d CAM panels to %s (%.1f s of work, %.2f s of it drawing)",
                trainer.global_rank,
                len(result.names),
                result.epoch_dir,
                result.busy_s,
                result.draw_s,
            )
            scalars = result.scalars()
            for logger in trainer.loggers:
                if scalars:
                    logger.log_metrics(scalars, step=result.step)
                if isinstance(logger, WandbLogger):
                    self._log_wandb(logger, result)
                logger.save()  # on disk now (the CSV logger would wait for Lightning's next row)
            steps = sorted(self._logged_steps(result.epoch) | {result.step})
            write_text(result.epoch_dir / LOGGED_MARK, "".join(f"{step}\n" for step in steps))
            if self._in_flight == (result.epoch, result.step):
                self._in_flight = None

    def _log_wandb(self, logger: WandbLogger, result: CamResult) -> None:
        import wandb

        samples = self.samples
        names = result.names
        overlays = [
            wandb.Image(
                to_rgb(samples["post"][i]),
                caption=name,
                masks={
                    "ground_truth": {
                        "mask_data": to_mask(samples["mask"][i, 0]).astype("uint8"),
                        "class_labels": CLASS_LABELS,
                    },
                    "prediction": {
                        "mask_data": result.predicted[i],
                        "class_labels": CLASS_LABELS,
                    },
                },
            )
            for i, name in enumerate(names)
        ]
        images = [wandb.Image(p, caption=n) for p, n in zip(result.panels, names, strict=True)]
        layers = list(result.shares)
        columns = [
            "name",
            "panel",
            *[f"post_share/{layer}" for layer in layers],
            "f1",
            "iou",
            "target_score",
            "faithfulness_gap",
        ]
        rows = [
            [
                name,
                images[i],
                *[result.shares[layer][i] for layer in layers],
                result.f1[i],
                result.iou[i],
                result.target_score[i],
                result.gap[i],
            ]
            for i, name in enumerate(names)
        ]
        logger.experiment.log(
            {
                "val/cam/panels": images,
                "val/cam/overlays": overlays,
                "val/cam/table": wandb.Table(columns=columns, data=rows),
                "trainer/global_step": result.step,
            }
        )

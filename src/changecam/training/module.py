"""The LightningModule: loss, optimisation and pooled change metrics."""

from __future__ import annotations

import logging
import math
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from changecam.metrics import THRESHOLD_RANGE, ChangeScores, is_threshold
from changecam.training.callbacks.finite_checkpoint import rename_legacy_states
from changecam.training.checkpoint import describe_tensors, nonfinite_tensors, record_network
from changecam.training.init_from import (
    FrozenParts,
    InitReport,
    freeze_parts,
    load_initial_weights,
    set_frozen_eval,
)
from changecam.training.input_scale import record_data

log = logging.getLogger("changecam")

Loss = Literal["bce", "dice", "bce_dice"]
LOSSES: tuple[str, ...] = typing.get_args(Loss)
STAGES: tuple[str, ...] = ("val", "test")  # the evaluation loops with pooled scores

# The split scores and losses are reduced across ranks by torchmetrics before they are logged,
# and train/loss_epoch by the module itself, which Lightning cannot see; its advice to add
# sync_dist=True does not apply to them.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self\.log\('((val|test)/(loss|f1|iou|precision|recall|accuracy)|train/loss_epoch)'",
    category=PossibleUserWarning,
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class DivergenceError(FloatingPointError):
    """A validation or test loss or score, or the network's weights, became NaN or infinite.

    Raised before Lightning's checkpoint callbacks run for that epoch, so no checkpoint of a
    diverged network is written and a NaN score never becomes the best one.
    """


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss of the change class over the whole batch."""
    probs = torch.sigmoid(logits)
    inter = (probs * target).sum()
    return 1 - (2 * inter + eps) / (probs.sum() + target.sum() + eps)


# the epoch's training loss so far, in a checkpoint written inside an epoch: [sum, samples]
EPOCH_LOSS_KEY = "train_loss_epoch_so_far"
# the val/f1 a ReduceLROnPlateau had still to step on when the checkpoint was written (by the
# validation that ends an epoch, before the epoch's end steps it): a resumed fit, which
# Lightning does not let step at that epoch's end, steps on it when it starts
PLATEAU_KEY = "plateau_step_pending"
# the latest val/f1 when a checkpoint is written inside an epoch whose end steps the plateau
PLATEAU_INSIDE_KEY = "plateau_latest_val_f1"


def pos_weight_problem(pos_weight: Any) -> str | None:
    """Why ``module.pos_weight`` is refused, or None: it must be a finite number > 0 (a
    negative one rewards calling change no change, without bound; NaN fails as divergence)."""
    if pos_weight is None or (
        isinstance(pos_weight, int | float)
        and not isinstance(pos_weight, bool)
        and math.isfinite(pos_weight)
        and pos_weight > 0
    ):
        return None
    return f"module.pos_weight={pos_weight!r} must be a finite number > 0 (or null: 1)"


def stopped_early(reason: Any, stopped_epoch: int) -> bool:
    """Whether an ``EarlyStopping`` state (restored from a checkpoint, or read from one) had
    stopped its fit: its stopping reason (the enum or its value), which Lightning records since
    2.6 (a stop at epoch 0 leaves ``stopped_epoch`` at 0), else its stopped epoch."""
    not_stopped = EarlyStoppingReason.NOT_STOPPED
    if reason is not None and reason not in (not_stopped, not_stopped.value):
        return True
    return stopped_epoch > 0


def _stopped_early(callback: Any) -> bool:
    return stopped_early(getattr(callback, "stopping_reason", None), callback.stopped_epoch)


class ChangeDetectionModule(L.LightningModule):
    """Trains a change-detection network ``net(pre, post) -> logits``.

    Args:
        net: the network (e.g. :class:`changecam.models.SiameseUNet`).
        optimizer: partial optimiser constructor taking the parameters (``None``: the module
            only evaluates, as in ``eval.py``).
        scheduler: optional partial LR-scheduler constructor taking the optimiser.
        loss: ``bce``, ``dice`` or ``bce_dice``; ``None``: no loss (evaluation of a network
            whose training loss is unknown, e.g. a plain state dict).
        pos_weight: weight of the change class in BCE (``None``: 1).
        threshold: probability above which a pixel counts as change.
        scheduler_interval: ``epoch`` or ``step``.
        channels_last: keep the network and its inputs in channels-last memory format
            (faster convolutions on recent GPUs with mixed precision).
        compile: compile the network with ``torch.compile`` when training starts (its
            state-dict keys do not change; see :func:`changecam.cli.config_checks.check_device`).
        init_from: a weights file (changecam checkpoint or plain state dict) whose network
            weights ``net`` starts from; weights only, not a resume (see
            :mod:`changecam.training.init_from`).
        init_strict: require ``init_from`` to fit ``net`` exactly; ``False`` loads what fits by
            name and shape and lists the rest.
        init_include: load only these parts of ``net`` from ``init_from`` (module or
            parameter names, wildcards allowed; empty: all), e.g. the encoders and the
            bottleneck; the rest stays as initialised.
        freeze: parts of ``net`` (module or parameter names, wildcards allowed) kept as they
            are: out of the optimiser, and frozen modules in eval mode while training.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        loss: Loss | None = "bce",
        pos_weight: float | None = None,
        threshold: float = 0.5,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        channels_last: bool = False,
        compile: bool = False,
        init_from: str | None = None,
        init_strict: bool = True,
        init_include: Sequence[str] | None = None,
        freeze: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"module.loss={loss!r} is not allowed; expected one of {LOSSES}")
        problem = pos_weight_problem(pos_weight)
        if problem:
            raise ValueError(problem)
        if not is_threshold(threshold):  # as eval.py, predict.py and explain.py check theirs
            raise ValueError(f"module.threshold={threshold} must be {THRESHOLD_RANGE}")
        if loss == "dice" and pos_weight is not None:  # a warning: a sweep may pair them
            rank_zero_warn(
                f"module.pos_weight={pos_weight} has no effect: it weighs the BCE term, which "
                "module.loss=dice does not have (module.loss=bce_dice has both)"
            )
        freeze = [str(name) for name in freeze or ()]  # plain values: weights-only checkpoints
        init_include = [str(name) for name in init_include or ()]
        if init_include and init_from is None:
            raise ValueError(
                f"module.init_include={init_include} names the parts to load from "
                "module.init_from, which is not set"
            )
        init_from = str(init_from) if init_from is not None else None
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.frozen: FrozenParts = freeze_parts(net, freeze)  # a bad name fails before loading
        if freeze and not any(p.requires_grad for p in net.parameters()):
            raise ValueError(
                f"module.freeze={freeze} freezes every parameter of the network: nothing would "
                "be trained; leave at least one part out (e.g. the decoder or the head)"
            )
        self.init_report: InitReport | None = None
        if init_from is not None:
            self.init_report = load_initial_weights(
                net, init_from, strict=init_strict, include=init_include
            )
            report = self.init_report.summary()
            (log.warning if self.init_report.skipped else log.info)(report)
            random = sorted(set(self.frozen.parameters) & set(self.init_report.not_loaded()))
            if random:
                log.warning(
                    "module.freeze=%s freezes %d parameter tensors that module.init_from did not "
                    "load: they stay at their random initialisation for the whole run (%s)",
                    list(self.frozen.patterns),
                    len(random),
                    ", ".join(random[:8])
                    + (f" ... ({len(random)} in all)" if len(random) > 8 else ""),
                )
        if self.frozen.parameters:
            log.info(
                "module.freeze=%s: %d parameter tensors frozen (%s)",
                list(self.frozen.patterns),
                len(self.frozen.parameters),
                ", ".join(self.frozen.modules) or "parameters only",
            )
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        pw = torch.tensor([pos_weight]) if pos_weight is not None else None
        self.register_buffer("pos_weight", pw, persistent=False)
        self.metrics = nn.ModuleDict({s: ChangeScores(threshold) for s in STAGES})
        # Mean loss over samples, reduced across DDP ranks like the scores. A NaN batch loss is
        # kept (nan_strategy=nan), so the divergence check sees it: torchmetrics' default drops
        # NaN values, and "disable" also drops the sample weights.
        self.losses = nn.ModuleDict({s: MeanMetric(nan_strategy=float("nan")) for s in STAGES})
        # Non-finite logits (the scores count them as no change), checked with the scores.
        self.nonfinite = nn.ModuleDict({s: SumMetric() for s in STAGES})
        # train/loss_epoch's sum and sample count so far in this epoch: kept in a checkpoint
        # written inside an epoch, so a run resumed from it averages the whole epoch
        # (Lightning's own epoch mean would start again at the resume)
        self._epoch_loss: tuple[Tensor, int] | None = None
        self._plateau_pending: float | None = None
        # the step this process's fit started training at (None: it trained nothing, a resume
        # of a finished run); train.py's "no checkpoint was written" counts on it
        self.fit_start_step: int | None = None
        self._plateau_latest: float | None = None
        self._validated_since_start = False  # a validation of this fit (not the sanity check)
        self._plateau_stepped: int | None = None  # the epoch whose plateau step the module took
        self._compiled = False

    def train(self, mode: bool = True) -> ChangeDetectionModule:
        """The train/eval switch; the frozen modules stay in eval mode (fixed batch-norm
        statistics) also in training mode."""
        super().train(mode)
        if mode:
            set_frozen_eval(self.net, self.frozen)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning restores the modes it captured rather than calling train(): set them here
        set_frozen_eval(self.net, self.frozen)
        self._epoch_loss = None  # not called when a fit resumes inside an epoch

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit" and not self._compiled:
            self.net.compile()  # in place: the state-dict keys stay those of the network
            self._compiled = True

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        if self.hparams.channels_last:
            pre = pre.contiguous(memory_format=torch.channels_last)
            post = post.contiguous(memory_format=torch.channels_last)
        return self.net(pre, post)

    def compute_loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        kind = self.hparams.loss
        if kind is None:
            raise ValueError("module.loss=null: this module only evaluates; choose a loss to train")
        logits = logits.float()  # the loss in float32, also under mixed precision
        total = logits.new_zeros(())
        if kind in ("bce", "bce_dice"):
            total = total + F.binary_cross_entropy_with_logits(
                logits, mask, pos_weight=self.pos_weight
            )
        if kind in ("dice", "bce_dice"):
            total = total + dice_loss(logits, mask)
        return total

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["pre"], batch["post"])
        loss = self.compute_loss(logits, batch["mask"])
        if not torch.isfinite(loss):
            weights = self._nonfinite_weights()
            advice = (
                self._likely_cause()
                if weights.startswith("the weights hold")
                else f"Check these inputs, lower {self._learning_rate()}, or set "
                "trainer.gradient_clip_val."
            )
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); samples of this batch: "
                f"{', '.join(map(str, batch['name']))}; {weights}. {advice}"
            )
        size = logits.shape[0]
        self.log(
            "train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size
        )
        total, count = self._epoch_loss or (loss.new_zeros((), dtype=torch.float32), 0)
        self._epoch_loss = (total.to(loss.device) + loss.detach().float() * size, count + size)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        logits = self(batch["pre"], batch["post"])
        if self.hparams.loss is not None:
            # the mean of per-sample losses: Dice over a whole batch would make val/loss and
            # test/loss depend on the evaluation batch size
            mask = batch["mask"]
            per_sample = torch.stack(
                [self.compute_loss(logits[i : i + 1], mask[i : i + 1]) for i in range(len(mask))]
            )
            self.losses[stage].update(per_sample.detach())
        self.metrics[stage].update(torch.sigmoid(logits.float()), batch["mask"])
        self.nonfinite[stage].update((~torch.isfinite(logits)).sum().float())
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def _log_scores(self, stage: str) -> None:
        # Called on every rank: compute() reduces the counts across ranks (torchmetrics), so
        # each rank logs the same pooled numbers and no per-step sync is needed; every rank
        # thus also stops together when a value is not finite.
        values = {f"{stage}/{k}": v for k, v in self.metrics[stage].compute().items()}
        if self.hparams.loss is not None:
            values = {f"{stage}/loss": self.losses[stage].compute(), **values}
        nonfinite = int(self.nonfinite[stage].compute())
        for metric in (self.metrics, self.losses, self.nonfinite):
            metric[stage].reset()
        self._check_scores(values)
        if nonfinite:  # no loss to turn NaN (plain eval): the scores alone would hide them
            raise DivergenceError(
                f"{nonfinite} of the network's {stage} logits are not finite {self._when()}; "
                f"{self._nonfinite_weights()}. {self._likely_cause()}"
            )
        for key, value in values.items():
            name = key.split("/", 1)[1]
            self.log(key, value, prog_bar=name == "f1" or (name == "loss" and stage == "val"))

    # --- divergence: stop at the first non-finite score or weight, naming epoch and cause ----

    def _when(self) -> str:
        """Where in the run we are, for a divergence message."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return "in the sanity check before training"
        if trainer.state.fn == TrainerFn.FITTING:
            return f"at epoch {self.current_epoch} (global step {self.global_step})"
        return f"when evaluating ({trainer.state.fn.value}) the loaded weights"

    def _likely_cause(self) -> str:
        """The advice of a divergence message: the learning rate while fitting."""
        if self.trainer.state.fn != TrainerFn.FITTING or self.trainer.sanity_checking:
            return (
                "The checkpoint's network overflows on these inputs; evaluate a checkpoint "
                "from before the divergence."
            )
        return (
            f"Training diverged: the learning rate {self._learning_rate()} is probably too "
            "high; lower it, or set trainer.gradient_clip_val (under trainer.precision=16-mixed, "
            "also try 32)." + self._kept_checkpoint()
        )

    def _kept_checkpoint(self) -> str:
        """Which best checkpoint (of a finite epoch) the stopped run keeps, if any."""
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        return f" The best checkpoint of the epochs before stays at {path}." if path else ""

    def _learning_rate(self) -> str:
        """``module.optimizer.lr=<the optimiser's initial rate>``, for advice."""
        optimizers = self.trainer.optimizers
        lr = optimizers[0].defaults.get("lr") if optimizers else None
        return (
            f"module.optimizer.lr={lr:g}" if isinstance(lr, float | int) else "module.optimizer.lr"
        )

    def _nonfinite_weights(self) -> str:
        """Which weights are not finite, as a clause of a divergence message."""
        state = self.net.state_dict()
        bad = nonfinite_tensors(state)
        if not bad:
            return "the weights are finite"
        return f"the weights hold non-finite values in {describe_tensors(bad, len(state))}"

    def _check_scores(self, values: dict[str, Tensor]) -> None:
        bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
        if bad:
            listed = ", ".join(f"{k} is {values[k].item()}" for k in bad)
            raise DivergenceError(
                f"{listed} {self._when()}; {self._nonfinite_weights()}. {self._likely_cause()}"
            )

    def _check_weights(self, moment: str) -> None:
        state = self.net.state_dict()
        bad = nonfinite_tensors(state)
        if bad:
            raise DivergenceError(
                f"the weights hold non-finite values {moment} {self._when()}: "
                f"{describe_tensors(bad, len(state))}. {self._likely_cause()}"
            )

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint callbacks' on_train_epoch_end (Lightning calls the
        # module's hook first), so a diverged network is never saved.
        self._check_weights("after the training epoch")
        self._step_plateau_where_lightning_does_not()
        if self._epoch_loss is not None:  # the batch-size-weighted mean over every rank
            total, count = self._pooled_epoch_loss()
            if count > 0:
                self.log(
                    "train/loss_epoch", total / count, on_step=False, on_epoch=True, prog_bar=True
                )
            self._epoch_loss = None

    def _pooled_epoch_loss(self) -> tuple[Tensor, float]:
        """This epoch's training loss sum and sample count so far, summed over the DDP ranks
        (every rank calls it: a collective)."""
        total, count = self._epoch_loss or (torch.zeros(()), 0)
        pair = torch.stack(
            [total.float().to(self.device), torch.tensor(float(count), device=self.device)]
        )
        if self._trainer is not None and self._trainer.world_size > 1:
            pair = self._trainer.strategy.reduce(pair, reduce_op="sum")
        return pair[0], float(pair[1])

    def _warn_repeated_samples(self, stage: str) -> None:
        """Under DDP, say so when Lightning's DistributedSampler repeats evaluation samples."""
        world = self.trainer.world_size
        loaders = getattr(self.trainer, f"{stage}_dataloaders")
        if world <= 1 or loaders is None:
            return
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            size = len(loader.dataset)
            if size % world:
                rank_zero_warn(
                    f"the {stage} split has {size} samples, not a multiple of the {world} processes: "
                    f"DistributedSampler repeats {world - size % world} of them, so the pooled {stage} "
                    "scores are slightly off; evaluate on one device (trainer.devices=1) for exact numbers"
                )

    def on_validation_start(self) -> None:
        self._check_weights("before validation")
        self._warn_repeated_samples("val")

    def on_test_start(self) -> None:
        self._warn_repeated_samples("test")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")
        if self._trainer is not None and not self._trainer.sanity_checking:
            self._validated_since_start = True

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return torch.sigmoid(self(batch["pre"], batch["post"]))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if EPOCH_LOSS_KEY in checkpoint:  # every rank's sums: rank 0 goes on from them
            total, count = checkpoint[EPOCH_LOSS_KEY]
            first = self._trainer is None or self._trainer.global_rank == 0
            self._epoch_loss = (
                torch.tensor(float(total) if first else 0.0),
                int(count) if first else 0,
            )
        self._plateau_pending = checkpoint.get(PLATEAU_KEY)
        self._plateau_latest = checkpoint.get(PLATEAU_INSIDE_KEY)
        if self._trainer is not None:  # runs before Lightning restores the callbacks
            rename_legacy_states(self._trainer.callbacks, checkpoint)

    def _plateau(self) -> Any:
        """The ReduceLROnPlateau scheduler's config, if the fit has one."""
        configs = self._trainer.lr_scheduler_configs if self._trainer is not None else []
        return next((c for c in configs if c.reduce_on_plateau), None)

    def _stay_stopped(self) -> None:
        """A fit resumed from a checkpoint its early stopping had stopped (a requeue after a
        kill while it was scored) trains no further, as the uninterrupted run did not:
        Lightning restores the callback's counters but not that it stopped the fit."""
        trainer = self._trainer
        stopped = [
            cb for cb in getattr(trainer, "early_stopping_callbacks", []) if _stopped_early(cb)
        ]
        if stopped:
            log.info(
                "the checkpoint's run was stopped early at epoch %d (%s): it trains no further",
                stopped[0].stopped_epoch,
                stopped[0].monitor,
            )
            trainer.should_stop = True

    def _plateau_due(self) -> bool:
        """Whether this epoch's end steps the plateau scheduler (every ``frequency`` epochs)."""
        plateau = self._plateau()
        return plateau is not None and (self.current_epoch + 1) % plateau.frequency == 0

    def on_train_start(self) -> None:
        # a fit resumed inside an epoch skips on_train_epoch_start, and Lightning calls no
        # train() in a fit: the frozen modules, built in training mode, would stay in it
        set_frozen_eval(self.net, self.frozen)
        self.fit_start_step = self.trainer.global_step
        self._stay_stopped()
        pending, self._plateau_pending = self._plateau_pending, None
        self._validated_since_start = False
        plateau = self._plateau()
        if pending is not None and plateau is not None:
            plateau.scheduler.step(pending)

    def _step_plateau_where_lightning_does_not(self) -> None:
        """Lightning does not step a plateau scheduler at the end of the epoch a fit resumed
        into (``fit_loop.restarting``): after a checkpoint written inside that epoch the module
        steps it as Lightning would have, on the epoch's latest ``val/f1`` (this run's, or the
        one the checkpoint holds when the epoch did not validate again)."""
        trainer, plateau = self._trainer, self._plateau()
        if trainer is None or plateau is None or not trainer.fit_loop.restarting:
            return
        latest, self._plateau_latest = self._plateau_latest, None
        score = trainer.callback_metrics.get("val/f1") if self._validated_since_start else latest
        if score is not None and self._plateau_due():
            plateau.scheduler.step(float(score))
            self._plateau_stepped = self.current_epoch  # a checkpoint after it owes no step

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("this ChangeDetectionModule has no optimizer (module.optimizer=null)")
        # frozen parameters (module.freeze) stay out of the optimiser
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        interval = self.hparams.scheduler_interval
        # ReduceLROnPlateau follows val/f1: with validation every few epochs it steps at the
        # epochs that validate (Lightning steps it when (epoch + 1) % frequency == 0, as it
        # validates), not at the others with the last val/f1 again, which would spend its
        # patience once per epoch; where val/f1 is missing it waits (strict=False)
        every = getattr(self._trainer, "check_val_every_n_epoch", None) or 1
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": interval,
                "frequency": every if plateau and interval == "epoch" else 1,
                "monitor": "val/f1",
                "strict": False,
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets eval/predict/explain rebuild the network from the checkpoint alone, and tell
        # when they run it at another pixel scale than it was trained at.
        record_network(checkpoint, self, self.net)
        trainer = self._trainer
        inside = (
            trainer is not None and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if self._epoch_loss is not None and inside:  # a resume goes on inside this epoch
            total, count = self._pooled_epoch_loss()  # every rank's, for rank 0 to go on from
            checkpoint[EPOCH_LOSS_KEY] = [float(total), count]
        plateau = self._plateau()
        score = trainer.callback_metrics.get("val/f1") if trainer is not None else None
        if plateau is not None and score is not None and inside and self._plateau_due():
            # the latest val/f1 of this epoch so far: its end steps on it unless a later
            # validation of the epoch comes (then the resumed run has its own)
            checkpoint[PLATEAU_INSIDE_KEY] = float(score)
        if plateau is not None and score is not None and not inside and self._plateau_due():
            # written at an epoch's end (by its validation, or its on_train_epoch_end) that is
            # still open: it steps the plateau scheduler after this checkpoint
            epochs = trainer.fit_loop.epoch_progress.current
            owed = self._plateau_stepped != self.current_epoch
            if owed and trainer.state.fn == TrainerFn.FITTING and epochs.completed < epochs.started:
                checkpoint[PLATEAU_KEY] = float(score)
        if self._trainer is not None and self._trainer.datamodule is not None:
            record_data(checkpoint, self._trainer.datamodule)

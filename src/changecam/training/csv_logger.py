"""Lightning's CSV logger, except that a resumed run keeps the rows it logged before its checkpoint.

Lightning's writer deletes an existing ``metrics.csv`` when it starts, so a run resumed with
``ckpt_path=last`` kept only the epochs after the stop.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers.csv_logs import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from changecam.atomic import write_bytes
from changecam.training.callbacks.cam_worker import SCALAR_PREFIX as CAM_SCALAR_PREFIX
from changecam.training.loop_state import read_loop_state

log = logging.getLogger(__name__)


def _without_epoch_means(rows: list[dict[str, str]], epoch: int) -> list[dict[str, str]]:
    """``rows`` without the ``train/*_epoch`` values logged in ``epoch``: a fit that
    ``trainer.max_steps`` ended inside it logged the mean of its first batches, and the run
    resumed inside it logged the whole epoch's. Rows left without any value go."""
    kept = []
    for row in rows:
        if _number(row.get("epoch")) == epoch:
            row = {
                k: ("" if k.startswith("train/") and k.endswith("_epoch") else v)
                for k, v in row.items()
            }
            if not any(v for k, v in row.items() if k not in ("step", "epoch")):
                continue
        kept.append(row)
    return kept


def _complete_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the complete rows of a ``metrics.csv``: a last line without its line end,
    or any row with fewer or more fields than the header, was cut short by a kill."""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    keys = list(reader.fieldnames or [])
    rows = [row for row in reader if None not in row and None not in row.values()]
    return keys, rows


def _late(row: dict[str, str]) -> bool:
    """Whether ``row`` holds only the scalars of CAM panels, which, drawn in the background,
    are logged at their epoch's step when they arrive: maybe after rows of later steps."""
    logged = [key for key, value in row.items() if value and key not in ("step", "epoch")]
    return bool(logged) and all(key.startswith(CAM_SCALAR_PREFIX) for key in logged)


def _history(rows: list[dict[str, str]], keep_before: float) -> list[dict[str, str]]:
    """The rows of one training history logged before step ``keep_before``: they stop at the
    first row that is not, or whose step goes back (a ``train=false`` scoring appended at step
    0), or that has no step (not a row Lightning wrote). A row of background CAM scalars may go
    back (it arrives late): it is kept when logged before ``keep_before``, and stops nothing."""
    kept: list[dict[str, str]] = []
    last = -math.inf
    for row in rows:
        try:
            step = float(row["step"])
        except (KeyError, ValueError):
            break
        if _late(row):
            if step < keep_before:
                kept.append(row)
            continue
        if step < last or step >= keep_before:
            break
        kept.append(row)
        last = step
    return kept


class _HistoryKeepingWriter(ExperimentWriter):
    """Keeps the rows of ``metrics.csv`` logged before ``keep_before`` (a logger step) and
    appends to them; rows from after the checkpoint (logged before a kill, or the scores a
    finished run added at its end) are dropped, as the resumed run logs them again."""

    def __init__(self, log_dir: str, keep_before: float, redone: int | None = None) -> None:
        self._keep_before, self._redone = keep_before, redone
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            keys, rows = _complete_rows(file.read())
        if not keys:  # not even a whole header
            path.unlink()
            return
        rows = rows if math.isinf(self._keep_before) else _history(rows, self._keep_before)
        _write_rows(path, keys, rows)
        self.metrics_keys = keys
        log.info("%s: kept the %d rows logged before step %s", path, len(rows), self._keep_before)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        # the resumed run's mean of the epoch it finished again replaces the kept partial one
        # (only then: a run that ends without that epoch's end keeps it)
        if self._redone is not None and _is_epoch_mean_of(metrics_dict, self._redone):
            path = Path(self.metrics_file_path)
            if path.is_file():
                with path.open(newline="") as file:
                    keys, rows = _complete_rows(file.read())
                _write_rows(path, keys, _without_epoch_means(rows, self._redone))
            self._redone = None
        super().log_metrics(metrics_dict, step)


def _number(value: Any) -> float | None:
    """``value`` (a csv cell, a logged number or tensor) as a float, ``None`` if it is none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_epoch_mean_of(metrics: dict[str, Any], epoch: int) -> bool:
    """Whether ``metrics`` (one logging call) holds a ``train/*_epoch`` value of ``epoch``."""
    return _number(metrics.get("epoch")) == epoch and any(
        k.startswith("train/") and k.endswith("_epoch") for k in metrics
    )


def _write_rows(path: Path, keys: list[str], rows: list[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\r\n")  # as Lightning's rows
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode())  # bytes: no newline translation


class CSVLogger(LightningCSVLogger):
    """:class:`lightning.pytorch.loggers.CSVLogger` that continues ``metrics.csv`` on resume.

    Call :meth:`resume_from` before anything is logged; without it a new file is started, as
    Lightning does.
    """

    _keep_before: float | None = None
    _redone: int | None = None

    def resume_from(self, ckpt_path: str | Path | None, train: bool = True) -> None:
        """Keep the rows logged before the checkpoint ``ckpt_path`` that training resumes from;
        ``train=False`` (the run only scores a checkpoint) keeps every row; ``None`` with
        ``train`` starts a new file, as Lightning does."""
        if self._experiment is not None:
            raise RuntimeError("CSVLogger.resume_from must be called before anything is logged")
        if not train:
            self._keep_before = math.inf
            return
        if ckpt_path is None:
            self._keep_before = None
            return
        state = read_loop_state(ckpt_path)
        self._keep_before = state.resumed_step
        if self._keep_before is None:
            log.warning("%s holds no step counter: metrics.csv keeps every row it has", ckpt_path)
            self._keep_before = math.inf
        # saved inside an epoch: the resumed run may finish that epoch again
        self._redone = state.epoch if state.inside_epoch else None

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        if self._keep_before is None:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _HistoryKeepingWriter(self.log_dir, self._keep_before, self._redone)
        return self._experiment

"""Lightning progress as plain lines outside a terminal (see :mod:`vidlang.progress`)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar

from vidlang.progress import _duration, emit, interactive

HEADLINE_METRICS = ("t2v_R@1", "v2t_R@1", "t2v_R@5", "v2t_R@5", "top1", "top5", "mean_class_acc", "loss_caption",
                    "num_videos", "num_texts")  # fmt: skip


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.0f}" if v.is_integer() and abs(v) < 1e9 else f"{v:.4g}"


class LineProgressBar(ProgressBar):
    """Lightning progress as plain lines (module docstring): per epoch, per validation / test run, and in long
    epochs per ``every`` percent at most every ``min_interval_s`` seconds. No carriage returns."""

    def __init__(self, every: float = 10.0, min_interval_s: float = 30.0) -> None:
        super().__init__()
        self.every, self.min_interval_s = every, min_interval_s
        self._enabled = True
        self._t0 = self._last = 0.0
        self._next_pct = every
        self._eval_t0 = 0.0

    # -- ProgressBar API ---------------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **{"file": sys.stderr, "flush": True, **kwargs})

    # -- training ----------------------------------------------------------------------------------------
    def _epoch(self, trainer: pl.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")

    def _train_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        items = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return " ".join(f"{k}={_fmt(v)}" for k, v in items.items())

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._next_pct = self.every

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = self.total_train_batches
        if not self._enabled or not total or math.isinf(total):
            return
        done = batch_idx + 1
        pct = 100.0 * done / total
        now = time.monotonic()
        if pct >= self._next_pct and done < total:
            self._next_pct = (math.floor(pct / self.every) + 1) * self.every
            if now - self._last >= self.min_interval_s:
                self._last = now
                emit(f"{self._epoch(trainer)}: {pct:.0f}% ({done}/{total} batches, {_duration(now - self._t0)}) "
                     f"{self._train_metrics(trainer, pl_module)}".rstrip())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            took = time.monotonic() - self._t0
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            emit(f"{self._epoch(trainer)}: {batches} batches in {_duration(took)} "
                 f"{self._train_metrics(trainer, pl_module)}".rstrip())

    # -- evaluation --------------------------------------------------------------------------------------
    def _eval_start(self, *args: Any) -> None:
        self._eval_t0 = time.monotonic()

    on_validation_start = on_test_start = on_predict_start = _eval_start

    def _eval_line(self, trainer: pl.Trainer, stage: str, label: str) -> None:
        if not self._enabled:
            return
        metrics = {k.split("/", 1)[1]: v for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        shown = [k for k in HEADLINE_METRICS if k in metrics] or sorted(metrics)[:4]
        values = " ".join(f"{stage}/{k}={_fmt(metrics[k])}" for k in shown)
        emit(f"{label} in {_duration(time.monotonic() - self._eval_t0)} {values}".rstrip())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            where = f" ({self._epoch(trainer)})" if trainer.state.fn == "fit" else ""
            self._eval_line(trainer, "val", f"validation{where}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_line(trainer, "test", "test")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            emit(f"predict in {_duration(time.monotonic() - self._eval_t0)}")


def default_progress_bar() -> ProgressBar | None:
    """The progress bar for a vidlang Trainer: ``None`` (Lightning's live bar) on a terminal, else
    :class:`LineProgressBar`."""
    return None if interactive() else LineProgressBar()

"""Training callbacks of the paper recipes (``trainer.callbacks`` in a config, e.g. ``configs/papers/*.yaml``).

- :class:`ILAAlignDecay`: ILA's schedule of its alignment jitter: the released code halves the training offsets of
  every ILA layer at the start of each epoch from epoch 30 (0-based) of its 50 (``ILA.align_decay``).
- :class:`EMA`: an exponential moving average of the task's weights (Prompt Switch's ``--use_ema``, decay 0.9999),
  on Lightning's ``WeightAveraging``: validation, testing and the saved checkpoints use the averaged weights; the
  raw weights keep training.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from vidlang.errors import ConfigError
from vidlang.models.temporal.ila import ILA


class ILAAlignDecay(pl.Callback):
    """Call ``align_decay()`` of the task's ILA block at the start of every training epoch ``>= start_epoch``
    (0-based; the released recipe: 30 of 50). The offsets are buffers, so a resumed run keeps the decay so far."""

    def __init__(self, start_epoch: int = 30) -> None:
        if start_epoch < 0:
            raise ConfigError(f"ILAAlignDecay.start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = start_epoch
        self.calls: list[int] = []  # epochs at which the offsets were halved (this process)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not isinstance(pl_module.block, ILA):
            raise ConfigError(f"ILAAlignDecay needs the 'ila' temporal block, the model has "
                              f"{type(pl_module.block).__name__}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch >= self.start_epoch:
            pl_module.block.align_decay()
            self.calls.append(trainer.current_epoch)


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer: ``avg = decay x avg + (1 - decay) x w`` after each
    optimizer step from ``start_step`` on (Prompt Switch: decay 0.9999 from the first step)."""

    def __init__(self, decay: float = 0.9999, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA.decay must lie in (0, 1), got {decay}")
        if start_step < 0:
            raise ConfigError(f"EMA.start_step must be >= 0, got {start_step}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay, self.start_step = decay, start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step


__all__ = ["EMA", "ILAAlignDecay"]

"""``FrameCurriculum``: the number of training frames by epoch (Frozen in Time's 1 -> 4 frames curriculum).

``schedule`` maps a (0-based) epoch to the frame count from that epoch on, e.g. ``{0: 1, 10: 4}`` (the released
recipe: train on one frame, then fine-tune on four) or ``{0: 1, 5: 4, 8: 8}``. In YAML::

    trainer:
      callbacks:
        - class_path: vidlang.data.curriculum.FrameCurriculum
          init_args: {schedule: {0: 1, 10: 4}}

At the start of every training epoch the callback sets the count of the epoch
(:meth:`vidlang.data.datamodule.VideoDataModule.set_train_frames`); the data module then builds its training
loaders again before the epoch's first batch, so every batch of an epoch has that epoch's count (image sources
stay at one frame). Evaluation uses the schedule's final count: ``data.sampling.eval_num_frames`` (else
``num_frames``) must equal it, and the model must take it (e.g. the ``frozen`` block's ``max_frames``).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from vidlang.errors import ConfigError


class FrameCurriculum(pl.Callback):
    """Set the data module's training frame count at the start of each epoch from ``schedule`` (module docs)."""

    def __init__(self, schedule: dict[int, int]) -> None:
        steps = {int(e): int(n) for e, n in dict(schedule).items()}
        if 0 not in steps:
            raise ConfigError(f"FrameCurriculum.schedule must give the frame count of epoch 0, got {schedule}")
        bad = {e: n for e, n in steps.items() if e < 0 or n < 1}
        if bad:
            raise ConfigError(f"FrameCurriculum.schedule needs epochs >= 0 and frame counts >= 1, got {bad}")
        self.schedule = dict(sorted(steps.items()))
        self.applied: dict[int, int] = {}  # epoch -> frames set at its start (this process)

    @property
    def final_frames(self) -> int:
        return self.schedule[max(self.schedule)]

    def frames_at(self, epoch: int) -> int:
        """The frame count of ``epoch``: the entry of the latest schedule epoch <= ``epoch``."""
        return self.schedule[max(e for e in self.schedule if e <= epoch)]

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> Any:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_train_frames"):
            raise ConfigError("FrameCurriculum needs vidlang's VideoDataModule (data: ...) as the trainer's data")
        return dm

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        dm = self._datamodule(trainer)
        eval_frames = dm.sampling.frames(False)
        if eval_frames != self.final_frames:
            raise ConfigError(f"FrameCurriculum ends at {self.final_frames} frames but evaluation uses {eval_frames}: "
                              f"set data.sampling.eval_num_frames (or num_frames) to {self.final_frames}")
        dm.set_train_frames(self.frames_at(trainer.current_epoch))  # before Lightning asks for the loader

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        self._datamodule(trainer).set_train_frames(self.frames_at(epoch))
        self.applied[epoch] = self.frames_at(epoch)


__all__ = ["FrameCurriculum"]

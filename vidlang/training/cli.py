"""vidlang's LightningCLI: tasks chosen by ``class_path``, the resolved config kept with checkpoints."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback


class ConfigInCheckpoint(SaveConfigCallback):
    """Writes ``config.yaml`` to the log dir (Lightning's default) and embeds the same resolved
    YAML in every checkpoint under ``checkpoint["vidlang_config"]``."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["vidlang_config"] = self.parser.dump(self.config, skip_none=False)


class VidlangCLI(LightningCLI):
    """``vidlang fit|validate|test|predict --config configs/...yaml``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        from vidlang.data.datamodule import VideoDataModule

        kwargs.setdefault("save_config_callback", ConfigInCheckpoint)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=VideoDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            args=args,
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured trainer, saving checkpoints atomically unless a checkpoint IO is configured."""
        from vidlang.io import with_atomic_checkpoint_io

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_atomic_checkpoint_io(trainer_cfg.get("plugins"), trainer_cfg.get("strategy")))
        return super().instantiate_trainer(**kwargs)

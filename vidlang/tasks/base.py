"""The base of vidlang's tasks: :class:`VideoTask` and the mixins the tasks share.

A task is a thin LightningModule (model + loss + metrics). :class:`VideoTask` owns what every task repeats:

* its config: the model config from a dict (:meth:`VideoTask.model_config`, through ``ModelConfig.from_dict``), the
  typed groups of :mod:`vidlang.tasks.config` from instances or mappings over the task's defaults
  (:meth:`VideoTask.init_groups`), ``save_hyperparameters`` with the model config and the groups as plain dicts
  (:meth:`VideoTask.save_config`: checkpoints load with ``weights_only=True``);
* checkpoints: :meth:`VideoTask.load_from_checkpoint` reads through the safe reader
  (:func:`vidlang.checkpoints.read_checkpoint`), and the hyper-parameters of older checkpoints are mapped in one
  place (:meth:`VideoTask.hparams_from_checkpoint`);
* the optimizer: AdamW over :meth:`VideoTask.param_groups` (the model's own ``param_groups``: its lr / weight-decay
  recipe) with the warm-up cosine schedule of :mod:`vidlang.tasks.schedule` (:func:`adamw_warmup_cosine`);
* the block's auxiliary losses weighed by :func:`vidlang.losses.aux.weigh_aux_losses` (:meth:`VideoTask.weigh_aux`);
* logging of a training step (:meth:`VideoTask.log_train`) and the evaluation report: its directory (a collective:
  every rank calls it) and rank 0 writing it (:meth:`VideoTask.publish_report`).

:class:`EvalLoopMixin` (val/test epochs gathered into ``self._eval``) and :class:`TokenizerMixin` (the tokenizer
found and embedded in checkpoints) are for the tasks that evaluate embeddings / tokenise text.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from vidlang.config import as_group
from vidlang.errors import ConfigError
from vidlang.losses.aux import weigh_aux_losses
from vidlang.models.clip.tokenizer import TOKENIZER_KEY, ClipTokenizer
from vidlang.models.factory import ModelConfig
from vidlang.tasks.config import TASK_MOVED, OptimConfig
from vidlang.tasks.schedule import resolve_warmup, warmup_cosine


def normalize_uint8_video(batch: dict[str, Any], mean: Any, std: Any) -> dict[str, Any]:
    """In place: uint8 ``batch["video"]`` -> normalised float on its device (float videos are left as they are)."""
    from vidlang.data.transforms import normalize

    video = batch.get("video")
    if isinstance(video, Tensor) and video.dtype == torch.uint8:
        batch["video"] = normalize(video, mean, std)
    return batch


def adamw_warmup_cosine(
    task: Any, groups: list[dict[str, Any]], optim: OptimConfig,
    no_params: str = "no trainable parameters: check ModelConfig.freeze",
) -> dict[str, Any]:
    """A task's ``configure_optimizers`` result: AdamW over ``groups`` (``optim.lr``, ``betas``, ``eps``) with a
    per-step linear-warmup cosine schedule (``optim.warmup_steps`` / ``warmup_ratio`` / ``min_lr_ratio``) sized from
    ``trainer.estimated_stepping_batches``. Raises ``ValueError(no_params)`` for empty ``groups``, and for data
    without a length unless ``trainer.max_steps`` is set."""
    if not groups:
        raise ValueError(no_params)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    total = task.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("cannot size the lr schedule: set trainer.max_steps (the data has no length)")
    total = max(1, int(total))
    warmup = resolve_warmup(total, optim.warmup_steps, optim.warmup_ratio)
    sched = warmup_cosine(opt, warmup, total, optim.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class VideoTask(pl.LightningModule):
    """What every vidlang task shares (module docstring). A task's ``__init__`` calls :meth:`model_config`,
    :meth:`init_groups` and :meth:`save_config`; it sets ``self.optim`` (its :class:`OptimConfig`) and
    ``self.model`` (or overrides :meth:`param_groups`), and ``self.aux_loss_weights`` if it weighs auxiliary
    losses."""

    optim: OptimConfig
    aux_loss_weights: dict[str, float]

    # -- config ----------------------------------------------------------------------------------
    @staticmethod
    def model_config(model: ModelConfig | Mapping[str, Any] | None) -> ModelConfig | None:
        """``model`` as a :class:`ModelConfig` (a dict, e.g. a checkpoint's hyper-parameters: keys of older
        versions mapped by ``ModelConfig.from_dict``)."""
        return ModelConfig.from_dict(model) if isinstance(model, Mapping) else model

    @classmethod
    def config_groups(cls) -> dict[str, Any]:
        """The task's typed groups: argument name -> its default (a dataclass instance)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if dataclasses.is_dataclass(p.default)}

    def init_groups(self, **given: Any) -> dict[str, Any]:
        """Each group argument (an instance, a mapping of its fields over the argument's default, or None for the
        default) as its dataclass, by name."""
        defaults = self.config_groups()
        return {name: as_group(type(defaults[name]), value, f"{type(self).__name__}.{name}", defaults[name],
                               TASK_MOVED) for name, value in given.items()}  # fmt: skip

    def save_config(self, ignore: Sequence[str] = (), **plain: Any) -> None:
        """``save_hyperparameters`` of the calling ``__init__``'s arguments (less ``ignore``), then ``plain``'s values
        over them, dataclasses (the model config, groups) as plain dicts: checkpoints load with ``weights_only``."""
        frame = inspect.currentframe()
        self.save_hyperparameters(ignore=list(ignore) or None, frame=frame.f_back if frame is not None else None)
        for name, value in plain.items():
            is_config = dataclasses.is_dataclass(value) and not isinstance(value, type)
            self.hparams[name] = dataclasses.asdict(value) if is_config else value

    # -- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def hparams_from_checkpoint(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint's hyper-parameters as this task's arguments: the flat keys of before the groups moved into
        them (:data:`vidlang.tasks.config.TASK_MOVED`), the model config's older keys mapped
        (``ModelConfig.from_dict``), LightningCLI's ``_class_path`` / ``_instantiator`` and keys the task no longer
        takes dropped (as Lightning's ``load_from_checkpoint`` does)."""
        hp = TASK_MOVED.upgrade({k: v for k, v in hparams.items() if not str(k).startswith("_")})
        if isinstance(hp.get("model"), Mapping):
            hp["model"] = dataclasses.asdict(ModelConfig.from_dict(hp["model"], strict=False))
        params = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in hp.items() if k in params and k != "self"}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], strict: bool = True, source: str = "checkpoint",
                        **overrides: Any) -> VideoTask:
        """The task a checkpoint dict (read by :func:`vidlang.checkpoints.read_checkpoint`) describes: built from
        its hyper-parameters (:meth:`hparams_from_checkpoint`; ``overrides`` win), restored by
        ``on_load_checkpoint``, then its weights loaded; with ``strict``, weights that do not fit raise
        :class:`~vidlang.errors.CheckpointError` naming ``source``."""
        from vidlang.checkpoints import check_weights

        hp = cls.hparams_from_checkpoint(checkpoint.get("hyper_parameters") or {})
        task = cls(**{**hp, **overrides})
        task.on_load_checkpoint(checkpoint)
        missing, unexpected = task.load_state_dict(checkpoint["state_dict"], strict=False)
        if strict:
            check_weights(source, missing, unexpected)
        return task

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike, map_location: str | torch.device | None = None,
        hparams_file: Any = None, strict: bool | None = None, weights_only: bool | None = None, **kwargs: Any,
    ) -> VideoTask:
        """Lightning's ``load_from_checkpoint`` through the safe reader (tensors and plain data only:
        ``weights_only=False`` is refused) and :meth:`from_checkpoint`; ``kwargs`` override hyper-parameters,
        ``map_location`` (a device) is where the task goes (default: the CPU)."""
        from vidlang.checkpoints import read_checkpoint

        if weights_only is False:
            raise ValueError("vidlang tasks load checkpoints with weights_only=True (vidlang.checkpoints)")
        if hparams_file is not None:
            raise ValueError("hparams_file is not supported: the hyper-parameters come from the checkpoint")
        task = cls.from_checkpoint(read_checkpoint(checkpoint_path), strict=True if strict is None else strict,
                                   source=str(checkpoint_path), **kwargs)  # fmt: skip
        return task.to(map_location) if isinstance(map_location, (str, torch.device)) else task

    # -- training --------------------------------------------------------------------------------
    @property
    def run_lr(self) -> float:
        """The base lr of this run: ``optim.lr``, scaled by the linear rule when ``optim.base_batch_size`` is set
        (:meth:`global_batch_size` / ``base_batch_size``)."""
        if self.optim.base_batch_size is None:
            return self.optim.lr
        return self.optim.scaled_lr(self.global_batch_size())

    def global_batch_size(self) -> int:
        """Per-device training batch (the datamodule's ``loader.batch_size``) x devices x nodes x gradient
        accumulation."""
        trainer = self.trainer
        loader = getattr(getattr(trainer, "datamodule", None), "loader", None)
        if loader is None:
            raise ConfigError("optim.base_batch_size (the lr scaling rule) needs the training batch size: train with "
                              "a VideoDataModule (data.loader.batch_size), or leave base_batch_size unset")
        return int(loader.batch_size) * trainer.world_size * int(trainer.accumulate_grad_batches)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer groups: the model's (its lr / weight-decay recipe, ``ModelConfig.lr_mults``) at
        :attr:`run_lr`."""
        return self.model.param_groups(self.run_lr, self.optim.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.param_groups(), self.optim)

    def on_fit_start(self) -> None:
        """Print the lr actually used when the scaling rule applies (rank 0)."""
        o = self.optim
        if o.base_batch_size is not None and self.trainer.is_global_zero:
            batch = self.global_batch_size()
            print(f"lr scaling rule: lr {o.lr:g} x global batch {batch} / base {o.base_batch_size} = {self.run_lr:g}",
                  flush=True)

    @property
    def video_text(self) -> Any:
        """The ``VideoTextModel`` (towers + temporal block) of the task."""
        return self.model

    @property
    def block(self) -> Any:
        """The temporal block (its ``default_aux_weights`` weigh the auxiliary losses)."""
        return self.video_text.block

    def freeze_unreached_block_parts(self, calls_condition_text: bool) -> int:
        """Freeze the block's parameters this task's loss never reaches: its ``llm_head`` (used by the chat
        encoder only) and, when the task does not call ``condition_text``, its ``conditioning_parameters``.
        Returns how many were trainable. They would never get a gradient: single-process training skips them
        anyway, and under DDP a trainable parameter without a gradient fails the gradient synchronisation."""
        block = self.block
        params = [*(block.llm_head.parameters() if block.llm_head is not None else ())]
        if not calls_condition_text:
            params += block.conditioning_parameters()
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        return len(trainable)

    def weigh_aux(self, aux: Mapping[str, Tensor]) -> Tensor | None:
        """The weighted sum of auxiliary losses: ``aux_loss_weights`` over the block's ``default_aux_weights``
        (unlisted in both: 1.0); None when there are none."""
        total, _ = weigh_aux_losses(aux, self.block.default_aux_weights, self.aux_loss_weights)
        return total

    def log_train(self, logs: Mapping[str, Tensor], total: Tensor, batch_size: int) -> None:
        """Log a training step: ``logs`` (detached), ``total`` as the progress bar's ``loss`` and the lr of the
        first parameter group as ``train/lr``."""
        self.log_dict({k: v.detach() for k, v in logs.items()}, batch_size=batch_size)
        self.log("loss", total.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)

    # -- reports ---------------------------------------------------------------------------------
    def report_dir(self) -> Path:
        """Where metrics JSON and plots go: checkpoint dir > logger dir > ``default_root_dir``.

        A collective under DDP (``trainer.log_dir`` broadcasts rank 0's value): every rank calls it."""
        ckpt = getattr(self.trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def publish_report(self, write: Callable[[Path], Any]) -> None:
        """Every rank resolves :meth:`report_dir` (a collective); rank 0 calls ``write(report_dir)``."""
        out_dir = self.report_dir()
        if self.trainer.is_global_zero:
            write(out_dir)


class EvalLoopMixin:
    """Lightning evaluation hooks shared by the tasks: each val/test epoch starts with an empty ``self._eval``,
    every batch goes to ``self._eval_step(batch, stage)`` and the epoch ends with ``self._finish_eval(stage)``."""

    _eval: dict[str, Any]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval = {}

    def on_test_epoch_start(self) -> None:
        self._eval = {}

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        raise NotImplementedError

    def _finish_eval(self, stage: str) -> None:
        raise NotImplementedError


class TokenizerMixin:
    """Tokenizer of a task, in order of precedence: one given to :meth:`set_tokenizer`; the one embedded in a
    checkpoint the task was loaded from; the directory ``hparams.tokenizer``; ``trainer.datamodule.tokenizer``.
    Whatever is used is embedded in every checkpoint (:meth:`save_tokenizer`), so ``load_from_checkpoint``
    needs no tokenizer files. The task defines ``context_length``."""

    _tokenizer: Any = None
    _restored: bool = False  # weights came from a checkpoint (on_load_checkpoint ran)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        self.bind_block_tokenizer()

    def bind_block_tokenizer(self) -> None:
        """Hand the tokenizer to the temporal block (``TemporalBlock.bind_tokenizer``: Prompt Switch's caption-loss
        token weights, ViFi-CLIP's text context on fresh weights). Called when training starts; without a
        tokenizer (batches carrying ``input_ids``) there is nothing to bind. The block is fresh unless its weights
        were restored from a checkpoint or came with ``model.pretrained`` (a converted or vidlang directory)."""
        try:
            tokenizer = self.tokenizer
        except RuntimeError:
            return
        fresh = not self._restored and not self.video_text.block_weights_loaded
        self.block.bind_tokenizer(tokenizer, self.video_text.text_tower, fresh=fresh)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (a ``ClipTokenizer``); it is saved inside every checkpoint."""
        self._tokenizer = tokenizer
        self.on_tokenizer_change()

    def on_tokenizer_change(self) -> None:  # noqa: B027 - optional override (e.g. drop cached text embeddings)
        pass

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._find_tokenizer()
        return self._tokenizer

    def _find_tokenizer(self) -> Any:
        if self.hparams.tokenizer:
            return ClipTokenizer.from_dir(self.hparams.tokenizer, context_length=self.context_length)
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if getattr(dm, "tokenizer", None) is not None:
            return dm.tokenizer
        raise RuntimeError(
            f"{type(self).__name__} has no tokenizer: pass tokenizer=<dir>, call set_tokenizer(), give the "
            "datamodule a `tokenizer` attribute, or load a checkpoint that embeds one"
        )

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``texts`` -> ``input_ids, attention_mask [A, Lt]`` on this module's device."""
        ids, mask = self.tokenizer(texts, self.context_length)
        return ids.to(self.device), mask.to(self.device)

    def save_tokenizer(self, checkpoint: dict[str, Any]) -> None:
        """Embed the tokenizer (if one can be found) in ``checkpoint``."""
        tok = self._tokenizer
        if tok is None:
            try:
                tok = self.tokenizer
            except RuntimeError:
                return
        checkpoint[TOKENIZER_KEY] = tok.state()

    def load_tokenizer(self, checkpoint: dict[str, Any]) -> None:
        """Take the tokenizer embedded in ``checkpoint`` (unless one was set); marks the weights as restored."""
        self._restored = True
        if TOKENIZER_KEY in checkpoint and self._tokenizer is None:
            self._tokenizer = ClipTokenizer.from_state(checkpoint[TOKENIZER_KEY])

"""Pieces shared by the tasks: tokenizer handling, device-side video normalisation, the optimizer + schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vidlang.models.clip.tokenizer import TOKENIZER_KEY, ClipTokenizer
from vidlang.tasks.schedule import resolve_warmup, warmup_cosine


def normalize_uint8_video(batch: dict[str, Any], mean: Any, std: Any) -> dict[str, Any]:
    """In place: uint8 ``batch["video"]`` -> normalised float on its device (float videos are left as they are)."""
    from vidlang.data.transforms import normalize

    video = batch.get("video")
    if isinstance(video, Tensor) and video.dtype == torch.uint8:
        batch["video"] = normalize(video, mean, std)
    return batch


def adamw_warmup_cosine(
    task: Any,
    groups: list[dict[str, Any]],
    eps: float | None = None,
    no_params: str = "no trainable parameters: check ModelConfig.freeze",
) -> dict[str, Any]:
    """A task's ``configure_optimizers`` result: AdamW over ``groups`` (``hparams.lr``, ``hparams.betas``, and
    ``eps`` when given) with a per-step linear-warmup cosine schedule (``hparams.warmup_steps`` /
    ``warmup_ratio`` / ``min_lr_ratio``) sized from ``trainer.estimated_stepping_batches``.
    Raises ``ValueError(no_params)`` for empty ``groups``, and for data without a length unless
    ``trainer.max_steps`` is set."""
    if not groups:
        raise ValueError(no_params)
    h = task.hparams
    opt = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas), **({} if eps is None else {"eps": eps}))
    total = task.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("cannot size the lr schedule: set trainer.max_steps (the data has no length)")
    total = max(1, int(total))
    warmup = resolve_warmup(total, h.warmup_steps, h.warmup_ratio)
    sched = warmup_cosine(opt, warmup, total, h.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
        if TOKENIZER_KEY in checkpoint and self._tokenizer is None:
            self._tokenizer = ClipTokenizer.from_state(checkpoint[TOKENIZER_KEY])

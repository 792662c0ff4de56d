"""Stage-1 chat-encoder training (Video-LLaMA): caption loss through a frozen causal LM.

Thin LightningModule around :class:`vidlang.models.chat.ChatEncoder`. Batch contract
(:mod:`vidlang.data.collate`): ``video`` uint8 ``[B, T, C, H, W]`` (normalised here with the image
tower's mean/std), ``captions`` list of A strings, ``caption_index [A]`` (owner video of each caption;
optional when A == B), and optionally ``audio [B, S]`` + ``audio_lengths [B]`` + ``audio_mask [B]``
(16 kHz mono) when the task has an audio branch.

Only the Q-former(s) and the projections train. The frozen LLM is not stored in checkpoints: it is
reloaded from ``llm`` and its weights are put back into the loaded state dict before strict loading.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vidlang.models.audio.encoder import AudioConfig, build_audio_branch
from vidlang.models.audio.frontend import LogMelFrontend
from vidlang.models.chat import CAPTION_TEMPLATE, DEFAULT_TEMPLATE, ChatEncoder
from vidlang.models.factory import ModelConfig, build_model
from vidlang.tasks.base import VideoTask, adamw_warmup_cosine
from vidlang.tasks.config import CHAT_OPTIM, OptimConfig

LLM_PREFIX = "encoder.llm."


class ChatEncoderTask(VideoTask):
    """Train the video (+audio) Q-former and projections on captions with the LLM frozen."""

    def __init__(
        self,
        model: ModelConfig | None = None,
        llm: str | None = None,
        audio: AudioConfig | None = None,
        template: str = DEFAULT_TEMPLATE,
        caption_template: str = CAPTION_TEMPLATE,
        max_caption_tokens: int = 64,
        optim: OptimConfig = CHAT_OPTIM,
        encoder: ChatEncoder | None = None,
    ) -> None:
        """``model``: the visual model config (its block must be ``qformer``). ``llm``: a local directory
        with a causal LM and its tokenizer. ``audio``: the audio branch config (None = video only).
        ``optim``: AdamW + warm-up cosine (:class:`~vidlang.tasks.config.OptimConfig`, or a mapping of its fields).
        ``encoder``: a ready :class:`ChatEncoder` instead of ``model``/``llm``/``audio`` (programmatic use)."""
        super().__init__()
        model = self.model_config(model)
        if isinstance(audio, dict):
            audio = AudioConfig(**audio)
        groups = self.init_groups(optim=optim)
        self.save_config(ignore=["encoder"], model=model, audio=audio, **groups)
        self.optim = groups["optim"]
        self.encoder = encoder if encoder is not None else self._build(model, llm, audio)
        self.frontend = LogMelFrontend() if self.encoder.audio is not None else None

    def _build(self, model: ModelConfig | None, llm: str | None, audio: AudioConfig | None) -> ChatEncoder:
        if model is None or llm is None:
            raise ValueError("ChatEncoderTask needs `model` and `llm` (a local LLM directory), or `encoder`")
        if model.block != "qformer":
            raise ValueError(f"the chat encoder needs ModelConfig.block='qformer', got {model.block!r}")
        visual = build_model(model)
        branch = build_audio_branch(audio) if audio is not None else None
        return ChatEncoder.from_pretrained_llm(
            visual,
            llm,
            audio=branch,
            template=self.hparams.template,
            caption_template=self.hparams.caption_template,
            max_caption_tokens=self.hparams.max_caption_tokens,
        )

    # -- batches ---------------------------------------------------------------------------------
    def _media(self, batch: dict[str, Any]) -> list[Tensor]:
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"chat-encoder training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        mel = mask = None
        if self.frontend is not None and "audio" in batch:
            mel, mask = self.frontend.from_batch(batch["audio"], batch["audio_lengths"], batch["audio_mask"])
        return self.encoder.media_tokens(video, mel, mask)

    def caption_loss(self, batch: dict[str, Any]) -> Tensor:
        captions = list(batch["captions"])
        media = self._media(batch)
        owner = batch.get("caption_index")
        if owner is None:
            if len(captions) != len(media):
                raise ValueError(f"{len(captions)} captions for {len(media)} videos and no caption_index")
            owner = range(len(media))
        return self.encoder.caption_loss([media[int(i)] for i in owner], captions)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.caption_loss(batch)
        self.log_train({"train/loss_caption": loss}, loss, batch["video"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch.get("video") is None:  # every sample of the batch failed to load (skipped, vidlang.data.collate)
            return
        self.log("val/loss_caption", self.caption_loss(batch), batch_size=batch["video"].shape[0], sync_dist=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(LLM_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the (reloaded, frozen) LLM weights back so that strict loading checks everything else."""
        state = checkpoint.get("state_dict")
        if state is not None and not any(k.startswith(LLM_PREFIX) for k in state):
            state.update({LLM_PREFIX + k: v for k, v in self.encoder.llm.state_dict().items()})

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The chat encoder's groups (its trainable parts: Q-former(s), projections)."""
        return self.encoder.param_groups(self.run_lr, self.optim.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.param_groups(), self.optim,
                                   no_params="the chat encoder has no trainable parameters")

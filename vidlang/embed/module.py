"""The model side of ``vidlang embed``: a checkpoint's towers in a LightningModule whose ``predict_step`` embeds.

:func:`load_encoder` reads any vidlang checkpoint with the safe reader (:mod:`vidlang.serve.inference`:
``torch.load(weights_only=True)``, the task detected from the checkpoint): a RetrievalTask (video and text,
audio-visual when trained with audio), a ChatEncoderTask (video) or a RecognitionTask (video and text). The
tasks themselves are not involved: :class:`EmbedModule` holds the bare models and is all Lightning runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.embeddings import ModelInfo


@dataclass
class Encoder:
    """A checkpoint's towers: ``model`` (a ``VideoTextModel``), optional ``audio_model`` (an ``AudioVisualModel``
    around it) + ``frontend`` (``LogMelFrontend``), optional ``tokenizer``, and what identifies it (``info``)."""

    model: nn.Module
    tokenizer: Any | None
    info: ModelInfo
    num_frames: int
    audio_model: nn.Module | None = None
    frontend: nn.Module | None = None

    @property
    def image_size(self) -> int:
        return int(self.model.image_tower.cfg.image_size)


def load_encoder(path: str | os.PathLike, llm: str | None = None) -> Encoder:
    """Any vidlang checkpoint -> :class:`Encoder` (module docstring); errors name the file."""
    from vidlang.serve.inference import _config_of, checkpoint_task, load_bundle, load_classifier, read_checkpoint

    ckpt = read_checkpoint(path)
    kind = checkpoint_task(ckpt, path)
    if kind == "recognition":
        frames = int(_config_of(ckpt.get("hyper_parameters") or {}, str(path)).inference_frames)
        del ckpt
        task = load_classifier(path)
        model, tok = task.model, task.tokenizer
        audio_model = frontend = None
    else:
        del ckpt
        bundle = load_bundle(path, llm=llm, command="vidlang embed")
        model, tok, frames = bundle.model, bundle.tokenizer, bundle.num_frames
        audio_model, frontend = bundle.audio_model, bundle.audio_frontend if bundle.audio_model is not None else None
    info = ModelInfo.of_checkpoint(path, int(model.embed_dim), kind, audio=audio_model is not None)
    return Encoder(model.eval(), tok, info, frames, audio_model, frontend)


class EmbedModule(pl.LightningModule):
    """``predict_step``: a planned batch (:mod:`vidlang.embed.data`) -> ``{"index", "embedding" [b, E],
    "text_embedding" [b, E] (with ``text``), "skipped"}``, embeddings L2-normalised, float32 on the CPU.

    ``video`` / ``text``: which towers run; without ``video`` the ``embedding`` column holds the text embedding.
    A multi-view clip ``[B, V, T, 3, H, W]`` (e.g. three-crop evaluation) averages its normalised views."""

    def __init__(self, encoder: Encoder, video: bool = True, text: bool = False) -> None:
        super().__init__()
        if not (video or text):
            raise ValueError("embed needs video and/or text")
        if text and encoder.tokenizer is None:
            from vidlang.errors import CheckpointError

            raise CheckpointError(f"{encoder.info.checkpoint}: the checkpoint has no text tokenizer (a "
                                  f"{encoder.info.kind} checkpoint): no text embeddings")
        self.model = encoder.model
        self.audio_model = encoder.audio_model
        self.frontend = encoder.frontend
        self.tokenizer = encoder.tokenizer
        self.info = encoder.info
        self.video, self.text = video, text

    @torch.inference_mode()
    def encode_video(self, batch: dict[str, Any]) -> Tensor:
        """uint8 ``video [B, (V,) T, 3, H, W]`` (+ audio fields) -> normalised ``[B, E]``."""
        from vidlang.data.transforms import normalize

        video = normalize(batch["video"].to(self.device), self.model.image_mean, self.model.image_std)
        b = video.shape[0]
        views = video.shape[1] if video.ndim == 6 else 1
        clips = video.flatten(0, 1) if video.ndim == 6 else video  # [B*V, T, 3, H, W]
        if self.audio_model is not None:
            if "audio" in batch:
                mel, mask = self.frontend.from_batch(batch["audio"].to(self.device), batch["audio_lengths"],
                                                     batch["audio_mask"])
            else:
                mel, mask = self.frontend([None] * b)
            mel, mask = mel.to(self.device), mask.to(self.device)
            if views > 1:
                mel, mask = mel.repeat_interleave(views, 0), mask.repeat_interleave(views, 0)
            out = self.audio_model.encode_video(clips, mel, mask)
        else:
            out = self.model.encode_video(clips)
        emb = F.normalize(out.embeds.float(), dim=-1)  # [B*V, E]
        return F.normalize(emb.view(b, views, -1).mean(1), dim=-1) if views > 1 else emb

    @torch.inference_mode()
    def encode_text(self, captions: list[str]) -> Tensor:
        ids, mask = self.tokenizer(list(captions), self.model.text_tower.cfg.context_length)
        return F.normalize(self.model.encode_text(ids.to(self.device), mask.to(self.device)).embeds.float(), dim=-1)

    def first_captions(self, batch: dict[str, Any]) -> list[str]:
        """One caption per loaded row (the first); a row without one is an error naming it."""
        if batch.get("video") is None:
            captions = list(batch["captions"])
        else:
            owner = batch["caption_index"].tolist()
            first: dict[int, str] = {}
            for cap, b in zip(batch["captions"], owner, strict=True):
                first.setdefault(b, cap)
            captions = [first.get(b) for b in range(len(batch["index"]))]
        missing = [k for k, c in zip(batch["key"], captions, strict=True) if c is None]
        if missing or len(captions) != len(batch["index"]):
            raise ValueError(f"text embeddings need a caption for every video; {missing[:1] or batch['key'][:1]} "
                             "has none")
        return captions

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"index": list(batch["index"]), "skipped": list(batch["skipped_rows"])}
        n = len(out["index"])
        dim = int(self.model.embed_dim)
        empty = torch.zeros(0, dim)
        columns: list[Tensor] = []
        if self.video:
            columns.append(self.encode_video(batch).cpu() if n else empty)
        if self.text:
            columns.append(self.encode_text(self.first_captions(batch)).cpu() if n else empty)
        out["embedding"] = columns[0]
        if len(columns) == 2:
            out["text_embedding"] = columns[1]
        return out

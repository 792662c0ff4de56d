"""Symile (Saporta et al. 2024): a higher-order contrastive loss for video, audio and text (registry ``symile``).

Instead of the pairwise cosines, a (video, audio, caption) triple is scored by the multilinear inner product
``MIP(v, u, t) = sum_e v_e u_e t_e``; each modality in turn is the anchor, and its row is a cross-entropy over
the candidate *pairs* of the two other modalities, all ``B x B`` (or ``B x A``) combinations of the batch (the
official ``n_squared`` negatives); the loss is the mean of the three anchors' losses. It bounds the total
correlation of the three, so it keeps information that only the joint triple carries.

vidlang specifics (deviations from the official code):

- embeddings are L2-normalised and the MIP is multiplied by ``sqrt(E)``, so a triple's score has the scale of a
  cosine (the official code scores un-normalised LayerNorm outputs); logits = scale x score with the main loss's
  scale (``temperature`` or the learnable clamped ``logit_scale``).
- several captions per video: caption anchors have one positive pair (their video, its audio); a video (audio)
  anchor has one positive per caption of its own, each against the negatives only (as ``video_to_text_loss``).
- **missing audio** (``audio_mask`` False): the clip's audio embedding is the neutral unit vector
  ``1 / sqrt(E)``, for which ``sqrt(E) x MIP(v, u, t) = v . t``: the triple's score falls back to the pairwise
  video-text cosine, so a clip without audio still trains the video-text alignment; rows of missing audio are not
  audio anchors. (The official code learns a "missing" embedding inside each encoder instead.)

With the gather every rank computes the whole batch's loss (as ``infonce`` with ``local_loss: false``);
``local_loss`` and ``directions: sum`` are refused. Call it with ``audio`` / ``audio_mask``. The retrieval task uses it
with ``fusion: symile`` (:class:`vidlang.models.fusion.fusion.SymileFusion`: the audio embedding, and the video-side
vector ``sqrt(E) v * u`` that evaluation ranks by).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.losses.contrastive import (
    LOSSES,
    ContrastiveLoss,
    ContrastiveOutput,
    text_to_video_loss,
    video_to_text_loss,
)
from vidlang.losses.distributed import all_gather_no_grad, all_gather_with_grad, gather_caption_index, is_distributed


def neutral_audio(audio: Tensor, audio_mask: Tensor | None) -> Tensor:
    """Rows of ``audio [B, E]`` (normalised) whose ``audio_mask`` is False become ``1 / sqrt(E)`` everywhere."""
    if audio_mask is None:
        return audio
    neutral = audio.new_full((audio.shape[1],), 1 / math.sqrt(audio.shape[1]))
    return torch.where(audio_mask.to(audio.device, torch.bool)[:, None], audio, neutral)


def pair_products(x: Tensor, y: Tensor) -> Tensor:
    """``x [N, E]``, ``y [M, E]`` -> the element-wise products of every pair, ``[N * M, E]`` (row ``i * M + j``)."""
    return (x[:, None, :] * y[None, :, :]).flatten(0, 1)


@LOSSES.register("symile")
class SymileLoss(ContrastiveLoss):
    """Symile over (video, audio, caption) triples, tolerating missing audio (module docstring)."""

    def __init__(self, gather: bool = True, local_loss: bool = False, max_scale: float = 100.0,
                 temperature: float | None = None, directions: str = "mean") -> None:
        super().__init__(gather=gather, local_loss=local_loss, max_scale=max_scale, temperature=temperature,
                         directions=directions)
        if self.local_loss:
            raise ConfigError("loss 'symile' computes the whole batch on every rank; set contrastive.local_loss "
                              "false")
        if self.directions != "mean":
            raise ConfigError("loss 'symile' averages its three anchors; contrastive.directions must be 'mean'")

    needs_audio = True

    def forward(self, video: Tensor, text: Tensor, caption_index: Tensor, logit_scale: Tensor,  # type: ignore[override]
                similarity=None, audio: Tensor | None = None, audio_mask: Tensor | None = None
                ) -> ContrastiveOutput:
        """``video [B, E]``, ``text [A, E]``, ``caption_index [A]``, ``audio [B, E]`` (unnormalised),
        ``audio_mask [B]`` bool (None: every clip has audio). ``loss_t2v`` / ``loss_v2t`` of the output are the
        caption-anchor and video-anchor terms; ``extra["audio_anchor"]`` the audio-anchor term."""
        if similarity is not None:
            raise ValueError("loss 'symile' scores triples of embeddings; it takes no similarity function")
        if audio is None or audio.shape != video.shape:
            raise ValueError(f"loss 'symile' needs audio [B, E] like video {tuple(video.shape)}, got "
                             f"{None if audio is None else tuple(audio.shape)}")
        if audio_mask is None:
            audio_mask = torch.ones(video.shape[0], dtype=torch.bool, device=video.device)
        with torch.autocast(video.device.type, enabled=False):
            video, text, audio = (F.normalize(x.float(), dim=-1) for x in (video, text, audio))
            index = caption_index.long()
            if self.gather and is_distributed():
                index, _ = gather_caption_index(index, video.shape[0])  # before the videos are gathered
                video, text, audio = (all_gather_with_grad(x) for x in (video, text, audio))
                audio_mask = all_gather_no_grad(audio_mask.to(video.device, torch.bool))
            return self._symile(video, text, audio, audio_mask.to(video.device, torch.bool), index,
                                self.scale(logit_scale.float()))

    def _symile(self, video: Tensor, text: Tensor, audio: Tensor, audio_mask: Tensor, index: Tensor,
                scale: Tensor) -> ContrastiveOutput:
        b, e = video.shape
        audio = neutral_audio(audio, audio_mask)
        factor = scale * math.sqrt(e)
        ids = torch.arange(b, device=index.device)
        # caption anchors: candidates (video j, audio k), column j * B + k; positive (c(a), c(a))
        t_logits = factor * text @ pair_products(video, audio).t()  # [A, B * B]
        loss_text = text_to_video_loss(t_logits, index * b + index)
        # video anchors: candidates (audio k, caption a'), column k * A + a'; positives (b, a') with c(a') = b
        own = ids[:, None] == index[None, :]  # [B, A]
        pos_pairs = (ids[:, None, None] == ids[None, :, None]) & own[:, None, :]  # [B, B(k), A]
        v_logits = factor * video @ pair_products(audio, text).t()  # [B, B * A]
        loss_video = video_to_text_loss(v_logits, pos_pairs.flatten(1))
        # audio anchors (clips that have audio): candidates (video j, caption a'), same positives
        u_logits = factor * audio @ pair_products(video, text).t()  # [B, B * A]
        rows = audio_mask & own.any(dim=1)
        terms = [loss_text, loss_video]
        extra: dict[str, Tensor] = {}
        if bool(rows.any()):
            extra["audio_anchor"] = video_to_text_loss(u_logits[rows], pos_pairs.flatten(1)[rows])
            terms.append(extra["audio_anchor"])
        total = torch.stack(terms).mean()
        return ContrastiveOutput(total, loss_text, loss_video, scale.detach(), extra)

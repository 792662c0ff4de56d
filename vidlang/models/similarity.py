"""Retrieval similarities between text and video outputs, chosen by name from ``SIMILARITIES``.

- ``cosine``: the usual CLIP similarity of the L2-normalised pooled embeddings.
- ``mug``: Mug-STAN's parameter-free mutual-guided alignment of word tokens and frame embeddings
  (the released code's default ``mug_frame_token_simple`` mode, with padding taken from the mask
  instead of testing similarities for exact zeros).

Every registered similarity has the signature ``fn(text: TextOutput, video: VideoOutput) -> [A, B]``
(texts x videos, unscaled: the caller multiplies by the logit scale if it wants logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.registry import Registry

SimilarityFn = Callable[[TextOutput, VideoOutput], Tensor]
SIMILARITIES: Registry[SimilarityFn] = Registry("retrieval similarity")


def cosine_similarity(text: Tensor, video: Tensor) -> Tensor:
    """``text [A, E]``, ``video [B, E]`` -> cosine similarities ``[A, B]``."""
    return F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).T


def _mug_block(words: Tensor, mask: Tensor, frames: Tensor, tau: float) -> Tensor:
    """Normalised ``words [a, Lt, E]``, bool ``mask [a, Lt]``, normalised ``frames [B, T, E]`` -> ``[a, B]``."""
    s = torch.einsum("awe,bte->abwt", words, frames)  # [a, B, Lt, T] word-frame cosine
    word_ok = mask[:, None, :, None]  # [a, 1, Lt, 1]
    s = s.masked_fill(~word_ok, 0.0)
    neg = torch.finfo(s.dtype).min
    # text -> video: each word scores the video by its frames (softmax over T), words pooled by softmax over Lt
    word_score = (s * torch.softmax(s * tau, dim=-1)).sum(-1)  # [a, B, Lt]
    word_logits = (word_score * tau).masked_fill(~mask[:, None, :], neg)
    t2v = (word_score * torch.softmax(word_logits, dim=-1)).sum(-1)  # [a, B]
    # video -> text: each frame scores the caption by its words (softmax over real words), frames pooled
    frame_w = torch.softmax((s * tau).masked_fill(~word_ok, neg), dim=-2)  # [a, B, Lt, T]
    frame_score = (s * frame_w).sum(-2)  # [a, B, T]
    v2t = (frame_score * torch.softmax(frame_score * tau, dim=-1)).sum(-1)  # [a, B]
    return (t2v + v2t) / 2


def mug_similarity(
    word_tokens: Tensor,  # [A, Lt, E]
    word_mask: Tensor,  # [A, Lt] 1/True = real token
    frame_embeds: Tensor,  # [B, T, E]
    temperature: float = 100.0,
    chunk: int = 256,
) -> Tensor:
    """Mug mutual-guided similarity ``[A, B]`` (parameter free).

    ``S[a, b, w, t]`` is the word-frame cosine. Text->video: a softmax over frames (x ``temperature``)
    weights ``S`` into one score per word, then a softmax over the real words pools them. Video->text is
    symmetric (softmax over real words, then over frames). The result is the mean of both directions.
    Captions are processed ``chunk`` at a time to bound the ``[chunk, B, Lt, T]`` intermediate.
    """
    if word_tokens.ndim != 3 or frame_embeds.ndim != 3:
        raise ValueError(
            f"mug_similarity expects word_tokens [A, Lt, E] and frame_embeds [B, T, E], got "
            f"{tuple(word_tokens.shape)} and {tuple(frame_embeds.shape)}"
        )
    if word_mask.shape != word_tokens.shape[:2]:
        raise ValueError(f"word_mask {tuple(word_mask.shape)} does not match word_tokens {tuple(word_tokens.shape)}")
    mask = word_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("mug_similarity: every caption needs at least one real token in word_mask")
    words = F.normalize(word_tokens, dim=-1)
    frames = F.normalize(frame_embeds, dim=-1)
    parts = [
        _mug_block(words[i : i + chunk], mask[i : i + chunk], frames, temperature)
        for i in range(0, words.shape[0], chunk)
    ]
    return torch.cat(parts, dim=0)


@SIMILARITIES.register("cosine")
def cosine_outputs(text: TextOutput, video: VideoOutput) -> Tensor:
    """Cosine of the pooled embeddings ``[A, B]``."""
    return cosine_similarity(text.embeds, video.embeds)


@SIMILARITIES.register("mug")
def mug_outputs(text: TextOutput, video: VideoOutput, temperature: float = 100.0) -> Tensor:
    """Mug similarity from ``text.tokens/mask`` and ``video.frame_embeds`` ``[A, B]``."""
    if text.tokens is None or text.mask is None:
        raise ValueError("mug similarity needs TextOutput.tokens and TextOutput.mask (projected word features)")
    if video.frame_embeds is None:
        raise ValueError("mug similarity needs VideoOutput.frame_embeds (per-frame embeddings)")
    return mug_similarity(text.tokens, text.mask, video.frame_embeds, temperature)


def build_similarity(name: str) -> SimilarityFn:
    return SIMILARITIES.get(name)


__all__ = ["SIMILARITIES", "build_similarity", "cosine_similarity", "mug_similarity"]

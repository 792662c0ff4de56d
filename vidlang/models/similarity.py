"""Retrieval similarities between text and video outputs, chosen by name from ``SIMILARITIES``.

- ``cosine``: the usual CLIP similarity of the L2-normalised pooled embeddings.
- ``mug``: Mug-STAN's parameter-free mutual-guided alignment of word tokens and frame embeddings
  (the released code's default ``mug_frame_token_simple`` mode). :func:`mug_similarity` is a pure,
  differentiable function of (word tokens, mask, frame embeddings), computed in blocks of captions x videos
  so that training (the loss similarity) and evaluation over large galleries (:func:`mug_similarity_rows`,
  rows as :func:`vidlang.eval.retrieval.chunked_similarity` yields them) share one implementation; the
  blocking changes neither values nor gradients.
- ``glscl_global``: GLSCL's parameter-free global interaction alone (:func:`vidlang.models.glscl.global_similarity`:
  the caption's EOT feature weighs the frames, cosine with the weighted frame sum); the full GLSCL similarity has
  learnable queries and is the retrieval task's ``glscl`` head (:class:`vidlang.models.glscl.GLSCLSimilarity`).

Every registered similarity has the signature ``fn(text: TextOutput, video: VideoOutput) -> [A, B]``
(texts x videos, unscaled: the caller multiplies by the logit scale if it wants logits; Mug-STAN's loss uses a
fixed scale 100 = 1 / 0.01, the task's business).

Deviations of ``mug`` from the released code (``farewellthree/STAN``, ``mug_head.py``): padding comes from the
mask (the code detects it by word-frame cosines that are exactly 0, which also drops a real word whose cosine
happens to be exactly 0); the code gathers all ranks' captions and videos itself while training (here the
caller passes what it wants scored); similarities are computed in fp32 even under bf16/fp16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.glscl import global_similarity
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


MUG_NORM_EPS = 1e-6  # the released code's norm(): x / max(|x|, 1e-6)


def _mug_inputs(word_tokens: Tensor, word_mask: Tensor, frame_embeds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Checked, L2-normalised ``words [A, Lt, E]`` (fp32 at least), bool ``mask [A, Lt]``, ``frames [B, T, E]``."""
    if word_tokens.ndim != 3 or frame_embeds.ndim != 3:
        raise ValueError(
            f"mug_similarity expects word_tokens [A, Lt, E] and frame_embeds [B, T, E], got "
            f"{tuple(word_tokens.shape)} and {tuple(frame_embeds.shape)}"
        )
    if word_tokens.shape[-1] != frame_embeds.shape[-1]:
        raise ValueError(f"mug_similarity: word dim {word_tokens.shape[-1]} != frame dim {frame_embeds.shape[-1]}")
    if word_mask.shape != word_tokens.shape[:2]:
        raise ValueError(f"word_mask {tuple(word_mask.shape)} does not match word_tokens {tuple(word_tokens.shape)}")
    mask = word_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("mug_similarity: every caption needs at least one real token in word_mask")
    dtype = torch.promote_types(torch.promote_types(word_tokens.dtype, frame_embeds.dtype), torch.float32)
    words = F.normalize(word_tokens.to(dtype), dim=-1, eps=MUG_NORM_EPS)
    frames = F.normalize(frame_embeds.to(dtype), dim=-1, eps=MUG_NORM_EPS)
    return words, mask, frames


def _check_chunks(chunk: int, video_chunk: int) -> None:
    if chunk < 1 or video_chunk < 1:
        raise ValueError(f"mug_similarity chunks must be >= 1, got chunk={chunk}, video_chunk={video_chunk}")


def _mug_rows(words: Tensor, mask: Tensor, frames: Tensor, tau: float, video_chunk: int) -> Tensor:
    """Normalised ``words [a, Lt, E]`` against every video of ``frames [B, T, E]``, ``video_chunk`` at a time."""
    parts = [_mug_block(words, mask, frames[j : j + video_chunk], tau) for j in range(0, frames.shape[0], video_chunk)]
    return torch.cat(parts, dim=1)  # [a, B]


def mug_similarity(
    word_tokens: Tensor,  # [A, Lt, E]
    word_mask: Tensor,  # [A, Lt] 1/True = real token
    frame_embeds: Tensor,  # [B, T, E]
    temperature: float = 100.0,
    chunk: int = 128,
    video_chunk: int = 256,
) -> Tensor:
    """Mug mutual-guided similarity ``[A, B]`` (parameter free, differentiable).

    ``S[a, b, w, t]`` is the word-frame cosine. Text->video: a softmax over frames (x ``temperature``)
    weights ``S`` into one score per word, then a softmax over the real words pools them. Video->text is
    symmetric (softmax over real words, then over frames). The result is the mean of both directions.
    Blocks of ``chunk`` captions x ``video_chunk`` videos bound the ``[chunk, video_chunk, Lt, T]``
    intermediates; values and gradients do not depend on the blocking. Computed in fp32 (fp64 inputs stay
    fp64), also under autocast.
    """
    _check_chunks(chunk, video_chunk)
    with torch.autocast(frame_embeds.device.type, enabled=False):
        words, mask, frames = _mug_inputs(word_tokens, word_mask, frame_embeds)
        parts = [
            _mug_rows(words[i : i + chunk], mask[i : i + chunk], frames, temperature, video_chunk)
            for i in range(0, words.shape[0], chunk)
        ]
        return torch.cat(parts, dim=0)


def mug_similarity_rows(
    word_tokens: Tensor,  # [A, Lt, E]
    word_mask: Tensor,  # [A, Lt]
    frame_embeds: Tensor,  # [B, T, E]
    temperature: float = 100.0,
    chunk: int = 128,
    video_chunk: int = 256,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, S[start:start + c] [c, B])`` caption-row blocks of :func:`mug_similarity` (evaluation over
    a gallery without the whole ``[A, B]`` matrix's intermediates; wrap in ``torch.no_grad()``)."""
    _check_chunks(chunk, video_chunk)
    device = frame_embeds.device.type
    with torch.autocast(device, enabled=False):
        words, mask, frames = _mug_inputs(word_tokens, word_mask, frame_embeds)
    for i in range(0, words.shape[0], chunk):
        with torch.autocast(device, enabled=False):  # not around the yield: the caller keeps its autocast
            rows = _mug_rows(words[i : i + chunk], mask[i : i + chunk], frames, temperature, video_chunk)
        yield i, rows


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


@SIMILARITIES.register("glscl_global")
def glscl_global_outputs(text: TextOutput, video: VideoOutput, temperature: float = 3.0) -> Tensor:
    """GLSCL's global interaction from ``text.embeds`` and ``video.frame_embeds`` ``[A, B]`` (every frame real)."""
    if video.frame_embeds is None:
        raise ValueError("glscl_global similarity needs VideoOutput.frame_embeds (per-frame embeddings)")
    return global_similarity(text.embeds, video.frame_embeds, temperature=temperature)


def build_similarity(name: str) -> SimilarityFn:
    return SIMILARITIES.get(name)


__all__ = ["SIMILARITIES", "build_similarity", "cosine_similarity", "mug_similarity", "mug_similarity_rows"]

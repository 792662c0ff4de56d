"""Symmetric InfoNCE between videos and captions, with several captions per video.

Notation: B videos, A captions (A >= B usually), E embedding size; ``caption_index [A]`` gives
the video of each caption. Embeddings are L2-normalised here; logits are ``scale * cos``
with ``scale = exp(logit_scale)`` clamped at ``max_scale`` (100, as in CLIP). The learnable
``logit_scale`` parameter lives in the model and is passed in.

- text -> video: cross-entropy of each caption over the videos (target = its video).
- video -> text: every (video, positive caption) pair is a cross-entropy of that caption
  against the video's *negative* captions only (the video's other captions are masked out
  of the denominator), averaged over the video's positives, then over videos. With one
  caption per video this is exactly CLIP's loss; with several, no positive is pushed down
  and the optimum is still zero. Videos with no caption in the batch only act as negatives.
- total = (t2v + v2t) / 2.

Distributed (``gather=True`` and a process group is active): embeddings of all ranks are
gathered with gradients. ``local_loss=False``: every rank computes the full global loss;
``local_loss=True``: only local rows (local captions for t2v, local videos for v2t) against
all columns, as in open_clip, which costs O(local x global) instead of O(global^2). In both
cases the DDP-averaged gradient equals the single-process gradient of the global batch
(for ``local_loss`` when every rank holds the same number of videos and captions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.losses.distributed import all_gather_with_grad, gather_caption_index, is_distributed

_NEG_FILL = -1.0e4  # stands for -inf in the masked log-sum-exp (finite: keeps gradients NaN-free)


@dataclass
class ContrastiveOutput:
    loss: Tensor  # scalar, (t2v + v2t) / 2
    loss_t2v: Tensor  # scalar
    loss_v2t: Tensor  # scalar
    scale: Tensor  # scalar, the clamped exp(logit_scale) used


def clamped_scale(logit_scale: Tensor, max_scale: float = 100.0) -> Tensor:
    """``exp(logit_scale)`` clamped to at most ``max_scale`` (no gradient beyond the clamp)."""
    return logit_scale.clamp(max=math.log(max_scale)).exp()


def text_to_video_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits [A, B']`` caption-by-video, ``targets [A]`` column of each caption's video."""
    return F.cross_entropy(logits.float(), targets)


def video_to_text_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Multi-positive video->caption loss (see the module docstring).

    ``logits [B, A']`` video-by-caption, ``positives [B, A']`` bool. Rows without a positive
    are ignored; raises if no row has one.
    """
    logits = logits.float()
    has_pos = positives.any(dim=1)  # [B]
    if not bool(has_pos.any()):
        raise ValueError("video->text loss: no video has a caption in the batch")
    neg_lse = logits.masked_fill(positives, _NEG_FILL).logsumexp(dim=1, keepdim=True)  # [B, 1]
    pair_loss = torch.logaddexp(logits, neg_lse) - logits  # [B, A'] -log p(pos | pos + negatives)
    pair_loss = torch.where(positives, pair_loss, torch.zeros_like(pair_loss))
    per_video = pair_loss.sum(dim=1)[has_pos] / positives.sum(dim=1)[has_pos]
    return per_video.mean()


def _check_inputs(video: Tensor, text: Tensor, caption_index: Tensor) -> None:
    if video.ndim != 2 or text.ndim != 2 or video.shape[1] != text.shape[1]:
        raise ValueError(f"expected video [B, E] and text [A, E]; got {tuple(video.shape)} and {tuple(text.shape)}")
    if caption_index.shape != (text.shape[0],):
        raise ValueError(f"caption_index must be [A={text.shape[0]}], got {tuple(caption_index.shape)}")
    if caption_index.numel() and (caption_index.min() < 0 or caption_index.max() >= video.shape[0]):
        raise ValueError(f"caption_index values must lie in [0, {video.shape[0]}), got {caption_index.tolist()}")


class ContrastiveLoss(nn.Module):
    """Symmetric multi-caption InfoNCE; owns the gather-with-grad collectives."""

    def __init__(self, gather: bool = True, local_loss: bool = False, max_scale: float = 100.0) -> None:
        super().__init__()
        self.gather = gather
        self.local_loss = local_loss
        self.max_scale = max_scale

    def forward(self, video: Tensor, text: Tensor, caption_index: Tensor, logit_scale: Tensor) -> ContrastiveOutput:
        """``video [B, E]``, ``text [A, E]`` (unnormalised), ``caption_index [A]`` in [0, B),
        ``logit_scale`` scalar log-scale parameter."""
        _check_inputs(video, text, caption_index)
        with torch.autocast(video.device.type, enabled=False):  # similarities in fp32, also under bf16 autocast
            return self._forward(video.float(), text.float(), caption_index.long(), logit_scale.float())

    def _forward(self, video: Tensor, text: Tensor, caption_index: Tensor, logit_scale: Tensor) -> ContrastiveOutput:
        video = F.normalize(video, dim=-1)
        text = F.normalize(text, dim=-1)
        scale = clamped_scale(logit_scale, self.max_scale)
        num_local_videos = video.shape[0]
        if self.gather and is_distributed():
            all_video = all_gather_with_grad(video)  # [B_all, E]
            all_text = all_gather_with_grad(text)  # [A_all, E]
            all_index, offset = gather_caption_index(caption_index, num_local_videos)  # [A_all]
        else:
            all_video, all_text, all_index, offset = video, text, caption_index, 0
        if self.local_loss:
            text_rows, text_targets = text, caption_index + offset
            video_rows = video
            video_ids = torch.arange(num_local_videos, device=video.device) + offset  # [B]
        else:
            text_rows, text_targets = all_text, all_index
            video_rows = all_video
            video_ids = torch.arange(all_video.shape[0], device=video.device)
        loss_t2v = text_to_video_loss(scale * text_rows @ all_video.t(), text_targets)
        positives = video_ids[:, None] == all_index[None, :]  # [B_rows, A_all]
        loss_v2t = video_to_text_loss(scale * video_rows @ all_text.t(), positives)
        return ContrastiveOutput((loss_t2v + loss_v2t) / 2, loss_t2v, loss_v2t, scale.detach())

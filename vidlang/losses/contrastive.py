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
- total = (t2v + v2t) / 2 (``directions="mean"``), or their sum (``"sum"``, Mug-STAN).

The similarity is cosine of the pooled embeddings by default; a task may pass another one as a function of
*features* (a tensor or a tuple of tensors whose first dimension is the row: e.g. Mug-STAN's word tokens + mask
and frame embeddings), ``similarity(text_features, video_features) -> [A, B]``; the features are gathered
over ranks the same way. The logits are ``scale x similarity`` with ``scale = exp(logit_scale)`` (learnable), or
``1 / temperature`` for a fixed temperature.

Distributed (``gather=True`` and a process group is active): embeddings of all ranks are
gathered with gradients. ``local_loss=False``: every rank computes the full global loss;
``local_loss=True``: only local rows (local captions for t2v, local videos for v2t) against
all columns, as in open_clip, which costs O(local x global) instead of O(global^2). In both
cases the DDP-averaged gradient equals the single-process gradient of the global batch
(for ``local_loss`` when every rank holds the same number of videos and captions).

This loss is ``infonce`` in the registry :data:`LOSSES` of retrieval losses (``contrastive.loss`` of the retrieval
task); the other entries subclass it and replace :meth:`ContrastiveLoss.direction_losses` (the two directions from
the scaled logits) or add :meth:`ContrastiveLoss.extra_terms` (terms on the gathered normalised embeddings), so
they all share its gather, scale and similarity handling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.losses.distributed import all_gather_with_grad, gather_caption_index, is_distributed
from vidlang.registry import Registry

Features = Tensor | tuple[Tensor, ...]  # rows first: [N, ...] each
PairSimilarity = Callable[[Features, Features], Tensor]  # (text [A, ...], video [B, ...]) -> [A, B]
_NEG_FILL = -1.0e4  # stands for -inf in the masked log-sum-exp (finite: keeps gradients NaN-free)


@dataclass
class ContrastiveOutput:
    loss: Tensor  # scalar, (t2v + v2t) / 2 (+ the weighted extra terms)
    loss_t2v: Tensor  # scalar
    loss_v2t: Tensor  # scalar
    scale: Tensor  # scalar, the clamped exp(logit_scale) used
    extra: dict[str, Tensor] = field(default_factory=dict)  # name -> unweighted extra term (logged, in ``loss``)


@dataclass
class Gathered:
    """What :meth:`ContrastiveLoss.extra_terms` sees: the normalised embeddings of the whole (gathered) batch."""

    video: Tensor  # [B_all, E] L2-normalised
    text: Tensor  # [A_all, E] L2-normalised
    caption_index: Tensor  # [A_all] video of each caption, in [0, B_all)
    scale: Tensor  # scalar, the factor of the similarities of the main loss


LOSSES: Registry[type[ContrastiveLoss]] = Registry("retrieval loss")


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


def _gather_features(x: Features) -> Features:
    return tuple(all_gather_with_grad(t) for t in x) if isinstance(x, tuple) else all_gather_with_grad(x)


def _rows(x: Features) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[0]


def _cosine(text: Tensor, video: Tensor) -> Tensor:
    return text @ video.t()  # both already normalised


@LOSSES.register("infonce")
class ContrastiveLoss(nn.Module):
    """Symmetric multi-caption InfoNCE; owns the gather-with-grad collectives.

    ``temperature``: fixed (logits = similarity / temperature) instead of the learnable scale; ``directions``:
    ``mean`` or ``sum`` of the two directions (module docstring)."""

    needs_embeddings = False  # True: extra_terms reads the embeddings (only the cosine similarity has them)

    def __init__(self, gather: bool = True, local_loss: bool = False, max_scale: float = 100.0,
                 temperature: float | None = None, directions: str = "mean") -> None:
        super().__init__()
        if directions not in ("mean", "sum"):
            raise ValueError(f"directions must be 'mean' or 'sum', got {directions!r}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.gather = gather
        self.local_loss = local_loss
        self.max_scale = max_scale
        self.temperature = temperature
        self.directions = directions

    def forward(self, video: Features, text: Features, caption_index: Tensor, logit_scale: Tensor,
                similarity: PairSimilarity | None = None) -> ContrastiveOutput:
        """``video [B, E]``, ``text [A, E]`` (unnormalised), ``caption_index [A]`` in [0, B), ``logit_scale``
        scalar log-scale parameter. With ``similarity``, ``video`` / ``text`` are its features (module
        docstring) and it computes the similarities."""
        if similarity is None:
            _check_inputs(video, text, caption_index)
            with torch.autocast(video.device.type, enabled=False):  # similarities in fp32, also under bf16 autocast
                video = F.normalize(video.float(), dim=-1)
                text = F.normalize(text.float(), dim=-1)
                return self._forward(video, text, caption_index.long(), logit_scale.float(), _cosine)
        if caption_index.shape != (_rows(text),):
            raise ValueError(f"caption_index must be [A={_rows(text)}], got {tuple(caption_index.shape)}")
        if self.needs_embeddings:
            raise ValueError(f"{type(self).__name__} needs the embeddings (cosine similarity), not a similarity "
                             f"function")
        return self._forward(video, text, caption_index.long(), logit_scale.float(), similarity)

    def scale(self, logit_scale: Tensor) -> Tensor:
        """The factor of the similarities: ``1 / temperature`` or the clamped ``exp(logit_scale)``."""
        if self.temperature is not None:
            return logit_scale.new_tensor(1.0 / self.temperature)
        return clamped_scale(logit_scale, self.max_scale)

    def _forward(self, video: Features, text: Features, caption_index: Tensor, logit_scale: Tensor,
                 similarity: PairSimilarity) -> ContrastiveOutput:
        scale = self.scale(logit_scale)
        num_local_videos = _rows(video)
        device = caption_index.device
        if self.gather and is_distributed():
            all_video = _gather_features(video)  # [B_all, ...]
            all_text = _gather_features(text)  # [A_all, ...]
            all_index, offset = gather_caption_index(caption_index, num_local_videos)  # [A_all]
        else:
            all_video, all_text, all_index, offset = video, text, caption_index, 0
        if self.local_loss:
            text_rows, text_targets = text, caption_index + offset
            video_rows = video
            video_ids = torch.arange(num_local_videos, device=device) + offset  # [B]
            t2v = similarity(text_rows, all_video)  # [A, B_all]
            v2t = similarity(all_text, video_rows).t()  # [B, A_all]
        else:
            text_targets = all_index
            video_ids = torch.arange(_rows(all_video), device=device)
            t2v = similarity(all_text, all_video)  # [A_all, B_all]
            v2t = t2v.t()
        positives = video_ids[:, None] == all_index[None, :]  # [B_rows, A_all]
        loss_t2v, loss_v2t = self.direction_losses(scale * t2v, text_targets, scale * v2t, positives)
        total = loss_t2v + loss_v2t
        total = total / 2 if self.directions == "mean" else total
        extra: dict[str, Tensor] = {}
        if similarity is _cosine:
            extra = self.extra_terms(Gathered(all_video, all_text, all_index, scale))
            for name, value in extra.items():
                total = total + self.extra_weight(name) * value
        return ContrastiveOutput(total, loss_t2v, loss_v2t, scale.detach(), extra)

    def direction_losses(self, t2v: Tensor, text_targets: Tensor, v2t: Tensor, positives: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """``(text->video, video->text)`` losses from the scaled logits: ``t2v [A_rows, B_all]`` with each row's
        video column ``text_targets [A_rows]``; ``v2t [B_rows, A_all]`` with ``positives [B_rows, A_all]``."""
        return text_to_video_loss(t2v, text_targets), video_to_text_loss(v2t, positives)

    def extra_terms(self, batch: Gathered) -> dict[str, Tensor]:
        """Additional unweighted loss terms on the gathered normalised embeddings (cosine similarity only);
        each rank computes them over the whole batch, so the DDP-averaged gradient is that of the global batch."""
        return {}

    def extra_weight(self, name: str) -> float:
        """The weight of the extra term ``name`` in the total."""
        return 1.0

"""The frame mask of short clips (CLIP4Clip's ``video_mask``), as blocks read it and tasks hand it over.

With ``data.sampling.short_video: mask`` a clip whose span holds fewer frames than ``T`` keeps each frame once,
first, and pads the remaining slots; the collated batch then carries ``video_mask`` bool ``[B, T]`` (True = real
frame, always a prefix). A task passes it to the model as ``encode_video(video, state=video_mask_state(block,
mask))``; it reaches the hooks and ``pool`` as ``ctx.state[VIDEO_MASK_KEY]``. Blocks that declare
``uses_video_mask`` read it with :func:`video_mask_of` and pool with :func:`masked_mean`; for the others
:func:`video_mask_state` refuses a mask with padding (their mixing over frames would see the padded slots).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.models.contract import VIDEO_MASK_KEY, HookContext, TemporalBlock


def check_video_mask(mask: Tensor, batch: int | None = None, frames: int | None = None) -> Tensor:
    """``mask`` as bool ``[B, T]`` after checking it: the shape (when given), a real-frame prefix in every row."""
    if mask.ndim != 2:
        raise ValueError(f"video_mask must be [B, T], got shape {tuple(mask.shape)}")
    if (batch is not None and mask.shape[0] != batch) or (frames is not None and mask.shape[1] != frames):
        raise ValueError(f"video_mask has shape {tuple(mask.shape)} but the clips are [B={batch}, T={frames}]")
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("video_mask: every clip needs at least one real frame")
    prefix = torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("video_mask: the real frames of each clip must come first (a prefix of True)")
    return mask


def video_mask_of(ctx: HookContext, batch: int, frames: int) -> Tensor | None:
    """The checked bool mask ``[B, T]`` in ``ctx.state`` (None: no mask, or no padded slot in it)."""
    mask = ctx.state.get(VIDEO_MASK_KEY)
    if mask is None:
        return None
    mask = check_video_mask(mask, batch, frames)
    return None if bool(mask.all()) else mask


def prefix_lengths(mask: Tensor | None, batch: int, frames: int, device: torch.device | None = None) -> Tensor:
    """Real frames per clip ``[B]`` (int64): the mask's row sums, ``T`` everywhere without a mask."""
    if mask is None:
        return torch.full((batch,), frames, dtype=torch.long, device=device)
    return mask.long().sum(dim=1)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x [B, T, E]`` over the real frames of ``mask [B, T]`` (all frames if None) -> ``[B, E]``."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype)[..., None]  # [B, T, 1]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def video_mask_state(
    block: TemporalBlock, video_mask: Tensor | None, state: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The hook state for ``encode_video`` carrying ``video_mask [B, T]`` (``state`` merged in; None if both
    are None). A mask with padded slots is refused (:class:`ConfigError`) for a block that ignores it."""
    if video_mask is None:
        return state
    mask = check_video_mask(video_mask)
    if not bool(mask.all()) and not block.uses_video_mask:
        raise ConfigError(
            f"temporal block {type(block).__name__} does not honour a video mask (short clips padded with "
            "data.sampling.short_video: mask); use short_video: repeat, or a block that pools with the mask "
            "(mean, seq_transformer, seq_lstm)"
        )
    return {**(state or {}), VIDEO_MASK_KEY: mask}


__all__ = ["check_video_mask", "masked_mean", "prefix_lengths", "video_mask_of", "video_mask_state"]

"""``mean`` (ViFi-CLIP; CLIP4Clip's meanP): no new parameters; the video embedding is the mean of the frame
embeddings (over the real frames only when the clip carries a video mask, :mod:`.video_mask`).

Deviation from CLIP4Clip's meanP: it L2-normalises each frame before the mean; this block averages the raw
frame embeddings (ViFi-CLIP's form).
"""

from __future__ import annotations

from torch import Tensor

from vidlang.models.contract import HookContext, TemporalBlock, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.video_mask import masked_mean, video_mask_of


@BLOCKS.register("mean")
class MeanPool(TemporalBlock):
    """ViFi-CLIP: frames through CLIP, projected CLS ``[B, T, E]`` averaged over T. Both towers fine-tuned."""

    freeze_backbone = False
    uses_video_mask = True

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        mask = video_mask_of(ctx, *frame_embeds.shape[:2])  # [B, T] or None
        return VideoOutput(embeds=masked_mean(frame_embeds, mask), frame_embeds=frame_embeds)  # [B, E]

"""``mean`` (ViFi-CLIP): no new parameters; the video embedding is the mean of the frame embeddings."""

from __future__ import annotations

from torch import Tensor

from vidlang.models.contract import HookContext, TemporalBlock, VideoOutput
from vidlang.models.temporal.base import BLOCKS


@BLOCKS.register("mean")
class MeanPool(TemporalBlock):
    """ViFi-CLIP: frames through CLIP, projected CLS ``[B, T, E]`` averaged over T. Both towers fine-tuned."""

    freeze_backbone = False

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        return VideoOutput(embeds=frame_embeds.mean(dim=1), frame_embeds=frame_embeds)  # [B, E]

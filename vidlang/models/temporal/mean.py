"""``mean`` (ViFi-CLIP; CLIP4Clip's meanP): no new parameters; the video embedding is the mean of the frame
embeddings (over the real frames only when the clip carries a video mask, :mod:`.video_mask`).

``normalize_frames`` (default False, ViFi-CLIP's form): True L2-normalises each frame before the mean, as
CLIP4Clip's meanP does (the form ``vidlang convert --from clip4clip`` records for a meanP checkpoint).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.video_mask import masked_mean, video_mask_of


@BLOCKS.register("mean")
class MeanPool(TemporalBlock):
    """ViFi-CLIP: frames through CLIP, projected CLS ``[B, T, E]`` averaged over T. Both towers fine-tuned."""

    freeze_backbone = False
    uses_video_mask = True

    def __init__(self, spec: TowerSpec, normalize_frames: bool = False) -> None:
        super().__init__(spec)
        self.normalize_frames = normalize_frames

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        mask = video_mask_of(ctx, *frame_embeds.shape[:2])  # [B, T] or None
        x = F.normalize(frame_embeds, dim=-1) if self.normalize_frames else frame_embeds
        return VideoOutput(embeds=masked_mean(x, mask), frame_embeds=frame_embeds)  # [B, E]

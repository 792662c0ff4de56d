"""``seq_transformer`` (CLIP4Clip "seqTransf"): a small transformer over the frame embeddings.

frame embeds ``[B, T, E]`` + learnable frame position embedding -> ``layers`` pre-LN CLIP layers
(heads ``E // 64``) -> residual add to the input frame embeds -> (per-frame L2 normalisation, as
CLIP4Clip does before its mean) -> mean over T.

Short clips with a video mask (``ctx.state["video_mask"]``, :mod:`.video_mask`): the padded slots are masked
out as attention keys and left out of the mean, so a padded short clip embeds exactly as the short clip alone
(its real frames keep positions ``0..n-1``), as CLIP4Clip's masked attention and masked mean do.

Like CLIP4Clip, :meth:`init_from_tower` copies the text tower's positional embedding (first
``max_frames`` rows) and its first ``layers`` layers (as many as it has) into the block when the shapes match
(CLIP text width == E for OpenAI CLIP). Nothing is zero-initialised, so the block is *not* the
identity at init (``zero_init_identity = False``), faithful to CLIP4Clip.

Deviations from CLIP4Clip: LayerNorm eps 1e-5 (CLIP's) where its cross-module layers use 1e-12; a key mask
instead of its additive -1e6 (the same attention weights, exactly zero on padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.clip.layers import LegacyLayerKeys, ResidualAttentionLayer, init_transformer_
from vidlang.models.contract import HookContext, ImageTowerView, TemporalBlock, TextTowerView, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.video_mask import masked_mean, video_mask_of


@BLOCKS.register("seq_transformer")
class SeqTransformer(LegacyLayerKeys, TemporalBlock):
    freeze_backbone = False
    uses_video_mask = True

    def __init__(
        self,
        spec: TowerSpec,
        layers: int = 4,
        heads: int | None = None,
        max_frames: int = 32,
        act: str = "quick_gelu",
        normalize_frames: bool = True,
        init_from_text: bool = True,
    ) -> None:
        super().__init__(spec)
        e = spec.embed_dim
        self.max_frames = max_frames
        self.normalize_frames = normalize_frames
        self.init_from_text = init_from_text
        self.frame_position_embedding = nn.Parameter(torch.empty(max_frames, e))  # [T_max, E]
        nn.init.normal_(self.frame_position_embedding, std=0.01)
        self.layers = nn.ModuleList(
            ResidualAttentionLayer(e, heads or max(1, e // 64), 4 * e, act) for _ in range(layers)
        )
        init_transformer_(self.layers, e)

    def init_from_tower(self, image_tower: ImageTowerView, text_tower: TextTowerView | None) -> None:
        """CLIP4Clip's initialisation from the CLIP text transformer, when its shapes match."""
        if not self.init_from_text or text_tower is None:
            return
        tpe = text_tower.positional_embedding  # [ctx, W]
        if tpe.shape[1] != self.spec.embed_dim:
            return
        pairs = list(zip(text_tower.layer_list(), self.layers, strict=False))  # the first min(L_text, L) layers
        if any(s.attn.heads != d.attn.heads or s.mlp.fc1.out_features != d.mlp.fc1.out_features for s, d in pairs):
            return
        with torch.no_grad():
            rows = min(self.max_frames, tpe.shape[0])
            self.frame_position_embedding[:rows].copy_(tpe[:rows])
            for src, dst in pairs:
                dst.load_state_dict(src.state_dict())

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        t = frame_embeds.shape[1]
        if t > self.max_frames:
            raise ValueError(f"seq_transformer got {t} frames but max_frames={self.max_frames}; raise max_frames")
        mask = video_mask_of(ctx, frame_embeds.shape[0], t)  # [B, T] or None
        keys = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T]: padded frames are no keys
        x = frame_embeds + self.frame_position_embedding[:t].to(frame_embeds.dtype)  # [B, T, E]
        for blk in self.layers:
            x = blk(x, attn_mask=keys)
        x = x + frame_embeds  # residual to the input frame embeddings
        if self.normalize_frames:
            x = F.normalize(x, dim=-1)
        return VideoOutput(embeds=masked_mean(x, mask), frame_embeds=x)

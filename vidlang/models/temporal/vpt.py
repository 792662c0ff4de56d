"""``vpt``: deep vision and text prompts (ViFi-CLIP's "bridge and prompt"), backbone frozen.

Vision: ``n_vision`` learned tokens are appended after CLS + patches at the ``embed`` hook (before
``ln_pre``), replaced by fresh per-layer tokens before layers ``1 .. depth-1`` and removed after
the last layer, so pooling sees the original ``1+N`` tokens.

Text: ``n_text`` learned context vectors are *inserted* after SOT at ``text_embed`` (the caption's
words keep their own tokens and position embeddings, and the attention mask grows by ``n_text``),
replaced per layer before layers ``1 .. text_depth-1`` and removed after the last layer. CoOp-style
code instead tokenizes ``n`` placeholder words ("X X X ... caption") and overwrites their embeddings
at positions ``1..n``; inserting gives the same sequence layout without a special tokenizer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec
from vidlang.models.temporal.base import BLOCKS


def _prompts(depth: int, n: int, width: int) -> nn.Parameter | None:
    if n <= 0 or depth <= 0:
        return None
    p = nn.Parameter(torch.empty(depth, n, width))  # [depth, n, C]
    nn.init.normal_(p, std=0.02)
    return p


@BLOCKS.register("vpt")
class DeepPrompts(TemporalBlock):
    freeze_backbone = True

    def __init__(
        self,
        spec: TowerSpec,
        n_vision: int = 10,
        n_text: int = 10,
        depth: int | None = None,
        text_depth: int | None = None,
    ) -> None:
        super().__init__(spec)
        depth = min(12, spec.layers) if depth is None else depth
        text_depth = min(12, spec.text_layers) if text_depth is None else text_depth
        if not 0 <= depth <= spec.layers or not 0 <= text_depth <= spec.text_layers:
            raise ValueError(
                f"vpt depth {depth}/{text_depth} exceeds the towers' {spec.layers}/{spec.text_layers} layers"
            )
        self.n_vision, self.n_text = n_vision, n_text
        self.vision_prompts = _prompts(depth, n_vision, spec.width)  # [depth, n_vision, C]
        self.text_prompts = _prompts(text_depth, n_text, spec.text_width)  # [text_depth, n_text, W]

    @property
    def appends_image_tokens(self) -> bool:
        return self.vision_prompts is not None

    # -- vision --------------------------------------------------------------------------------------
    def embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None:
            return x
        p = self.vision_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=1)  # [B*T, 1+N+n, C]

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None or not 0 < i < self.vision_prompts.shape[0]:
            return x
        p = self.vision_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : -self.n_vision], p], dim=1)

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None or i != self.spec.layers - 1:
            return x
        return x[:, : -self.n_vision]  # [B*T, 1+N, C]

    # -- text ------------------------------------------------------------------------------------------
    def text_embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None:
            return x
        p = self.text_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        if ctx.attention_mask is not None:
            m = ctx.attention_mask
            ones = torch.ones(m.shape[0], self.n_text, dtype=m.dtype, device=m.device)
            ctx.attention_mask = torch.cat([m[:, :1], ones, m[:, 1:]], dim=1)  # [A, Lt+n]
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)  # [A, Lt+n, W]

    def text_before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None or not 0 < i < self.text_prompts.shape[0]:
            return x
        p = self.text_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], p, x[:, 1 + self.n_text :]], dim=1)

    def text_after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None or i != self.spec.text_layers - 1:
            return x
        return torch.cat([x[:, :1], x[:, 1 + self.n_text :]], dim=1)  # [A, Lt, W]

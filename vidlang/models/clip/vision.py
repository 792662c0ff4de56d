"""The CLIP ViT image tower with the hook points of the temporal-block contract.

Frames ``[B, T, 3, H, W]`` run as ``[B*T, ...]``; the tower builds a :class:`HookContext`
(it knows B and T) and calls only the hooks the block implements, at the points documented
in :mod:`vidlang.models.temporal.base`::

    conv1 -> + class/position embedding -> embed -> ln_pre
    for i: before_layer(i) -> x + attn(attn_input(i, ln_1(x))) -> before_mlp(i) -> x + mlp(ln_2(x)) -> after_layer(i)
    ln_post (all tokens) -> CLS @ proj

``frame_tokens`` are the last-layer tokens (after the block's ``after_layer``) with ``ln_post``
applied to *all* tokens, so patch tokens live in the same normalised space as the CLS token that
gets projected (what Q-former / chat consumers expect). ``frame_embeds = ln_post(CLS) @ proj``.

With gradient checkpointing each layer *including its hooks* is one checkpointed unit, so the
hooks run again during backward: they must be functions of their inputs and parameters (a hook that
writes ``ctx.aux_losses`` simply writes the same value again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vidlang.models.clip.configs import VisionConfig
from vidlang.models.clip.layers import LayerNorm, ResidualAttentionBlock, init_transformer_, resample_pos_embed
from vidlang.models.temporal.base import HookContext, TemporalBlock


@dataclass
class VisionOutput:
    frame_tokens: Tensor  # [B, T, 1+N, C] last-layer tokens after ln_post
    frame_embeds: Tensor  # [B, T, E] ln_post(CLS) @ proj
    ctx: HookContext  # the context the hooks saw (aux losses, state)


class VisionTower(nn.Module):
    """CLIP ViT: ``conv1, class_embedding, positional_embedding, ln_pre, blocks, ln_post, proj``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.grid = cfg.grid
        self.conv1 = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = c**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(c))  # [C]
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid[0] * self.grid[1], c))
        self.ln_pre = LayerNorm(c)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(c, cfg.heads, cfg.mlp_hidden, cfg.act) for _ in range(cfg.layers)
        )
        self.ln_post = LayerNorm(c)
        self.proj = nn.Parameter(scale * torch.randn(c, cfg.embed_dim))  # [C, E]
        self.gradient_checkpointing = False
        init_transformer_(self.blocks, c)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def patch_embed(self, frames: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[N, 3, H, W]`` -> tokens ``[N, 1+N_p, C]`` with class and position embedding, and the grid."""
        x = self.conv1(frames.to(self.conv1.weight.dtype))  # [N, C, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [N, gh*gw, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pe = self.positional_embedding
        if grid != self.grid:
            pe = resample_pos_embed(pe, grid, self.grid)
        return torch.cat([cls, x], dim=1) + pe.to(x.dtype), grid

    def forward(
        self,
        video: Tensor,
        block: TemporalBlock | None = None,
        hooks: frozenset[str] | None = None,
        state: dict | None = None,
    ) -> VisionOutput:
        """``video [B, T, 3, H, W]`` (normalised float) -> :class:`VisionOutput`.

        ``hooks`` is ``block.implemented_hooks()``, computed once by the caller (computed here if None).
        ``state`` seeds the per-call ``HookContext.state``.
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"VisionTower expects video [B, T, 3, H, W], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        if hooks is None:
            hooks = block.implemented_hooks() if block is not None else frozenset()
        x, grid = self.patch_embed(video.flatten(0, 1))  # [B*T, 1+N, C]
        ctx = HookContext(batch=b, frames=t, grid=grid, training=self.training, state=dict(state or {}))
        n_tokens = x.shape[1]
        if "embed" in hooks:
            x = block.embed(x, ctx)
        x = self.ln_pre(x)
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i in range(len(self.blocks)):
            if use_ckpt:
                x = checkpoint(self._layer, i, x, block, hooks, ctx, use_reentrant=False)
            else:
                x = self._layer(i, x, block, hooks, ctx)
        if x.shape[1] != n_tokens:
            raise RuntimeError(
                f"temporal block {type(block).__name__} left {x.shape[1]} tokens after the last layer; "
                f"it must remove the tokens it appended (expected {n_tokens})"
            )
        x = self.ln_post(x)  # [B*T, 1+N, C]
        embeds = x[:, 0] @ self.proj  # [B*T, E]
        return VisionOutput(
            frame_tokens=x.view(b, t, n_tokens, -1), frame_embeds=embeds.view(b, t, -1), ctx=ctx
        )

    def _layer(self, i: int, x: Tensor, block: TemporalBlock | None, hooks: frozenset[str], ctx: HookContext) -> Tensor:
        """One transformer layer with its hooks (the unit of gradient checkpointing)."""
        if "before_layer" in hooks:
            x = block.before_layer(i, x, ctx)
        attn_input = (lambda h: block.attn_input(i, h, ctx)) if "attn_input" in hooks else None
        before_mlp = (lambda r: block.before_mlp(i, r, ctx)) if "before_mlp" in hooks else None
        x = self.blocks[i](x, attn_input=attn_input, before_mlp=before_mlp)
        if "after_layer" in hooks:
            x = block.after_layer(i, x, ctx)
        return x


__all__ = ["VisionOutput", "VisionTower", "resample_pos_embed"]

"""The CLIP ViT image tower with the hook points of the temporal-block contract.

Frames ``[B, T, 3, H, W]`` run as ``[B*T, ...]``; the tower builds a :class:`HookContext`
(it knows B and T) and calls only the hooks the block implements, at the points documented
in :mod:`vidlang.models.contract`::

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

import torch
from torch import Tensor, nn

from vidlang.models.clip.configs import ImageConfig
from vidlang.models.clip.layers import (
    LayerNorm,
    LegacyLayerKeys,
    ResidualAttentionLayer,
    init_transformer_,
    resample_pos_embed,
)
from vidlang.models.clip.tower_base import ImageTower, Transform


class ClipImageTower(LegacyLayerKeys, ImageTower):
    """CLIP ViT: ``conv1, class_embedding, positional_embedding, ln_pre, layers, ln_post, proj``.

    Forward and hooks: :class:`~vidlang.models.clip.tower_base.ImageTower`.
    """

    kind = "clip"

    def __init__(self, cfg: ImageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.grid = cfg.grid
        self.conv1 = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = c**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(c))  # [C]
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid[0] * self.grid[1], c))
        self.ln_pre = LayerNorm(c)
        self.layers = nn.ModuleList(
            ResidualAttentionLayer(c, cfg.heads, cfg.mlp_hidden, cfg.act) for _ in range(cfg.layers)
        )
        self.ln_post = LayerNorm(c)
        self.proj = nn.Parameter(scale * torch.randn(c, cfg.embed_dim))  # [C, E]
        init_transformer_(self.layers, c)

    def patch_embed(self, frames: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[N, 3, H, W]`` -> tokens ``[N, 1+N_p, C]`` with class and position embedding, and the grid."""
        x = self.conv1(frames.to(self.conv1.weight.dtype))  # [N, C, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [N, gh*gw, C]
        class_embedding, pe = self.class_position_embedding(grid)
        cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + pe.to(x.dtype), grid

    def class_position_embedding(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``class_embedding [C]`` and ``positional_embedding [1+N, C]`` (bicubic-resampled to ``grid``)."""
        pe = self.positional_embedding
        if tuple(grid) != tuple(self.grid):
            pe = resample_pos_embed(pe, grid, self.grid)
        return self.class_embedding, pe

    def layer_list(self) -> nn.ModuleList:
        return self.layers

    def embed_frames(self, frames: Tensor) -> tuple[Tensor, None, tuple[int, int]]:
        x, grid = self.patch_embed(frames)
        return x, None, grid

    def pre_norm(self, x: Tensor) -> Tensor:
        return self.ln_pre(x)

    def run_layer(self, i: int, x: Tensor, attn_input: Transform, before_mlp: Transform, rope: None) -> Tensor:
        return self.layers[i](x, attn_input=attn_input, before_mlp=before_mlp)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.ln_post(x)

    def project(self, x: Tensor) -> Tensor:
        return x[:, 0] @ self.proj  # ln_post(CLS) @ proj


__all__ = ["ClipImageTower"]

"""Transformer layers shared by the CLIP towers (and by temporal blocks that reuse CLIP layers).

Parameter names follow vidlang's native layout (OpenAI-like, fused ``qkv``)::

    ResidualAttentionLayer: ln_1, attn.qkv, attn.out_proj, ln_2, mlp.fc1, mlp.fc2

Attention always goes through :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.registry import Registry

LN_EPS = 1e-5

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")


@ACTIVATIONS.register("quick_gelu")
class QuickGELU(nn.Module):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # inference: one allocation instead of three, the same operations in the same order (equal results)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


ACTIVATIONS.register("gelu")(nn.GELU)


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) computed in fp32 and cast back, as OpenAI CLIP does for fp16 inputs."""

    def __init__(self, width: int, eps: float = LN_EPS) -> None:
        super().__init__(width, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and self.weight.dtype == torch.float32:
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        n, length, width = x.shape  # x: [N, L, C]
        qkv = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS.build(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


Transform = Callable[[Tensor], Tensor]


class ResidualAttentionLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    ``attn_input`` transforms only the normed attention input (not the residual stream);
    ``before_mlp`` transforms the residual stream between attention and MLP.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int | None = None, act: str = "quick_gelu") -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = Mlp(width, mlp_dim or 4 * width, act)

    def forward(
        self,
        x: Tensor,  # [N, L, C]
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        attn_input: Transform | None = None,
        before_mlp: Transform | None = None,
    ) -> Tensor:
        h = self.ln_1(x)
        if attn_input is not None:
            h = attn_input(h)
        x = residual_add(x, self.attn(h, attn_mask=attn_mask, is_causal=is_causal))
        if before_mlp is not None:
            x = before_mlp(x)
        return residual_add(x, self.mlp(self.ln_2(x)))


def residual_add(x: Tensor, update: Tensor) -> Tensor:
    """``x + update``, written into ``update`` when that is safe: ``update`` is the fresh output of a Linear
    (whose backward does not need it) of the same dtype and shape. Bit-identical to ``x + update`` (IEEE addition
    commutes) and saves a ``[N, L, C]`` allocation per residual (two per layer)."""
    if update.dtype == x.dtype and update.shape == x.shape and update.is_contiguous():
        return update.add_(x)
    return x + update


LEGACY_LAYERS = "blocks."  # what ``layers`` were called in state dicts written before the rename


def rename_legacy_layer_keys(state_dict: MutableMapping[str, Any], prefix: str = "") -> None:
    """In place: ``{prefix}blocks.*`` -> ``{prefix}layers.*`` (state dicts from before transformer layers were
    renamed from ``blocks`` to ``layers``; "block" now means only the temporal block)."""
    old = prefix + LEGACY_LAYERS
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "layers." + key[len(old) :]] = state_dict.pop(key)


class LegacyLayerKeys(nn.Module):
    """Mixin for modules with a ``layers`` list that used to be called ``blocks``: ``load_state_dict`` accepts
    checkpoints with either name (put it first among the bases)."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        rename_legacy_layer_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def init_transformer_(layers: nn.ModuleList, width: int) -> None:
    """OpenAI CLIP's initialisation of a stack of :class:`ResidualAttentionLayer`."""
    depth = max(len(layers), 1)
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for layer in layers:
        nn.init.normal_(layer.attn.qkv.weight, std=attn_std)
        nn.init.zeros_(layer.attn.qkv.bias)
        nn.init.normal_(layer.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(layer.attn.out_proj.bias)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)


def resample_pos_embed(pe: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> Tensor:
    """Resample a spatial position embedding ``[1+N, C]`` (CLS first) to ``new_grid`` -> ``[1+N', C]``.

    Bicubic interpolation on the patch grid (``align_corners=False``: patch centres keep their
    relative positions); the CLS row is kept. ``old_grid`` defaults to the square root of N.
    """
    if pe.ndim != 2:
        raise ValueError(f"expected a position embedding [1+N, C], got shape {tuple(pe.shape)}")
    n = pe.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"position embedding has {n} patch rows, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not match {n} patch rows")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pe
    cls, grid = pe[:1], pe[1:]
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2).float()  # [1, C, h, w]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pe.dtype)
    return torch.cat([cls, grid], dim=0)


def resample_temporal_embed(pos: Tensor, num_frames: int, dim: int = -2) -> Tensor:
    """Linearly resample a frame position embedding along ``dim`` (``[T, D]`` or ``[1, T, D]``) to ``num_frames``.

    ``align_corners=True``: the first and last frame embeddings are kept exactly.
    """
    dim = dim % pos.dim()
    t = pos.shape[dim]
    if t == num_frames:
        return pos
    x = pos.movedim(dim, -1)  # [..., T]
    flat = x.reshape(1, -1, t).float()
    if t == 1:
        res = flat.expand(1, flat.shape[1], num_frames)
    else:
        res = F.interpolate(flat, size=num_frames, mode="linear", align_corners=True)
    return res.reshape(*x.shape[:-1], num_frames).movedim(-1, dim).to(pos.dtype).contiguous()

"""X-CLIP's video-specific prompt generator and its visual tokens, shared by the ``xclip`` and ``ila`` blocks.

Visual tokens: the last image layer's patch tokens (before ``ln_post``, ``[B*T, N, C]``, kept in ``ctx.state`` under
:data:`PATCHES_KEY` by :func:`keep_last_patches`) -> a LayerNorm -> ``@ proj [C, E]`` -> mean over the frames
(:func:`visual_prompt_tokens`, ``[B, N, E]``, the blocks' ``VideoOutput.tokens``).

Generator (:class:`VideoPromptGenerator`, official ``models/prompt.py`` ``VideoSpecificPrompt``): ``LN(tokens)`` is
the memory of ``layers`` layers ``x = x + CrossAttn(LN(x), memory)``, ``x = x + MLP(LN(x))``; the output times
``alpha`` (a learnable ``[E]`` vector) is added to the class feature (:func:`condition_on_video`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vidlang.models.clip.layers import QuickGELU
from vidlang.models.contract import HookContext

PATCHES_KEY = "video_prompt_patches"  # ctx.state: last-layer tokens without CLS [B*T, N, C], before ln_post


def trunc_normal_init(module: nn.Module) -> None:
    """The official ``_init_weights``: Linear weights truncated N(0, 0.02) with zero biases; LayerNorms 1 / 0."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (recursively) into a persistent buffer of the same name: saved, loaded,
    moved and cast with the module, never trainable whatever freeze policy runs later, never in an optimizer
    (gradients still flow *through* it to its inputs). Returns ``module``."""
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            delattr(mod, name)
            mod.register_buffer(name, p.detach())
    return module


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, K, E]`` over a memory ``[B, M, E]``; q/k/v without bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"video prompts: generator width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        b, k, e = query.shape
        d = e // self.heads

        def split(x: Tensor) -> Tensor:  # [B, L, E] -> [B, H, L, D]
            return x.view(b, x.shape[1], self.heads, d).transpose(1, 2)

        q, key, v = split(self.q(query)), split(self.k(memory)), split(self.v(memory))
        attn = (q @ key.transpose(-2, -1) * d**-0.5).softmax(dim=-1)  # [B, H, K, M]
        return self.out((attn @ v).transpose(1, 2).reshape(b, k, e))


class PromptLayer(nn.Module):
    """``x = x + CrossAttn(LN(x), memory)``; ``x = x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.attn_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), QuickGELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = x + self.attn_drop(self.cross_attn(self.norm1(x), memory))
        return x + self.mlp(self.norm2(x))


class VideoPromptGenerator(nn.Module):
    """X-CLIP's video-specific prompt generator: ``text [B, K, E]``, ``visual [B, N, E]`` -> ``alpha * layers``."""

    def __init__(self, dim: int, layers: int = 2, alpha: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"video prompts: prompt_layers must be >= 1, got {layers}")
        heads = max(1, dim // 64)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(PromptLayer(dim, heads, dropout) for _ in range(layers))
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha)))  # [E]
        trunc_normal_init(self)

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        memory = self.norm(visual)
        for layer in self.layers:
            text = layer(text, memory)
        return self.alpha * text


def keep_last_patches(i: int, x: Tensor, ctx: HookContext, layers: int) -> None:
    """In ``after_layer``: keep the last layer's patch tokens ``x[:, 1:]`` ``[B*T, N, C]`` for the visual tokens."""
    if i == layers - 1:
        ctx.state[PATCHES_KEY] = x[:, 1:]


def visual_prompt_tokens(ctx: HookContext, ln: nn.Module, proj: Tensor) -> Tensor:
    """The kept patch tokens -> ``ln`` -> ``@ proj [C, E]`` -> mean over the frames ``[B, N, E]``."""
    patches = ctx.state[PATCHES_KEY]  # [B*T, N, C]
    visual = ln(patches) @ proj.to(patches.dtype)  # [B*T, N, E]
    return visual.reshape(ctx.batch, ctx.frames, -1, visual.shape[-1]).mean(dim=1)


def condition_on_video(generator: VideoPromptGenerator, text: Tensor, tokens: Tensor | None, who: str) -> Tensor:
    """``text [K, E]`` (unnormalised class features), the video's visual ``tokens [B, N, E]`` -> ``[B, K, E]``:
    ``text + generator(text, tokens)``. ``who`` names the block in the error for missing tokens."""
    if tokens is None:
        raise ValueError(f"{who}: condition_text needs the video's tokens (VideoOutput.tokens of this block)")
    tokens = tokens.to(text.dtype)
    per_video = text.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, K, E]
    return per_video + generator(per_video, tokens)

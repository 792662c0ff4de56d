"""``xclip`` (X-CLIP, Ni et al., ECCV 2022): cross-frame messages, multi-frame integration, video-specific prompts.

Official code: ``microsoft/VideoX``, folder ``X-CLIP`` (``models/cct.py``, ``mit.py``, ``prompt.py``, ``xclip.py``,
``utils/optimizer.py``; read at commit 1744b21).

Cross-frame communication (CCT), in every image layer ``i`` (``before_layer`` / ``before_mlp``):

- a message token per frame from the frame's CLS of the residual stream entering the layer (layer 0: after
  ``ln_pre``): ``m = message_fc(cls)`` ``[B, T, C]``;
- the messages of one video exchange information: ``m = m + MHA(LN(m))`` over the T frames (``message_ln``,
  ``message_attn``, ``nn.MultiheadAttention`` with the tower's heads);
- frame ``t``'s message is appended to its tokens for the layer's attention (it passes ``ln_1`` and is attended to
  by CLS and patches) and removed before the MLP: the layer's MLP and everything after see the original ``1+N``.

Multi-frame integration transformer (MIT, ``pool``): the projected frame CLS ``[B, T, E]`` + a learnable frame
position embedding -> ``mit_layers`` pre-LN layers (``E // 64`` heads, QuickGELU) -> + the input -> mean over T
(:class:`vidlang.models.temporal.ila.MultiframeIntegration`, the same module ILA borrows from X-CLIP).

Video-specific prompt generator (the text side, :meth:`XCLIP.condition_text`): the visual tokens are the
last-layer patch tokens (before ``ln_post``) -> own LayerNorm -> ``@ visual_proj [C, E]``, averaged over the frames
(``VideoOutput.tokens [B, N, E]``). For class features ``text [K, E]`` (the text tower's unnormalised projected EOT
features, plain class names in X-CLIP: ``templates: ["{}"]``): ``LN(tokens)`` is the memory of ``prompt_layers`` (2)
layers ``x = x + CrossAttn(LN(x), memory)``, ``x = x + MLP(LN(x))`` (heads ``E // 64``, q/k/v without bias, MLP 4E
QuickGELU); the result times ``alpha`` (a learnable ``[E]`` vector, init 0.1) is *added* to the class feature:
``text_b = text + alpha * layers(text)`` ``[B, K, E]`` (the layers' output includes their input, so at init the
class feature is scaled by about 1.1 plus a small video-dependent term). The recognition task normalises ``text_b``
and the video embedding and takes ``exp(logit_scale) * <v_b, text_b_k>``.

Initialisation (official): the message modules have PyTorch's defaults (the official ``init_weights`` of the vision
transformer is never called); MIT: position embedding and Linear weights truncated N(0, 0.02), zero biases, the
fused qkv Xavier-uniform; prompt generator: Linear weights truncated N(0, 0.02), zero biases, LayerNorms 1 / 0,
``alpha = 0.1``; ``visual_ln`` 1 / 0, ``visual_proj ~ N(0, 1)`` (``torch.randn``, as the code). Nothing starts as
the identity: ``zero_init_identity = False``.

Recipe (``utils/optimizer.py``): every new module (``message_*``, ``mit``, ``prompts*``) at 10x the base lr
(``lr_mults = {"": 10}``); the text tower and ``logit_scale`` frozen (``MODEL.FIX_TEXT`` True, the default of
every released config): freeze policy ``frozen_text`` (``ModelConfig.freeze``; ``auto`` trains everything).

Deviations from the official code:

- No drop path (the official ``DROP_PATH_RATE`` is 0 in every released config; vidlang's towers have none).
- The MIT position table is ``[max_frames, E]`` of which the first T rows are used (the code's is ``[1, T, E]``,
  fixed to the training T); rows are i.i.d. at init, the same model for T frames.
- Parameter names differ (``messages.{i}.fc`` for ``visual.transformer.resblocks.{i}.message_fc``, ``generator``
  for ``prompts_generator``, ...): ``vidlang convert --from xclip`` maps an official checkpoint.
- Several prompt templates (X-CLIP uses one, ``"{}"``): the class feature is the mean of the unnormalised template
  features (the generator needs the raw feature).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vidlang.models.clip.layers import LayerNorm, QuickGELU
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.ila import MultiframeIntegration

PATCHES_KEY = "xclip_patches"  # ctx.state: last-layer tokens without CLS [B*T, N, C], before ln_post


def _trunc_normal_init(module: nn.Module) -> None:
    """The official ``_init_weights``: Linear weights truncated N(0, 0.02) with zero biases; LayerNorms 1 / 0."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


class CrossFrameMessage(nn.Module):
    """One layer's message tokens: ``cls [B, T, C]`` -> ``fc`` -> ``+ MHA(LN(.))`` over T -> ``[B, T, C]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.ln = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, cls: Tensor) -> Tensor:
        m = self.fc(cls)
        h = self.ln(m)
        return m + self.attn(h, h, h, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, K, E]`` over a memory ``[B, M, E]``; q/k/v without bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"xclip: prompt generator width {dim} is not divisible by {heads} heads")
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
        heads = max(1, dim // 64)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(PromptLayer(dim, heads, dropout) for _ in range(layers))
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha)))  # [E]
        _trunc_normal_init(self)

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        memory = self.norm(visual)
        for layer in self.layers:
            text = layer(text, memory)
        return self.alpha * text


@BLOCKS.register("xclip")
class XCLIP(TemporalBlock):
    """Cross-frame message tokens in every layer; MIT pooling; video-specific class prompts (module docstring)."""

    freeze_backbone = False  # the image tower trains; the preset freezes the text tower (policy frozen_text)
    zero_init_identity = False
    lr_mults = {"": 10.0}  # official: message_*, mit, prompts* at 10x TRAIN.LR
    conditions_text = True

    def __init__(
        self,
        spec: TowerSpec,
        mit_layers: int = 1,
        max_frames: int = 32,
        prompt_layers: int = 2,
        prompt_alpha: float = 0.1,
        prompt_dropout: float = 0.0,
    ) -> None:
        super().__init__(spec)
        if prompt_layers < 1:
            raise ValueError(f"xclip prompt_layers must be >= 1, got {prompt_layers}")
        c, e = spec.width, spec.embed_dim
        self.messages = nn.ModuleList(CrossFrameMessage(c, spec.heads) for _ in range(spec.layers))
        self.mit = MultiframeIntegration(e, max_frames, mit_layers)
        self.visual_ln = LayerNorm(c)
        self.visual_proj = nn.Parameter(torch.randn(c, e))  # [C, E], official torch.randn (std 1)
        self.generator = VideoPromptGenerator(e, prompt_layers, prompt_alpha, prompt_dropout)

    @property
    def appends_image_tokens(self) -> bool:
        return True

    @property
    def token_dim(self) -> int | None:
        return self.spec.embed_dim  # VideoOutput.tokens: the frame-mean projected patch tokens [B, N, E]

    # -- image hooks -------------------------------------------------------------------------------------
    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        cls = x[:, 0].reshape(ctx.batch, ctx.frames, -1)  # [B, T, C]
        msg = self.messages[i](cls).to(x.dtype).reshape(x.shape[0], 1, -1)  # [B*T, 1, C]
        return torch.cat([x, msg], dim=1)  # [B*T, 1+N+1, C]

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x[:, :-1]  # the message token only takes part in the attention

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if i == self.spec.layers - 1:
            ctx.state[PATCHES_KEY] = x[:, 1:]  # [B*T, N, C] for the prompt generator's visual tokens
        return x

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        frames = self.mit(frame_embeds)  # [B, T, E]
        patches = ctx.state[PATCHES_KEY]  # [B*T, N, C]
        visual = self.visual_ln(patches) @ self.visual_proj.to(patches.dtype)  # [B*T, N, E]
        tokens = visual.reshape(ctx.batch, ctx.frames, -1, visual.shape[-1]).mean(dim=1)  # [B, N, E]
        return VideoOutput(embeds=frames.mean(dim=1), frame_embeds=frames, tokens=tokens)

    # -- text side -----------------------------------------------------------------------------------------
    def condition_text(self, text: Tensor, video: VideoOutput) -> Tensor:
        """``text [K, E]`` (unnormalised class features), ``video.tokens [B, N, E]`` -> ``[B, K, E]``:
        ``text + alpha * generator(text, tokens)``."""
        if video.tokens is None:
            raise ValueError("xclip: condition_text needs the video's tokens (VideoOutput.tokens of this block)")
        tokens = video.tokens.to(text.dtype)
        per_video = text.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, K, E]
        return per_video + self.generator(per_video, tokens)

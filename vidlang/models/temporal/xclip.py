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

from vidlang.models.clip.layers import LayerNorm
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.ila import MultiframeIntegration
from vidlang.models.temporal.video_prompts import (
    VideoPromptGenerator,
    condition_on_video,
    keep_last_patches,
    visual_prompt_tokens,
)


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


@BLOCKS.register("xclip")
class XCLIP(TemporalBlock):
    """Cross-frame message tokens in every layer; MIT pooling; video-specific class prompts (module docstring)."""

    freeze_backbone = False  # the image tower trains; the preset freezes the text tower (policy frozen_text)
    zero_init_identity = False
    lr_mults = {"": 10.0}  # official: message_*, mit, prompts* at 10x TRAIN.LR

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
    def conditions_text(self) -> bool:
        return True

    def conditioning_parameters(self) -> list[nn.Parameter]:
        return [*self.visual_ln.parameters(), self.visual_proj, *self.generator.parameters()]

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
        keep_last_patches(i, x, ctx, self.spec.layers)  # [B*T, N, C] for the prompt generator's visual tokens
        return x

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        frames = self.mit(frame_embeds)  # [B, T, E]
        tokens = visual_prompt_tokens(ctx, self.visual_ln, self.visual_proj)  # [B, N, E]
        return VideoOutput(embeds=frames.mean(dim=1), frame_embeds=frames, tokens=tokens)

    # -- text side -----------------------------------------------------------------------------------------
    def condition_text(self, text: Tensor, video: VideoOutput) -> Tensor:
        """``text [K, E]`` (unnormalised class features), ``video.tokens [B, N, E]`` -> ``[B, K, E]``:
        ``text + alpha * generator(text, tokens)``."""
        return condition_on_video(self.generator, text, video.tokens, "xclip")

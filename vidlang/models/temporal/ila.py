"""``ila`` (Implicit temporal modelling with Learnable Alignment), as in the released code.

Before the attention of every layer (``before_layer(i)``), on the residual stream ``x [B*T, 1+N, C]``:

1. message projection ``m = LN(Linear(x))`` of all tokens;
2. each adjacent frame pair ``(t-1, t)``: patch maps concatenated on channels ``[B*(T-1), 2C, h, w]``
   -> interaction block -> interaction map ``G`` (256 ch). ``interaction`` (registry :data:`INTERACTIONS`):
   ``dwsep`` (K400 code, the default) = depthwise 3x3 conv 2C + BN + ReLU -> pointwise 1x1 conv 2C->256 + BN +
   ReLU -> 3x3 conv 256->256 + BN + ReLU; ``conv`` (SSv2 code) = two 3x3 conv + BN + ReLU (2C->256->256);
3. point head on ``G``: two (conv + BN + maxpool + ReLU) stages -> global max -> grouped Conv1d 128->64,
   ReLU, Conv1d 64->4 (zero-init) -> tanh x 0.75: one interactive point ``(x, y)`` per frame of the pair;
4. trapezoid masks ``M(i, j) = phi(g_i - p_y) * phi(g_j - p_x)``, ``phi(d) = 1`` for ``|d| <= 0.25`` else
   ``max(0, 1 - 1.5 (|d| - 0.25))``, grid ``g`` = linspace(-1, 1). Training: the mask is the mean over the
   point shifted by the 9 offsets ``{0, +-delta}^2`` (delta 0.2, halved by :meth:`ILA.align_decay`);
   evaluation: the mask at the predicted point itself;
5. aligned frames = masked message maps (a middle frame averages its roles as "current" of the pair
   before and "previous" of the pair after; CLS = message CLS, unmasked), interaction features = the
   two 128-ch halves of ``G`` per frame (same role averaging) -> Conv3d (3,1,1) over T -> Linear 128->C
   (CLS = message CLS); both added to the residual stream through zero-initialised C x C projections
   (``align_fc``, ``skip_fc``: the code's ``temporal_skip_align_fc`` / ``temporal_skip_fc``);
6. auxiliary loss ``ila_align``: the masked maps of a pair are sum-pooled to ``z_prev, z_cur`` and
   pulled together with ``mean(1 - cos)``, summed over layers (weight 1).

Then the frozen CLIP attention and MLP run. ``pooled_token_in_attention=True`` is the paper's
variant: the frame's sum-pooled aligned token is appended before attention and removed before the
MLP (the released code computes it only for the loss). T = 1: no pairs, identity, loss 0.

Video pooling (``pool``, registry :data:`ILA_POOLS`): ``mean`` over T (default), or ``mit``: X-CLIP's
Multi-frame Integration Transformer that the K400 code uses = frame position embedding + ``mit_layers``
(1) pre-LN transformer layers (heads E/64) over the frame embeddings ``[B, T, E]``, residual to the input,
mean over T; initialised as the code (position embedding and Linear weights truncated N(0, 0.02), zero biases,
the fused qkv Xavier-uniform as ``nn.MultiheadAttention``). With ``mean`` the block is the identity at init
(frame-mean CLIP); ``mit`` is not.

Training recipe (declared, relative to the code's base lr 8e-6 = ``TRAIN.LR``, see :data:`BASE_LR`): the
alignment modules (the code's ``message_*`` group) at lr 5e-4 (x62.5) wd 1e-2, the two skip projections at
lr 8e-5 (x10) wd 1e-3, the MIT at 4e-4 (x50) with the task's weight decay (the code's ``TRAIN.WEIGHT_DECAY``,
3e-3). Norms, biases and the position embedding never decay. CLIP is frozen. The code halves the jitter
offsets at the start of every epoch >= 30 of 50 (0-based, before the epoch's first step):
:meth:`ILA.align_decay` is the hook a training callback calls.

Deviations from the released code (``Francis-Rings/ILA``, ``models/align.py``, ``mat.py``, ``mit.py``):

- ``video_prompts`` (off by default; on in the K400 preset and for converted K400 files): the K400 model also
  runs X-CLIP's video-specific prompt generator (:mod:`vidlang.models.temporal.video_prompts`) on the class-text
  features: visual tokens = the last layer's patch tokens (before ``ln_post``) -> ``visual_ln`` -> ``@ visual_proj``
  -> mean over frames (``VideoOutput.tokens [B, N, E]``), and ``condition_text`` adds ``generator(text, tokens)``
  to the class features (``conditions_text``). The code never optimises these modules (no optimizer group), so in
  a released checkpoint they hold their random initialisation and still change every logit: here they are frozen
  by construction (persistent buffers, not parameters: saved and loaded, never trained by any freeze policy or
  optimizer; gradients pass through them to the video side as in the code). The SSv2 code has no generator.
- The jitter offsets are a buffer (saved in checkpoints; the code keeps a plain tensor that restarts at 0.2).
- The 2x2 max-pools of the point head skip maps smaller than 2 pixels (tiny test grids; B/32 and B/16 grids
  are unaffected).
- The MIT position embedding is a ``[max_frames, E]`` table of which the first T rows are used (the code's is
  ``[1, T, E]``); rows are i.i.d. at init, so this is the same model for T frames.
- The lr schedule's absolute floor (8e-8 for every group in the code) is the task's business.
- ``hidden`` (256 in the code) is configurable; ``pooled_token_in_attention`` is the paper's variant (off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.errors import ConfigError
from vidlang.models.clip.layers import LayerNorm, ResidualAttentionLayer
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.video_prompts import (
    VideoPromptGenerator,
    condition_on_video,
    freeze_as_buffers,
    keep_last_patches,
    visual_prompt_tokens,
)
from vidlang.registry import Registry

FLAT = 0.25  # half-width of the trapezoid's flat top
SLOPE = 1.5
POINT_SCALE = 0.75
# The released optimiser (utils/optimizer.py), relative to its base lr TRAIN.LR = 8e-6 (configs/k400/32_8.yaml).
BASE_LR = 8e-6
MESSAGE_LR_MULT, MESSAGE_WD = 5e-4 / BASE_LR, 1e-2  # the alignment modules ("message_*"): lr 5e-4
SKIP_LR_MULT, SKIP_WD = 10.0, 1e-3  # temporal_skip_fc / temporal_skip_align_fc: lr TRAIN.LR x 10 = 8e-5
MIT_LR_MULT = 4e-4 / BASE_LR  # the MIT pooling: lr 4e-4, weight decay TRAIN.WEIGHT_DECAY (the task's)


def trapezoid(d: Tensor) -> Tensor:
    """``phi(d) = 1`` for ``|d| <= 0.25``, else ``max(0, 1 - 1.5 (|d| - 0.25))``."""
    return (1 - SLOPE * (d.abs() - FLAT)).clamp(0.0, 1.0)


def grid_coords(n: int, device: torch.device | None = None) -> Tensor:
    """``n`` evenly spaced coordinates in [-1, 1] (``[0]`` for ``n == 1``)."""
    return torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)


def trapezoid_mask(points: Tensor, grid: tuple[int, int]) -> Tensor:
    """``points [..., 2]`` as ``(x, y)`` in [-1, 1] -> ``[..., h, w]`` masks ``M(i, j) = phi(g_i - y) phi(g_j - x)``."""
    gy = grid_coords(grid[0], points.device).to(points.dtype)
    gx = grid_coords(grid[1], points.device).to(points.dtype)
    my = trapezoid(gy - points[..., 1:2])  # [..., h]
    mx = trapezoid(gx - points[..., 0:1])  # [..., w]
    return my.unsqueeze(-1) * mx.unsqueeze(-2)


def jitter_offsets(delta: float) -> Tensor:
    """The released code's 9 training offsets: ``{0, +-delta}^2`` (centre first) ``[9, 2]``."""
    base = [[0, 0], [0, 1], [1, 0], [0, -1], [-1, 0], [1, 1], [-1, -1], [1, -1], [-1, 1]]
    return torch.tensor(base, dtype=torch.float32) * delta


class _MaxPool2(nn.Module):
    """2x2 max-pool that leaves maps smaller than 2 pixels alone (tiny grids)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


def _conv_bn_relu(cin: int, cout: int, kernel: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()]


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv ``cin -> cout`` + BN + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(*_conv_bn_relu(cin, cin, 3, groups=cin))
        self.pointwise = nn.Sequential(*_conv_bn_relu(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


InteractionFactory = Callable[[int, int], nn.Module]  # (in channels 2C, hidden) -> [N, 2C, h, w] -> [N, hidden, h, w]
INTERACTIONS: Registry[InteractionFactory] = Registry("ila interaction block")


@INTERACTIONS.register("dwsep")
def dwsep_interaction(channels: int, hidden: int) -> nn.Module:
    """The K400 code: depthwise-separable ``channels -> hidden``, then 3x3 conv ``hidden -> hidden`` (+ BN, ReLU)."""
    return nn.Sequential(DepthwiseSeparable(channels, hidden), *_conv_bn_relu(hidden, hidden, 3))


@INTERACTIONS.register("conv")
def conv_interaction(channels: int, hidden: int) -> nn.Module:
    """The SSv2 code: 3x3 conv ``channels -> hidden`` then ``hidden -> hidden`` (each + BN, ReLU)."""
    return nn.Sequential(*_conv_bn_relu(channels, hidden, 3), *_conv_bn_relu(hidden, hidden, 3))


class MultiframeIntegration(nn.Module):
    """X-CLIP's MIT: ``[B, T, E]`` + frame position embedding -> pre-LN transformer layers -> + input."""

    def __init__(self, embed_dim: int, max_frames: int = 32, layers: int = 1) -> None:
        super().__init__()
        if layers < 1 or max_frames < 1:
            raise ValueError(f"ila mit needs layers >= 1 and max_frames >= 1, got {layers} and {max_frames}")
        self.frame_position_embedding = nn.Parameter(torch.empty(max_frames, embed_dim))  # [T_max, E]
        nn.init.trunc_normal_(self.frame_position_embedding, std=0.02)
        heads = max(1, embed_dim // 64)
        self.layers = nn.ModuleList(ResidualAttentionLayer(embed_dim, heads, 4 * embed_dim) for _ in range(layers))
        for layer in self.layers:
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    if name == "attn.qkv":  # nn.MultiheadAttention's in-projection: Xavier-uniform
                        nn.init.xavier_uniform_(mod.weight)
                    else:
                        nn.init.trunc_normal_(mod.weight, std=0.02)
                    nn.init.zeros_(mod.bias)

    def forward(self, frame_embeds: Tensor) -> Tensor:
        """``[B, T, E]`` -> ``[B, T, E]``."""
        t = frame_embeds.shape[1]
        if t > self.frame_position_embedding.shape[0]:
            raise ValueError(f"ila mit got {t} frames but max_frames={self.frame_position_embedding.shape[0]}")
        x = frame_embeds + self.frame_position_embedding[:t].to(frame_embeds.dtype)
        for layer in self.layers:
            x = layer(x)
        return x + frame_embeds


PoolFactory = Callable[[int, int, int], nn.Module]  # (E, max_frames, layers) -> [B, T, E] -> [B, T, E]
ILA_POOLS: Registry[PoolFactory] = Registry("ila video pooling")


@ILA_POOLS.register("mean")
def mean_pool(embed_dim: int, max_frames: int, layers: int) -> nn.Module:
    """Plain mean of the frame embeddings (nothing before it)."""
    return nn.Identity()


ILA_POOLS.register("mit")(MultiframeIntegration)


def roles_to_frames(prev: Tensor, cur: Tensor) -> Tensor:
    """Per-pair ``prev/cur [B, T-1, ...]`` -> per-frame ``[B, T, ...]``; middle frames average their two roles."""
    middle = (prev[:, 1:] + cur[:, :-1]) / 2
    return torch.cat([prev[:, :1], middle, cur[:, -1:]], dim=1)


class ILALayer(nn.Module):
    """The alignment module of one transformer layer."""

    def __init__(self, width: int, hidden: int = 256, delta: float = 0.2, interaction: str = "dwsep") -> None:
        super().__init__()
        if hidden % 4:
            raise ValueError(f"ILA hidden width must be divisible by 4, got {hidden}")
        half = hidden // 2
        self.interaction = interaction
        self.message_fc = nn.Linear(width, width)
        self.message_ln = nn.LayerNorm(width)
        self.interact = INTERACTIONS.get(interaction)(2 * width, hidden)
        self.point_conv = nn.Sequential(
            nn.Conv2d(hidden, half, 3, padding=1), nn.BatchNorm2d(half), _MaxPool2(), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), _MaxPool2(), nn.ReLU(),
        )  # fmt: skip
        self.point_fc = nn.Sequential(nn.Conv1d(half, half // 2, 1, groups=2), nn.ReLU())
        self.point_out = nn.Conv1d(half // 2, 4, 1, groups=2)
        nn.init.zeros_(self.point_out.weight)
        nn.init.zeros_(self.point_out.bias)
        self.time_conv = nn.Conv3d(half, half, (3, 1, 1), padding=(1, 0, 0))
        self.feature_fc = nn.Linear(half, width)
        self.skip_fc = nn.Linear(width, width)  # interaction features -> residual (zero-init)
        self.align_fc = nn.Linear(width, width)  # aligned frames -> residual (zero-init)
        for lin in (self.skip_fc, self.align_fc):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.register_buffer("offsets", jitter_offsets(delta))  # [9, 2]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Refuse, with the fix, weights of the other interaction block (vidlang's default was ``conv`` before
        issue 14)."""
        found = "conv" if f"{prefix}interact.0.weight" in state_dict else None
        if f"{prefix}interact.0.depthwise.0.weight" in state_dict:
            found = "dwsep"
        if found is not None and found != self.interaction:
            raise ConfigError(
                f"ila: the weights under {prefix!r} have interaction block {found!r} but the block was built with "
                f"{self.interaction!r} (before issue 14 the default was 'conv'): set block_args.interaction: {found}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def points(self, g: Tensor, b: int) -> Tensor:
        """Interaction map ``g [B*(T-1), hidden, h, w]`` -> points ``[B, T-1, 4]`` (prev x, y, cur x, y)."""
        f = self.point_conv(g).amax(dim=(-2, -1))  # [B*(T-1), half]
        f = f.view(b, -1, f.shape[-1]).transpose(1, 2)  # [B, half, T-1]
        return torch.tanh(self.point_out(self.point_fc(f))).transpose(1, 2) * POINT_SCALE

    def masks(self, pts: Tensor, grid: tuple[int, int], training: bool) -> Tensor:
        """``pts [..., 2]`` -> ``[..., h, w]``; mean over the jittered points during training."""
        if not training:
            return trapezoid_mask(pts, grid)
        jittered = pts.unsqueeze(-2) + self.offsets.to(pts.dtype)  # [..., 9, 2]
        return trapezoid_mask(jittered, grid).mean(-3)

    def forward(self, x: Tensor, b: int, t: int, grid: tuple[int, int], training: bool) -> tuple[Tensor, ...]:
        """``x [B*T, 1+N, C]`` -> (residual update ``[B*T, 1+N, C]``, loss, pooled tokens ``[B, T, C]``)."""
        # The alignment works in token layout [..., N, C] (no transposed copy of the message maps); the
        # convolutions get contiguous NCHW maps (mkldnn's channels-last BatchNorm / backward are slower here).
        h, w = grid
        c = x.shape[-1]
        m = self.message_ln(self.message_fc(x)).view(b, t, 1 + h * w, c)
        cls, tok = m[:, :, :1], m[:, :, 1:]  # [B, T, 1, C], [B, T, N, C]
        pairs = torch.cat([tok[:, :-1], tok[:, 1:]], dim=-1).view(b * (t - 1), h, w, 2 * c)  # [B*(T-1), h, w, 2C]
        g = self.interact(pairs.permute(0, 3, 1, 2).contiguous())  # [B*(T-1), hidden, h, w]
        pts = self.points(g, b)  # [B, T-1, 4]
        mask_prev = self.masks(pts[..., :2], grid, training).flatten(-2).unsqueeze(-1)  # [B, T-1, N, 1]
        mask_cur = self.masks(pts[..., 2:], grid, training).flatten(-2).unsqueeze(-1)
        al_prev, al_cur = mask_prev * tok[:, :-1], mask_cur * tok[:, 1:]  # [B, T-1, N, C]
        z_prev, z_cur = al_prev.sum(2), al_cur.sum(2)  # [B, T-1, C]
        loss = (1 - F.cosine_similarity(z_prev, z_cur, dim=-1)).mean()
        aligned = torch.cat([cls, roles_to_frames(al_prev, al_cur)], dim=2)  # [B, T, 1+N, C]
        half = g.shape[1] // 2
        g = g.view(b, t - 1, *g.shape[1:])
        feats = roles_to_frames(g[:, :, :half], g[:, :, half:])  # [B, T, half, h, w]
        feats = self.time_conv(feats.transpose(1, 2)).transpose(1, 2)  # Conv3d over T
        feats = self.feature_fc(feats.flatten(3).transpose(-1, -2))  # [B, T, N, C]
        feats = torch.cat([cls, feats], dim=2)
        update = self.align_fc(aligned) + self.skip_fc(feats)  # [B, T, 1+N, C]
        pooled = roles_to_frames(z_prev, z_cur)  # [B, T, C]
        return update.reshape(b * t, 1 + h * w, c), loss, pooled


@BLOCKS.register("ila")
class ILA(TemporalBlock):
    """Learnable alignment before attention in every layer; backbone frozen; mean (or MIT) over T."""

    freeze_backbone = True
    zero_init_identity = True  # with the default pool "mean"
    default_aux_weights = {"ila_align": 1.0}
    lr_mults = {
        "layers": MESSAGE_LR_MULT,
        "layers.*.skip_fc": SKIP_LR_MULT,
        "layers.*.align_fc": SKIP_LR_MULT,
        "pooler": MIT_LR_MULT,
    }
    weight_decays = {"layers": MESSAGE_WD, "layers.*.skip_fc": SKIP_WD, "layers.*.align_fc": SKIP_WD}

    def __init__(
        self,
        spec: TowerSpec,
        hidden: int = 256,
        delta: float = 0.2,
        pooled_token_in_attention: bool = False,
        interaction: str = "dwsep",
        pool: str = "mean",
        mit_layers: int = 1,
        max_frames: int = 32,
        video_prompts: bool = False,
        prompt_layers: int = 2,
        prompt_alpha: float = 0.1,
    ) -> None:
        super().__init__(spec)
        INTERACTIONS.get(interaction)  # an unknown name fails here, once
        self.layers = nn.ModuleList(ILALayer(spec.width, hidden, delta, interaction) for _ in range(spec.layers))
        self.pooled_token_in_attention = pooled_token_in_attention
        self.pooler = ILA_POOLS.get(pool)(spec.embed_dim, max_frames, mit_layers)  # [B, T, E] -> [B, T, E]
        self.video_prompts = video_prompts
        if video_prompts:  # the K400 code's prompts_visual_ln / prompts_visual_proj / prompts_generator, frozen
            self.visual_ln = freeze_as_buffers(LayerNorm(spec.width))
            self.register_buffer("visual_proj", torch.randn(spec.width, spec.embed_dim))  # [C, E], torch.randn
            self.generator = freeze_as_buffers(VideoPromptGenerator(spec.embed_dim, prompt_layers, prompt_alpha))

    @property
    def appends_image_tokens(self) -> bool:
        return self.pooled_token_in_attention

    @property
    def conditions_text(self) -> bool:
        return self.video_prompts

    @property
    def token_dim(self) -> int | None:
        return self.spec.embed_dim if self.video_prompts else None  # the generator's visual tokens [B, N, E]

    @torch.no_grad()
    def align_decay(self) -> None:
        """Halve the training jitter offsets of every layer (cumulative). The hook of a training callback: the
        released code calls it at the start of every epoch >= 30 (0-based) of its 50, before the first step."""
        for layer in self.layers:
            layer.offsets.mul_(0.5)

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        losses = ctx.state.setdefault("ila_align", {})
        if ctx.frames < 2:
            losses[i] = x.new_zeros(())
        else:
            update, losses[i], pooled = self.layers[i](x, ctx.batch, ctx.frames, ctx.grid, ctx.training)
            x = x + update
            if self.pooled_token_in_attention:
                x = torch.cat([x, pooled.reshape(x.shape[0], 1, -1)], dim=1)  # removed in before_mlp
        # keyed by layer: a gradient-checkpoint recomputation overwrites instead of double counting
        ctx.aux_losses["ila_align"] = torch.stack(list(losses.values())).sum()
        return x

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.pooled_token_in_attention and ctx.frames >= 2:
            return x[:, :-1]
        return x

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.video_prompts:
            keep_last_patches(i, x, ctx, self.spec.layers)  # [B*T, N, C] for the generator's visual tokens
        return x

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        frames = self.pooler(frame_embeds)  # [B, T, E]
        tokens = visual_prompt_tokens(ctx, self.visual_ln, self.visual_proj) if self.video_prompts else None
        return VideoOutput(embeds=frames.mean(dim=1), frame_embeds=frames, tokens=tokens)

    def condition_text(self, text: Tensor, video: VideoOutput) -> Tensor:
        """With ``video_prompts``: ``text [K, E]`` (unnormalised class features), ``video.tokens [B, N, E]`` ->
        ``text + generator(text, tokens)`` ``[B, K, E]`` (the K400 code's class features)."""
        if not self.video_prompts:
            return super().condition_text(text, video)
        return condition_on_video(self.generator, text, video.tokens, "ila")

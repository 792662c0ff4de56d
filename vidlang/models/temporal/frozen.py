"""``frozen`` (Frozen in Time, Bain et al., ICCV 2021): divided space-time attention with one video CLS token.

The released model (``m-bain/frozen-in-time``, ``model/video_transformer.py``: ``SpaceTimeTransformer``,
``SpaceTimeBlock``, ``VarAttention``) runs one sequence per video, ``[CLS, patches of frame 0, ..., frame T-1]``
(time-major), through ViT layers that each gained a temporal attention and a norm. Per layer, with ``x`` the
residual stream::

    t = TimeAttn(norm3(x))                 # patch (t, n) attends to {CLS, patches (0..T-1, n)}
    s = SpaceAttn(norm1(x + t))            # patch (t, n) attends to {CLS, patches (t, 0..N-1)}
    x = x + s                              # the temporal output enters only through the spatial input
    x = x + MLP(norm2(x))

In both attentions the CLS query attends to every token of the video (CLS + all T*N patches), once. Embedding:
patches + the spatial position embedding + a temporal embedding ``[T, C]`` (zeros at init, frame ``t`` adds row
``t``; not added to the CLS); the video embedding is the final-norm CLS, projected.

Initialisation (``time_init="zeros"``, the released configs' and ``FrozenInTime``'s default): the temporal
attention's qkv weight and bias are 0 and its output projection has weight 1 (every entry) and bias 0, so its
output is 0 at the start; its norm is a fresh LayerNorm (eps 1e-6, the released ``norm_layer``); the image
layers are the pretrained ViT's. ``time_init="rand"``: PyTorch's default Linear init instead (the released
``VarAttention`` without ``initialize='zeros'``).

How it maps onto vidlang's hooks (the tower runs each frame as its own ``[1+N]`` sequence, ``B*T`` of them):

- every frame carries a copy of the video CLS; the copies hold the same value throughout (each layer writes
  one value into all of them), and the video CLS is their mean (the same value; the gradient is then the
  released model's, by the chain rule on that diagonal);
- ``embed``: adds the temporal embedding to the patches of frame ``t``;
- ``before_layer(i)``: keeps the residual stream ``x``;
- ``attn_input(i)``: runs the temporal attention on ``x`` (the block's own, exact) and returns
  ``ln_1(x + t)`` (the tower's ``ln_1`` = the released ``norm1``) as the spatial attention's input; patches then
  attend to their frame's patches + the frame's CLS copy = the video CLS, exactly as released;
- ``before_mlp(i)``: replaces the frame-CLS outputs of the tower's per-frame attention by the CLS query over
  the whole video (CLS once + all patches), computed from the layer's own qkv / out_proj weights (the keys and
  values are never materialised: ``q . (W_k h) = (W_k^T q) . h``, and the value projection is applied to the
  attention-weighted mean of the inputs), then writes it into every frame's copy. With T = 1 the per-frame
  attention already is the released one and this step is skipped.
- ``pool``: the frame embeddings are T copies of the projected video CLS; their mean is the video embedding.

T = 1 (an image as a one-frame video, as the released code feeds CC3M): the spatial part is exactly the image
model. The temporal attention still runs, as released: each patch attends to {CLS, itself} (it is a no-op only
while its weights are at the zero init). At init the model therefore equals the image model for T = 1; for T > 1
it does not (the CLS attends across frames), so ``zero_init_identity`` is False.

Deviations from the released code:

- Backbone: vidlang's CLIP towers (``ln_pre`` before the first layer, QuickGELU, CLIP's projection; text = CLIP's
  text tower) instead of an ImageNet-21k ViT-B/16 with DistilBERT and 256-d projections (``projection:
  minimal``); only CLIP towers are supported (the CLS step reads the layer's ``ln_1`` and fused ``qkv``).
- The temporal embedding is a ``[max_frames, C]`` table of which the first T rows are used (released: ``[1,
  num_frames, C]``, trimmed or zero-filled when a checkpoint of another frame count is loaded, ``load_temporal_fix=
  'zeros'``): rows start at zero and rows of frames never seen stay zero, so growing T mid-training (the frame
  curriculum) is the released ``zeros`` fix.
- Drop path is not offered (the released runs use ``drop_path_rate`` 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.clip.layers import Attention, LayerNorm
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS
from vidlang.registry import Registry

TIME_NORM_EPS = 1e-6  # the released norm_layer: partial(nn.LayerNorm, eps=1e-6)
STATE_KEY = "frozen"


def _zeros_init(attn: Attention) -> None:
    """The released ``initialize='zeros'``: qkv weight and bias 0, output projection weight 1 and bias 0."""
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.out_proj.weight.fill_(1.0)
        attn.out_proj.bias.zero_()


TIME_INITS: Registry = Registry("frozen time-attention init")
TIME_INITS.register("zeros")(_zeros_init)
TIME_INITS.register("rand")(lambda attn: None)  # nn.Linear's default init, as the released random option


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[..., L, H*D]`` -> ``[..., H, L, D]``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def time_attention(attn: Attention, y: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """The released temporal ``VarAttention`` on normed video tokens ``y [B, 1+T*N, C]`` (time-major patches).

    Patch ``(t, n)`` attends to ``{CLS, patches (0..T-1, n)}``; the CLS to every token. Returns the outputs of the
    CLS ``[B, C]`` and of the patches ``[B, T, N, C]`` (after the output projection).
    """
    b, length, c = y.shape
    n, h = (length - 1) // t, attn.heads
    q, k, v = (split_heads(z, h) for z in attn.qkv(y).chunk(3, dim=-1))  # each [B, H, 1+T*N, D]
    cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # [B, H, 1, D]

    def per_patch(z: Tensor) -> Tensor:  # [B, H, T*N, D] -> [B, N, H, T, D]
        return z.unflatten(2, (t, n)).permute(0, 3, 1, 2, 4)

    qp = per_patch(q[:, :, 1:])
    kp = torch.cat([k[:, None, :, :1].expand(b, n, h, 1, -1), per_patch(k[:, :, 1:])], dim=3)  # [B, N, H, 1+T, D]
    vp = torch.cat([v[:, None, :, :1].expand(b, n, h, 1, -1), per_patch(v[:, :, 1:])], dim=3)
    out = F.scaled_dot_product_attention(qp, kp, vp)  # [B, N, H, T, D]
    patches = out.permute(0, 3, 1, 2, 4).flatten(3)  # [B, T, N, H*D]
    return attn.out_proj(cls_out.transpose(1, 2).flatten(2)[:, 0]), attn.out_proj(patches)


def video_cls_attention(attn: Attention, cls: Tensor, seq: Tensor) -> Tensor:
    """One CLS query over a whole video with a CLIP layer's attention, without materialising keys and values.

    ``cls [B, C]`` is the normed CLS (the query and the first key), ``seq [B, L, C]`` the normed keys' inputs
    (the CLS first, then every patch of every frame). Per head ``h``: ``q_h . k_j = (W_k,h^T q_h) . seq_j`` plus a
    term equal for all j (it cancels in the softmax), and ``sum_j a_j v_j = W_v,h (sum_j a_j seq_j) + b_v,h``.
    Returns the attention output after ``out_proj``, ``[B, C]``.
    """
    c, h = cls.shape[-1], attn.heads
    d = c // h
    wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)  # each [C, C]
    bq, _, bv = attn.qkv.bias.chunk(3, dim=0)
    q = F.linear(cls, wq, bq).view(-1, h, d) * d**-0.5  # [B, H, D]
    u = torch.einsum("bhd,hdc->bhc", q, wk.view(h, d, c))  # [B, H, C]
    weights = torch.einsum("blc,bhc->bhl", seq, u).softmax(dim=-1)  # [B, H, L]
    mixed = torch.einsum("bhl,blc->bhc", weights, seq)  # [B, H, C]
    out = torch.einsum("bhc,hdc->bhd", mixed, wv.view(h, d, c)) + bv.view(h, d)  # [B, H, D]
    return attn.out_proj(out.flatten(1))


@BLOCKS.register("frozen")
class FrozenInTime(TemporalBlock):
    """Divided space-time attention (a temporal attention per layer) with one video CLS; see the module docs."""

    freeze_backbone = False  # trained end to end
    zero_init_identity = False  # the image model at init only for T = 1 (the CLS attends across frames)
    lr_mults = {"": 1.0}  # one learning rate for everything (released: AdamW lr 3e-5)
    supported_towers = frozenset({"clip"})
    tower_requirement = "its video-CLS step runs the CLIP layer's ln_1 and fused qkv / out_proj on the whole video"

    def __init__(self, spec: TowerSpec, max_frames: int = 32, time_init: str = "zeros") -> None:
        super().__init__(spec)
        if max_frames < 1:
            raise ValueError(f"frozen max_frames must be >= 1, got {max_frames}")
        c = spec.width
        self.max_frames = max_frames
        self.temporal_embedding = nn.Parameter(torch.zeros(max_frames, c))  # [max_frames, C], released: zeros
        self.time_norm = nn.ModuleList(LayerNorm(c, eps=TIME_NORM_EPS) for _ in range(spec.layers))
        self.time_attn = nn.ModuleList(Attention(c, spec.heads) for _ in range(spec.layers))
        init = TIME_INITS.get(time_init)
        for attn in self.time_attn:
            init(attn)

    # -- hooks -------------------------------------------------------------------------------
    def embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        """``x [B*T, 1+N, C]``: + temporal embedding row ``t`` on the patches of frame ``t`` (not the CLS)."""
        t = ctx.frames
        if t > self.max_frames:
            raise ValueError(f"frozen: {t} frames exceed its temporal embedding ({self.max_frames} frames)")
        te = self.temporal_embedding[:t].to(x.dtype).repeat(ctx.batch, 1)[:, None]  # [B*T, 1, C]
        return torch.cat([x[:, :1], x[:, 1:] + te], dim=1)

    def _state(self, ctx: HookContext) -> dict:
        return ctx.state.setdefault(STATE_KEY, {})

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        self._state(ctx)[i] = x  # the residual stream (keyed by layer: checkpoint recomputation reads its own)
        return x

    def attn_input(self, i: int, h: Tensor, ctx: HookContext) -> Tensor:
        """``ln_1(x + TimeAttn(norm3(x)))`` on the video sequence, back in per-frame layout ``[B*T, 1+N, C]``."""
        b, t = ctx.batch, ctx.frames
        x = self._state(ctx)[i]
        c = x.shape[-1]
        frames = x.view(b, t, -1, c)
        cls = frames[:, :, 0].mean(1)  # [B, C]: the video CLS (all copies hold it)
        seq = torch.cat([cls[:, None], frames[:, :, 1:].flatten(1, 2)], dim=1)  # [B, 1+T*N, C]
        t_cls, t_patches = time_attention(self.time_attn[i], self.time_norm[i](seq), t)
        cls_in = (cls + t_cls)[:, None, None].expand(b, t, 1, c)  # [B, T, 1, C]
        mixed = torch.cat([cls_in, frames[:, :, 1:] + t_patches], dim=2).flatten(0, 1)  # [B*T, 1+N, C]
        h = ctx.image_tower.layer_list()[i].ln_1(mixed)
        self._state(ctx)[("h", i)] = h
        return h

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        """Frame-CLS outputs -> the video CLS's: residual + its attention over CLS + all T*N patches."""
        b, t = ctx.batch, ctx.frames
        state = self._state(ctx)
        x_in, h = state.pop(i), state.pop(("h", i))  # dropped here: inference keeps no per-layer copies
        if t == 1:
            return x  # the per-frame attention is the video's
        c = x.shape[-1]
        h = h.view(b, t, -1, c)
        cls_h = h[:, :, 0].mean(1)  # [B, C] (equal copies)
        seq = torch.cat([cls_h[:, None], h[:, :, 1:].flatten(1, 2)], dim=1)  # [B, 1+T*N, C]
        attn = ctx.image_tower.layer_list()[i].attn
        cls = x_in.view(b, t, -1, c)[:, :, 0].mean(1) + video_cls_attention(attn, cls_h, seq)  # [B, C]
        cls = cls.repeat_interleave(t, dim=0)[:, None]  # [B*T, 1, C]
        return torch.cat([cls, x[:, 1:]], dim=1)

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        """The projected video CLS (``frame_embeds [B, T, E]`` holds T copies of it; their mean)."""
        return VideoOutput(embeds=frame_embeds.mean(dim=1), frame_embeds=frame_embeds)

"""``stan`` (Mug-STAN's Spatial-Temporal Auxiliary Network): a side branch over the last K CLIP layers.

Branch sequence per video: one video CLS + all patches of all frames ``[B, 1 + T*N, C]`` (time-major).
Branch layer ``j`` runs in ``after_layer(L-K+j)`` on the output of CLIP layer ``L-K+j``:

- input of branch layer 0: video CLS = mean of the frame CLS averaged 50/50 with CLIP's
  ``class_embedding + positional_embedding[0]``; patches + CLIP's spatial position embedding (again)
  + a learnable temporal embedding (``nn.Embedding(64, C)`` with PyTorch's default N(0, 1) init in
  the released code: ``max_frames=64``, ``time_embed_std=1.0``);
- input of branch layer ``j > 0``: previous branch output + the CLIP layer output rearranged the same
  way (frame CLS averaged; with ``cls_residue=True`` the average is over the even frames 0, 2, 4, ...
  while training and over all frames in evaluation, as the released option does); ``input_proj=True`` adds
  the paper's C x C projection on the CLIP side (initialised to the identity, so it starts as the released code);
- each branch layer = temporal module (``time_module``, registry :data:`TIME_MODULES`; CLS untouched):
  ``attn`` = LN -> new attention over T for each patch position -> drop path -> zero-initialised Linear C->C
  -> residual; ``conv`` = dense 3x3x3 ``Conv3d(C, C)`` over (T, h, w) of the patch maps -> drop path ->
  zero-initialised Linear C->C -> residual (no norm, no activation); then the spatial module (a copy of CLIP
  layer ``L-K+j`` made in :meth:`init_from_tower`, attention run per frame with the video CLS copied into
  each frame, drop path, the frame CLS outputs averaged back; then its MLP on the whole sequence);
- after the last layer the branch CLS is added to every frame CLS; the tower applies ``ln_post`` +
  projection; ``pool`` averages over T (for Mug-STAN the task scores ``frame_embeds`` with the Mug
  similarity, :func:`vidlang.models.similarity.mug_similarity`).

Both temporal modules are the identity at init (zero projection), but the branch CLS is not zero, so the block
is not frame-mean CLIP at init: ``zero_init_identity = False``. Drop path on the branch's attention (or conv)
outputs: ``linspace(0, drop_path, K)`` for branch layer ``j`` of both the temporal and the spatial module.
Learning rate: the released configs train the branch at 10x the base lr (``lr_mults``).

Deviations from the released code (``farewellthree/STAN``, ``clip_stan_hf.py``):

- ``drop_path`` defaults to 0 (two training forwards of a batch agree); the code hard-codes
  ``linspace(0, 0.1, depth)``: set ``drop_path: 0.1`` to follow it.
- ``time_module="conv"`` is broken at the repository's HEAD (its class is not defined there); it is rebuilt from
  the class of the older code (commit d5c0277, ``models/heads/stan_head.py``, mode ``origin``). The released
  name of ``attn`` is ``selfattn``. The conv module accepts non-square patch grids (the code assumes square).
- Tokens are time-major inside the branch (the code is patch-major): the same computation, reshaped differently.
- Weight decay: the released optimiser decays every branch parameter (its ``STAN`` custom key overrides the
  norm/bias rule); vidlang never decays 1-D parameters and embeddings (:mod:`vidlang.models.optim`).
- ``input_proj`` is the paper's projection, absent from the released code (off by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vidlang.models.clip.layers import Attention, LayerNorm, ResidualAttentionLayer
from vidlang.models.contract import HookContext, ImageTowerView, TemporalBlock, TextTowerView, TowerSpec
from vidlang.models.temporal.base import BLOCKS
from vidlang.registry import Registry


class DropPath(nn.Module):
    """Per-sample stochastic depth (identity at evaluation)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _zero_linear(width: int) -> nn.Linear:
    lin = nn.Linear(width, width)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


TimeModuleFactory = Callable[[int, int, float], nn.Module]  # (width C, heads, drop-path rate) -> module
TIME_MODULES: Registry[TimeModuleFactory] = Registry("stan time module")


@TIME_MODULES.register("attn")
class TemporalModule(nn.Module):
    """LN -> attention over T per patch position -> drop path -> zero-init Linear -> residual (CLS untouched)."""

    def __init__(self, width: int, heads: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.ln = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.fc = _zero_linear(width)
        self.drop = DropPath(drop_path)

    def forward(self, seq: Tensor, t: int, grid: tuple[int, int] | None = None) -> Tensor:
        """``seq [B, 1+T*N, C]`` (time-major patches) -> same shape."""
        b, _, c = seq.shape
        p = seq[:, 1:].view(b, t, -1, c).transpose(1, 2)  # [B, N, T, C]
        n = p.shape[1]
        h = self.fc(self.drop(self.attn(self.ln(p.reshape(b * n, t, c))))).view(b, n, t, c)
        p = (p + h).transpose(1, 2).reshape(b, t * n, c)
        return torch.cat([seq[:, :1], p], dim=1)


@TIME_MODULES.register("conv")
class ConvTemporalModule(nn.Module):
    """Dense 3x3x3 Conv3d over (T, h, w) of the patch maps -> drop path -> zero-init Linear -> residual
    (CLS untouched; no norm, no activation). ``heads`` is unused (same factory signature as ``attn``)."""

    def __init__(self, width: int, heads: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(width, width, kernel_size=3, stride=1, padding=1)
        self.fc = _zero_linear(width)
        self.drop = DropPath(drop_path)

    def forward(self, seq: Tensor, t: int, grid: tuple[int, int] | None = None) -> Tensor:
        """``seq [B, 1+T*N, C]`` (time-major patches, ``grid`` = (h, w), N = h*w) -> same shape."""
        if grid is None:
            raise ValueError("stan conv time module needs the patch grid (h, w)")
        b, _, c = seq.shape
        h, w = grid
        p = seq[:, 1:]  # [B, T*N, C]
        maps = p.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [B, C, T, h, w]
        out = self.conv(maps).permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)  # [B, T*N, C]
        return torch.cat([seq[:, :1], p + self.fc(self.drop(out))], dim=1)


def spatial_forward(blk: ResidualAttentionLayer, seq: Tensor, t: int, drop: nn.Module) -> Tensor:
    """A CLIP layer on the branch sequence ``[B, 1+T*N, C]``: per-frame attention, frame CLS averaged."""
    b, _, c = seq.shape
    cls = seq[:, :1].unsqueeze(1).expand(b, t, 1, c)  # [B, T, 1, C]
    frames = torch.cat([cls, seq[:, 1:].view(b, t, -1, c)], dim=2).flatten(0, 1)  # [B*T, 1+N, C]
    a = drop(blk.attn(blk.ln_1(frames))).view(b, t, -1, c)
    a = torch.cat([a[:, :, 0].mean(1, keepdim=True), a[:, :, 1:].reshape(b, -1, c)], dim=1)
    seq = seq + a
    return seq + blk.mlp(blk.ln_2(seq))


@BLOCKS.register("stan")
class STAN(TemporalBlock):
    """Side branch (temporal module + copied CLIP layer) over the last ``depth`` layers; mean over T."""

    freeze_backbone = False
    lr_mults = {"": 10.0}
    zero_init_identity = False
    supported_towers = frozenset({"clip"})
    tower_requirement = "its branch runs copies of CLIP ViT layers (ResidualAttentionLayer) and CLIP's class embedding"

    def __init__(
        self,
        spec: TowerSpec,
        depth: int = 4,
        max_frames: int = 64,
        time_embed_std: float = 1.0,
        drop_path: float = 0.0,
        input_proj: bool = False,
        time_module: str = "attn",
        cls_residue: bool = False,
    ) -> None:
        super().__init__(spec)
        if depth < 1:
            raise ValueError(f"stan depth must be >= 1, got {depth}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"stan drop_path must be in [0, 1), got {drop_path}")
        depth = min(depth, spec.layers)  # shallow (test) towers: the branch covers every layer
        c = spec.width
        self.depth, self.start, self.max_frames = depth, spec.layers - depth, max_frames
        self.cls_residue = cls_residue
        self.drop_path_rates = drop_path_rates(drop_path, depth)
        factory = TIME_MODULES.get(time_module)
        self.temporal = nn.ModuleList(factory(c, spec.heads, r) for r in self.drop_path_rates)
        # placeholders with the tower's default layer shape; init_from_tower replaces them by copies
        self.spatial = nn.ModuleList(ResidualAttentionLayer(c, spec.heads) for _ in range(depth))
        self.spatial_drop = nn.ModuleList(DropPath(r) for r in self.drop_path_rates)
        self.temporal_embedding = nn.Parameter(torch.randn(max_frames, c) * time_embed_std)  # [max_frames, C]
        self.input_proj = nn.ModuleList(_identity_linear(c) for _ in range(depth - 1)) if input_proj else None

    def init_from_tower(self, image_tower: ImageTowerView, text_tower: TextTowerView | None) -> None:
        """Copy CLIP layers ``L-K .. L-1`` into the spatial modules."""
        layers = image_tower.layer_list()
        for j in range(self.depth):
            self.spatial[j] = copy.deepcopy(layers[self.start + j])
            self.spatial[j].requires_grad_(True)

    @staticmethod
    def _clip_embeddings(ctx: HookContext) -> tuple[Tensor, Tensor]:
        """CLIP's class embedding ``[C]`` and position embedding ``[1+N, C]`` for ``ctx.grid``."""
        if ctx.image_tower is None:
            raise RuntimeError("stan: the image tower's forward passes itself in ctx.image_tower; got none")
        return ctx.image_tower.class_position_embedding(ctx.grid)

    def _branch_input(self, j: int, x: Tensor, ctx: HookContext) -> Tensor:
        """CLIP layer output ``x [B*T, 1+N, C]`` -> branch input ``[B, 1+T*N, C]``."""
        b, t, c = ctx.batch, ctx.frames, x.shape[-1]
        x = x.view(b, t, -1, c)
        cls = x[:, :, :1].mean(1)  # [B, 1, C]
        patches = x[:, :, 1:]  # [B, T, N, C]
        if j == 0:
            if t > self.max_frames:
                raise ValueError(f"stan: {t} frames exceed its temporal embedding ({self.max_frames} frames)")
            class_emb, pe = self._clip_embeddings(ctx)
            patches = patches + pe[1:].to(x.dtype) + self.temporal_embedding[:t, None].to(x.dtype)
            cls = (cls + class_emb.to(x.dtype) + pe[0].to(x.dtype)) / 2
            return torch.cat([cls, patches.flatten(1, 2)], dim=1)
        if self.cls_residue and ctx.training:  # the released option: even frames' CLS while training
            cls = x[:, 0::2, :1].mean(1)
        seq = torch.cat([cls, patches.flatten(1, 2)], dim=1)
        if self.input_proj is not None:
            seq = self.input_proj[j - 1](seq)
        return ctx.state["stan"][j - 1] + seq

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        j = i - self.start
        if j < 0:
            return x
        seq = self._branch_input(j, x, ctx)
        seq = self.temporal[j](seq, ctx.frames, ctx.grid)
        seq = spatial_forward(self.spatial[j], seq, ctx.frames, self.spatial_drop[j])
        # keyed by branch layer so a gradient-checkpoint recomputation reads the right input
        ctx.state.setdefault("stan", {})[j] = seq
        if j < self.depth - 1:
            return x
        cls = x[:, :1] + seq[:, :1].repeat_interleave(ctx.frames, dim=0)  # [B*T, 1, C]
        return torch.cat([cls, x[:, 1:]], dim=1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """``linspace(0, rate, depth)``: the drop-path rate of each branch layer (``[0.0]`` for depth 1)."""
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0]


def _identity_linear(width: int) -> nn.Linear:
    lin = nn.Linear(width, width)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width))
        lin.bias.zero_()
    return lin

"""``stan`` (Mug-STAN's Spatial-Temporal Auxiliary Network): a side branch over the last K CLIP layers.

Branch sequence per video: one video CLS + all patches of all frames ``[B, 1 + T*N, C]`` (time-major).
Branch layer ``j`` runs in ``after_layer(L-K+j)`` on the output of CLIP layer ``L-K+j``:

- input of branch layer 0: video CLS = mean of the frame CLS averaged 50/50 with CLIP's
  ``class_embedding + positional_embedding[0]``; patches + CLIP's spatial position embedding (again)
  + a learnable temporal embedding (``nn.Embedding(64, C)`` with PyTorch's default N(0, 1) init in
  the released code: ``max_frames=64``, ``time_embed_std=1.0``);
- input of branch layer ``j > 0``: previous branch output + the CLIP layer output rearranged the same
  way (frame CLS averaged); ``input_proj=True`` adds the paper's C x C projection on the CLIP side
  (initialised to the identity, so it starts as the released code);
- each branch layer = temporal module (LN -> new attention over T for each patch position ->
  zero-initialised Linear C->C -> residual; CLS untouched) then spatial module (a copy of CLIP layer
  ``L-K+j`` made in :meth:`init_from_tower`, attention run per frame with the video CLS copied into
  each frame, the frame CLS outputs averaged back; then its MLP on the whole sequence);
- after the last layer the branch CLS is added to every frame CLS; the tower applies ``ln_post`` +
  projection; ``pool`` averages over T.

Not the identity at init: the temporal projections are zero but the branch CLS is not, so
``zero_init_identity = False``. Drop path on the branch's attention outputs: linspace(0, ``drop_path``, K);
the released code uses ``drop_path=0.1``; the default here is 0 so that two training forwards of the
same batch agree (set 0.1 in a config to follow the code).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vidlang.models.clip.layers import Attention, LayerNorm, ResidualAttentionLayer
from vidlang.models.contract import HookContext, ImageTowerView, TemporalBlock, TextTowerView, TowerSpec
from vidlang.models.temporal.base import BLOCKS


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


class TemporalModule(nn.Module):
    """LN -> attention over T per patch position -> zero-init Linear -> residual (CLS untouched)."""

    def __init__(self, width: int, heads: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.ln = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.drop = DropPath(drop_path)

    def forward(self, seq: Tensor, t: int) -> Tensor:
        b, _, c = seq.shape
        p = seq[:, 1:].view(b, t, -1, c).transpose(1, 2)  # [B, N, T, C]
        n = p.shape[1]
        h = self.fc(self.drop(self.attn(self.ln(p.reshape(b * n, t, c))))).view(b, n, t, c)
        p = (p + h).transpose(1, 2).reshape(b, t * n, c)
        return torch.cat([seq[:, :1], p], dim=1)


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
    """Side branch (temporal attention + copied CLIP layer) over the last ``depth`` layers; mean over T."""

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
    ) -> None:
        super().__init__(spec)
        if depth < 1:
            raise ValueError(f"stan depth must be >= 1, got {depth}")
        depth = min(depth, spec.layers)  # shallow (test) towers: the branch covers every layer
        c = spec.width
        self.depth, self.start, self.max_frames = depth, spec.layers - depth, max_frames
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear 0..drop_path
        self.temporal = nn.ModuleList(TemporalModule(c, spec.heads, r) for r in rates)
        # placeholders with the tower's default layer shape; init_from_tower replaces them by copies
        self.spatial = nn.ModuleList(ResidualAttentionLayer(c, spec.heads) for _ in range(depth))
        self.spatial_drop = nn.ModuleList(DropPath(r) for r in rates)
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
        seq = torch.cat([cls, patches.flatten(1, 2)], dim=1)
        if self.input_proj is not None:
            seq = self.input_proj[j - 1](seq)
        return ctx.state["stan"][j - 1] + seq

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        j = i - self.start
        if j < 0:
            return x
        seq = self._branch_input(j, x, ctx)
        seq = self.temporal[j](seq, ctx.frames)
        seq = spatial_forward(self.spatial[j], seq, ctx.frames, self.spatial_drop[j])
        # keyed by branch layer so a gradient-checkpoint recomputation reads the right input
        ctx.state.setdefault("stan", {})[j] = seq
        if j < self.depth - 1:
            return x
        cls = x[:, :1] + seq[:, :1].repeat_interleave(ctx.frames, dim=0)  # [B*T, 1, C]
        return torch.cat([cls, x[:, 1:]], dim=1)


def _identity_linear(width: int) -> nn.Linear:
    lin = nn.Linear(width, width)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width))
        lin.bias.zero_()
    return lin

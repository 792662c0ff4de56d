"""``ila`` (Implicit temporal modelling with Learnable Alignment), as in the released code.

Before the attention of every layer (``before_layer(i)``), on the residual stream ``x [B*T, 1+N, C]``:

1. message projection ``m = LN(Linear(x))`` of all tokens;
2. each adjacent frame pair ``(t-1, t)``: patch maps concatenated on channels ``[B*(T-1), 2C, h, w]``
   -> two 3x3 conv + BN + ReLU -> interaction map ``G`` (256 ch);
3. point head on ``G``: two (conv + BN + maxpool + ReLU) stages -> global max -> grouped Conv1d 128->64,
   ReLU, Conv1d 64->4 (zero-init) -> tanh x 0.75: one interactive point ``(x, y)`` per frame of the pair;
4. trapezoid masks ``M(i, j) = phi(g_i - p_y) * phi(g_j - p_x)``, ``phi(d) = 1`` for ``|d| <= 0.25`` else
   ``max(0, 1 - 1.5 (|d| - 0.25))``, grid ``g`` = linspace(-1, 1). Training: the mask is the mean over the
   point shifted by the 9 offsets ``{0, +-delta}^2`` (delta 0.2, halved by :meth:`ILA.align_decay`);
   evaluation: the mask at the predicted point itself;
5. aligned frames = masked message maps (a middle frame averages its roles as "current" of the pair
   before and "previous" of the pair after; CLS = message CLS, unmasked), interaction features = the
   two 128-ch halves of ``G`` per frame (same role averaging) -> Conv3d (3,1,1) over T -> Linear 128->C
   (CLS = message CLS); both added to the residual stream through zero-initialised C x C projections;
6. auxiliary loss ``ila_align``: the masked maps of a pair are sum-pooled to ``z_prev, z_cur`` and
   pulled together with ``mean(1 - cos)``, summed over layers (weight 1).

Then the frozen CLIP attention and MLP run. ``pooled_token_in_attention=True`` is the paper's
variant: the frame's sum-pooled aligned token is appended before attention and removed before the
MLP (the released code computes it only for the loss). T = 1: no pairs, identity, loss 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec
from vidlang.models.temporal.base import BLOCKS

FLAT = 0.25  # half-width of the trapezoid's flat top
SLOPE = 1.5
POINT_SCALE = 0.75


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


def roles_to_frames(prev: Tensor, cur: Tensor) -> Tensor:
    """Per-pair ``prev/cur [B, T-1, ...]`` -> per-frame ``[B, T, ...]``; middle frames average their two roles."""
    middle = (prev[:, 1:] + cur[:, :-1]) / 2
    return torch.cat([prev[:, :1], middle, cur[:, -1:]], dim=1)


class ILALayer(nn.Module):
    """The alignment module of one transformer layer."""

    def __init__(self, width: int, hidden: int = 256, delta: float = 0.2) -> None:
        super().__init__()
        if hidden % 4:
            raise ValueError(f"ILA hidden width must be divisible by 4, got {hidden}")
        half = hidden // 2
        self.message_fc = nn.Linear(width, width)
        self.message_ln = nn.LayerNorm(width)
        self.interact = nn.Sequential(
            nn.Conv2d(2 * width, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
        )  # fmt: skip
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
        h, w = grid
        c = x.shape[-1]
        m = self.message_ln(self.message_fc(x)).view(b, t, 1 + h * w, c)
        cls, maps = m[:, :, :1], m[:, :, 1:].transpose(-1, -2).reshape(b, t, c, h, w)  # [B, T, C, h, w]
        pairs = torch.cat([maps[:, :-1], maps[:, 1:]], dim=2).flatten(0, 1)  # [B*(T-1), 2C, h, w]
        g = self.interact(pairs)  # [B*(T-1), hidden, h, w]
        pts = self.points(g, b)  # [B, T-1, 4]
        mask_prev = self.masks(pts[..., :2], grid, training).unsqueeze(2)  # [B, T-1, 1, h, w]
        mask_cur = self.masks(pts[..., 2:], grid, training).unsqueeze(2)
        al_prev, al_cur = mask_prev * maps[:, :-1], mask_cur * maps[:, 1:]  # [B, T-1, C, h, w]
        z_prev, z_cur = al_prev.sum((-2, -1)), al_cur.sum((-2, -1))  # [B, T-1, C]
        loss = (1 - F.cosine_similarity(z_prev, z_cur, dim=-1)).mean()
        aligned = roles_to_frames(al_prev, al_cur).flatten(3).transpose(-1, -2)  # [B, T, N, C]
        aligned = torch.cat([cls, aligned], dim=2)
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
    """Learnable alignment before attention in every layer; backbone frozen; mean over T."""

    freeze_backbone = True
    zero_init_identity = True
    default_aux_weights = {"ila_align": 1.0}

    def __init__(
        self,
        spec: TowerSpec,
        hidden: int = 256,
        delta: float = 0.2,
        pooled_token_in_attention: bool = False,
    ) -> None:
        super().__init__(spec)
        self.layers = nn.ModuleList(ILALayer(spec.width, hidden, delta) for _ in range(spec.layers))
        self.pooled_token_in_attention = pooled_token_in_attention

    @property
    def appends_image_tokens(self) -> bool:
        return self.pooled_token_in_attention

    @torch.no_grad()
    def align_decay(self) -> None:
        """Halve the training jitter offsets (the released code calls this on a schedule)."""
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

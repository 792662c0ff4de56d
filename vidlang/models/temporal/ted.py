"""``ted`` (M2-CLIP): TED adapters on the residual stream, text adapters; backbone frozen.

TED adapter on ``x [B*T, 1+N, C]`` (bottleneck ``r = min(bottleneck, C)``, default 384):

- global temporal enhancement on all tokens: Linear C->r -> depthwise Conv1d over T (k = 3,
  zero-init) -> Linear r->C;
- local temporal difference on patches: ``D_t = x_t - x_{t-1}`` (``D_0 = 0``) -> Linear C->r ->
  depthwise Conv3d kernel (1, 3, 3) over the patch grid (zero-init) -> Linear r->C; 0 for CLS;
- output ``x + enh(x) + diff(x)``.

The enhancement's up-projection bias is zero too, so every adapter starts as the identity; the
difference path is bias-free (linear in ``D``), so it is exactly zero on a static video. Placement by
``variant``: ``"12x"`` one adapter before the MLP of each layer (``before_mlp``), ``"24x"`` one more
before attention (``before_layer``). Text adapters: ``x + up(GELU(down(x)))`` (W -> r -> W, up
projection zero-init) after the chosen text layers (``text_layers``; all by default, ``[]`` for none).

M2-CLIP trains only the adapters (lr 1e-3 x batch / 256 as the task's base lr, so the default ``lr_mults``).
Its multi-task recognition losses (soft-target video-text KL, cross-modal CE on logits, visual
linear-head CE, cross-modal MLM at weight 0.1) belong to the recognition task, not to this block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec

# variant name -> hook positions that get an adapter
from vidlang.models.temporal.base import BLOCKS

# variant name -> hook positions that get an adapter
VARIANTS: dict[str, tuple[str, ...]] = {"12x": ("mlp",), "24x": ("attn", "mlp")}


def temporal_difference(x: Tensor, frames: int) -> Tensor:
    """``x [B, T, ...]`` -> ``D [B, T, ...]`` with ``D_t = x_t - x_{t-1}`` and ``D_0 = 0``."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)


class TEDAdapter(nn.Module):
    """Temporal enhancement + temporal difference adapter (identity at init)."""

    def __init__(self, width: int, bottleneck: int, kernel_t: int = 3) -> None:
        super().__init__()
        r = bottleneck
        self.enh_down = nn.Linear(width, r)
        self.enh_conv = nn.Conv1d(r, r, kernel_t, padding=kernel_t // 2, groups=r)
        self.enh_up = nn.Linear(r, width)
        # the difference path has no biases: it is linear in D, so exactly 0 on static content
        self.diff_down = nn.Linear(width, r, bias=False)
        self.diff_conv = nn.Conv3d(r, r, (1, 3, 3), padding=(0, 1, 1), groups=r, bias=False)
        self.diff_up = nn.Linear(r, width, bias=False)
        nn.init.zeros_(self.enh_conv.weight)
        nn.init.zeros_(self.enh_conv.bias)
        nn.init.zeros_(self.diff_conv.weight)
        nn.init.zeros_(self.enh_up.bias)

    def enhancement(self, x: Tensor, b: int, t: int) -> Tensor:
        """``x [B*T, L, C]`` -> ``[B*T, L, C]``: depthwise temporal conv of every token's bottleneck."""
        h = self.enh_down(x).view(b, t, x.shape[1], -1)  # [B, T, L, r]
        h = h.permute(0, 2, 3, 1).flatten(0, 1)  # [B*L, r, T]
        h = self.enh_conv(h).view(b, x.shape[1], -1, t).permute(0, 3, 1, 2)  # [B, T, L, r]
        return self.enh_up(h).reshape(x.shape[0], x.shape[1], -1)

    def difference(self, x: Tensor, b: int, t: int, grid: tuple[int, int]) -> Tensor:
        """``x [B*T, 1+N, C]`` -> ``[B*T, 1+N, C]``: spatial depthwise conv of frame differences; 0 for CLS."""
        patches = x[:, 1:].view(b, t, grid[0], grid[1], -1)  # [B, T, h, w, C]
        d = self.diff_down(temporal_difference(patches, t))  # [B, T, h, w, r]
        d = self.diff_conv(d.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # Conv3d on [B, r, T, h, w]
        d = self.diff_up(d).reshape(x.shape[0], -1, x.shape[-1])  # [B*T, N, C]
        return torch.cat([torch.zeros_like(x[:, :1]), d], dim=1)

    def forward(self, x: Tensor, b: int, t: int, grid: tuple[int, int]) -> Tensor:
        return x + self.enhancement(x, b, t) + self.difference(x, b, t, grid)


class TextAdapter(nn.Module):
    """Residual bottleneck MLP ``x + up(GELU(down(x)))`` with a zero-initialised up projection."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


@BLOCKS.register("ted")
class TED(TemporalBlock):
    """M2-CLIP's TED adapters (vision) and text adapters; frozen CLIP; mean over T."""

    freeze_backbone = True
    zero_init_identity = True

    def __init__(
        self,
        spec: TowerSpec,
        variant: str = "12x",
        bottleneck: int = 384,
        kernel_t: int = 3,
        text_layers: Sequence[int] | None = None,
        text_bottleneck: int = 384,
    ) -> None:
        super().__init__(spec)
        if variant not in VARIANTS:
            raise ValueError(f"ted variant {variant!r} unknown; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        r = min(bottleneck, spec.width)
        self.adapters = nn.ModuleDict(
            {
                pos: nn.ModuleList(TEDAdapter(spec.width, r, kernel_t) for _ in range(spec.layers))
                for pos in VARIANTS[variant]
            }
        )
        layers = range(spec.text_layers) if text_layers is None else list(text_layers)
        bad = [i for i in layers if not 0 <= i < spec.text_layers]
        if bad:
            raise ValueError(f"ted text_layers {bad} outside the text tower's {spec.text_layers} layers")
        rt = min(text_bottleneck, spec.text_width)
        self.text_adapters = nn.ModuleDict({str(i): TextAdapter(spec.text_width, rt) for i in layers})

    def _adapt(self, pos: str, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if pos not in self.adapters:
            return x
        return self.adapters[pos][i](x, ctx.batch, ctx.frames, ctx.grid)

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._adapt("attn", i, x, ctx)

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._adapt("mlp", i, x, ctx)

    def text_after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        key = str(i)
        return self.text_adapters[key](x) if key in self.text_adapters else x

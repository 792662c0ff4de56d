"""``ted`` (M2-CLIP): TED adapters on the residual stream, a temporal conv on the frame embeddings, text
adapters; backbone frozen.

TED adapter on ``x [B*T, 1+N, C]`` (bottleneck ``r = min(bottleneck, C)``, default 384):

- global temporal enhancement on all tokens: Linear C->r -> depthwise Conv1d over T (k = 3,
  zero-init) -> Linear r->C;
- local temporal difference on patches: ``D_t = x_t - x_{t-1}`` (``D_0 = 0``) -> Linear C->r ->
  depthwise Conv3d kernel (1, 3, 3) over the patch grid (zero-init) -> Linear r->C; 0 for CLS;
- output ``x + enh(x) + diff(x)``.

The convolutions and the biases of the linear layers start at zero, so every adapter starts as the identity.
Placement by ``variant``: ``"12x"`` one adapter before the MLP of each layer (``before_mlp``), ``"24x"`` one
more before attention (``before_layer``). ``diff_bias``: the difference path's Linear / Conv3d layers carry
(zero-initialised) biases as in the official code; without them (the default) the path is linear in ``D``,
hence exactly 0 on static content also after training.

Frame adapter (``frame_adapter``, on by default): before the mean over T, the projected frame embeddings
``[B, T, E]`` go through ``x + Linear(E/2->E)(depthwise Conv1d_T(k=3)(Linear(E->E/2)(x)))`` (no activation;
the conv zero-initialised, so it starts as the identity); ``VideoOutput.frame_embeds`` are its output (what
M2-CLIP's MLM attends to).

Text adapters ``x + up(GELU(down(x)))`` (W -> r -> W) in the text layers ``text_layers`` (all by default,
``[]`` for none; negative indices count from the last layer), at ``text_position``: ``"after"`` the layer
(default) or ``"mlp"``, before the layer's MLP (official). ``text_up_init``: ``"zero"`` (default: the block
starts as frame-mean CLIP) or ``"random"`` (PyTorch's default Linear init, official: the text features change
at init). The official B/16 "12x" layout is ``text_layers=[11], text_position="mlp", text_up_init="random",
diff_bias=True``; its 13th text block (the MLM's cross-attention, with its own text adapter) is
:class:`vidlang.losses.m2clip.M2CLIPMLM`, owned by the recognition task.

M2-CLIP trains only the adapters (lr 1e-3 x batch / 256 as the task's base lr), the text adapters at half that
(``lr_mults``). Its multi-task recognition losses (soft-target video-text KL, cross-modal CE, visual linear-head
CE, cross-modal MLM) belong to the recognition task (:mod:`vidlang.losses.m2clip`), not to this block.

Deviations from the official code:

- Defaults: text adapters after every text layer with a zero up-projection, and a bias-free difference path
  (vidlang's identity-at-init variant); the official layout is one argument set away (above).
- Checkpoints written before the frame adapter existed load with it at its identity init (same outputs).
- The video mask of short clips is not honoured (the adapters mix frames inside the image tower):
  ``uses_video_mask`` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS

# variant name -> hook positions that get an adapter
VARIANTS: dict[str, tuple[str, ...]] = {"12x": ("mlp",), "24x": ("attn", "mlp")}
TEXT_POSITIONS = ("after", "mlp")  # text adapter after the layer, or before its MLP (official)
TEXT_UP_INITS = ("zero", "random")  # text adapter up-projection: zero (identity at init) or PyTorch default


def temporal_difference(x: Tensor, frames: int) -> Tensor:
    """``x [B, T, ...]`` -> ``D [B, T, ...]`` with ``D_t = x_t - x_{t-1}`` and ``D_0 = 0``."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)


class TEDAdapter(nn.Module):
    """Temporal enhancement + temporal difference adapter (identity at init)."""

    def __init__(self, width: int, bottleneck: int, kernel_t: int = 3, diff_bias: bool = False) -> None:
        super().__init__()
        r = bottleneck
        self.enh_down = nn.Linear(width, r)
        self.enh_conv = nn.Conv1d(r, r, kernel_t, padding=kernel_t // 2, groups=r)
        self.enh_up = nn.Linear(r, width)
        # without biases the difference path is linear in D, so exactly 0 on static content
        self.diff_down = nn.Linear(width, r, bias=diff_bias)
        self.diff_conv = nn.Conv3d(r, r, (1, 3, 3), padding=(0, 1, 1), groups=r, bias=diff_bias)
        self.diff_up = nn.Linear(r, width, bias=diff_bias)
        nn.init.zeros_(self.enh_conv.weight)
        nn.init.zeros_(self.diff_conv.weight)
        for layer in (self.enh_down, self.enh_conv, self.enh_up, self.diff_down, self.diff_conv, self.diff_up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

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


class FrameAdapter(nn.Module):
    """M2-CLIP's temporal conv on the projected frame embeddings: ``x + up(conv_T(down(x)))`` on ``[B, T, E]``.

    ``down`` E -> E/2 and ``up`` E/2 -> E (PyTorch default weights, zero biases), a depthwise Conv1d over T
    (kernel 3, weight and bias zero: the identity at init); no activation.
    """

    def __init__(self, embed_dim: int, kernel_t: int = 3) -> None:
        super().__init__()
        r = max(1, embed_dim // 2)
        self.down = nn.Linear(embed_dim, r)
        self.conv = nn.Conv1d(r, r, kernel_t, padding=kernel_t // 2, groups=r)
        self.up = nn.Linear(r, embed_dim)
        for p in (self.down.bias, self.conv.weight, self.conv.bias, self.up.bias):
            nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, E] -> [B, T, E]
        h = self.conv(self.down(x).transpose(1, 2)).transpose(1, 2)  # [B, T, E/2]
        return x + self.up(h)


class TextAdapter(nn.Module):
    """Residual bottleneck MLP ``x + up(GELU(down(x)))`` (biases zero; ``up_init``: ``"zero"`` weight, the
    identity at init, or ``"random"``, PyTorch's default as M2-CLIP)."""

    def __init__(self, width: int, bottleneck: int, up_init: str = "zero") -> None:
        super().__init__()
        if up_init not in TEXT_UP_INITS:
            raise ValueError(f"text adapter up_init {up_init!r} unknown; choose one of {TEXT_UP_INITS}")
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if up_init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


@BLOCKS.register("ted")
class TED(TemporalBlock):
    """M2-CLIP's TED adapters (vision), frame adapter and text adapters; frozen CLIP; mean over T."""

    freeze_backbone = True
    zero_init_identity = True  # with the default text_up_init="zero"
    lr_mults = {"": 1.0, "text_adapters": 0.5}  # M2-CLIP: text adapters at half the adapters' lr

    def __init__(
        self,
        spec: TowerSpec,
        variant: str = "12x",
        bottleneck: int = 384,
        kernel_t: int = 3,
        text_layers: Sequence[int] | None = None,
        text_bottleneck: int = 384,
        frame_adapter: bool = True,
        text_position: str = "after",
        text_up_init: str = "zero",
        diff_bias: bool = False,
    ) -> None:
        super().__init__(spec)
        if variant not in VARIANTS:
            raise ValueError(f"ted variant {variant!r} unknown; choose one of {sorted(VARIANTS)}")
        if text_position not in TEXT_POSITIONS:
            raise ValueError(f"ted text_position {text_position!r} unknown; choose one of {TEXT_POSITIONS}")
        self.variant = variant
        self.text_position = text_position
        r = min(bottleneck, spec.width)
        self.adapters = nn.ModuleDict(
            {
                pos: nn.ModuleList(TEDAdapter(spec.width, r, kernel_t, diff_bias) for _ in range(spec.layers))
                for pos in VARIANTS[variant]
            }
        )
        self.frame_adapter = FrameAdapter(spec.embed_dim) if frame_adapter else None
        n = spec.text_layers
        layers = range(n) if text_layers is None else list(text_layers)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"ted text_layers {bad} outside the text tower's {n} layers")
        rt = min(text_bottleneck, spec.text_width)
        self.text_adapters = nn.ModuleDict(
            {str(i % n): TextAdapter(spec.text_width, rt, text_up_init) for i in sorted({i % n for i in layers})}
        )

    def _adapt(self, pos: str, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if pos not in self.adapters:
            return x
        return self.adapters[pos][i](x, ctx.batch, ctx.frames, ctx.grid)

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._adapt("attn", i, x, ctx)

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._adapt("mlp", i, x, ctx)

    def _text_adapt(self, position: str, i: int, x: Tensor) -> Tensor:
        key = str(i)
        if position != self.text_position or key not in self.text_adapters:
            return x
        return self.text_adapters[key](x)

    def text_before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._text_adapt("mlp", i, x)

    def text_after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return self._text_adapt("after", i, x)

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        if self.frame_adapter is not None:
            frame_embeds = self.frame_adapter(frame_embeds)  # [B, T, E]
        return VideoOutput(embeds=frame_embeds.mean(dim=1), frame_embeds=frame_embeds)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints from before the frame adapter: it loads at its identity init (conv zero: same outputs)
        key = prefix + "frame_adapter."
        if self.frame_adapter is not None and not any(k.startswith(key) for k in state_dict):
            for name, value in self.frame_adapter.state_dict().items():
                state_dict[key + name] = torch.zeros_like(value) if name.startswith("conv.") else value.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

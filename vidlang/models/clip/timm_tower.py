"""Any timm ViT (CLIP, EVA/EVA02, DINOv2, DeiT ...) as an image tower with vidlang's hook points.

Same forward contract as :class:`vidlang.models.clip.image.ClipImageTower`: ``video [B, T, 3, H, W]``
-> :class:`ImageOutput` with ``frame_tokens [B, T, 1+N, C]`` (after the trunk's final norm) and
``frame_embeds [B, T, E]``. The block loop is re-implemented so the hooks run inside each layer::

    patch_embed -> _pos_embed (+cls) -> embed -> norm_pre
    for i: before_layer(i) -> x + ls1(attn(attn_input(i, norm1(x)))) -> before_mlp(i)
           -> x + ls2(mlp(norm2(x))) -> after_layer(i)
    norm (all tokens) -> timm's pooling + fc_norm (``forward_head(pre_logits=True)``) -> @ proj

The projection to E is a new ``proj [C, E]`` parameter, or timm's own ``head`` when the trunk is
created with ``num_classes=E`` (timm CLIP checkpoints keep the CLIP projection there).

Limits: the trunk must have exactly one prefix token (a class token, no registers), because blocks
address tokens as ``[CLS, patches...]``; with rotary embeddings (EVA02) blocks must not append tokens.
Constructors never download: ``timm.create_model(..., pretrained=False)``; weights come from a local file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vidlang.models.clip.configs import ImageConfig
from vidlang.models.clip.tower_base import ImageTower, Transform
from vidlang.registry import Registry

# (timm block, x [N, L, C], attn_input, before_mlp, rope) -> x
LayerRunner = Callable[[nn.Module, Tensor, Transform, Transform, Tensor | None], Tensor]
LAYER_RUNNERS: Registry[LayerRunner] = Registry("timm block runner")


@LAYER_RUNNERS.register("Block")
def run_vit_layer(
    blk: nn.Module, x: Tensor, attn_input: Transform, before_mlp: Transform, rope: Tensor | None
) -> Tensor:
    """timm ``vision_transformer.Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2."""
    h = blk.norm1(x)
    if attn_input is not None:
        h = attn_input(h)
    x = x + blk.drop_path1(blk.ls1(blk.attn(h)))
    if before_mlp is not None:
        x = before_mlp(x)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@LAYER_RUNNERS.register("EvaBlock")
def run_eva_layer(
    blk: nn.Module, x: Tensor, attn_input: Transform, before_mlp: Transform, rope: Tensor | None
) -> Tensor:
    """timm ``eva.EvaBlock``: norm1, attn(rope), gamma_1, drop_path1, norm2, mlp, gamma_2, drop_path2."""
    h = blk.norm1(x)
    if attn_input is not None:
        h = attn_input(h)
    a = blk.attn(h, rope=rope)
    x = x + blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a)
    if before_mlp is not None:
        x = before_mlp(x)
    m = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)


class TimmImageTower(ImageTower):
    """A timm ViT trunk + projection, running the temporal-block hooks like ``ClipImageTower``.

    ``proj_dim`` is E (``embed_dim`` in ``timm_kwargs`` is timm's width C); ``weights`` a local file.
    Forward and hooks: :class:`~vidlang.models.clip.tower_base.ImageTower`. Built by
    :func:`vidlang.models.factory.build_model` for ``ModelConfig.image = "timm:<timm model name>"``.
    """

    kind = "timm"

    def __init__(
        self,
        model_name: str,
        proj_dim: int = 512,
        weights: str | Path | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        timm_kwargs.setdefault("num_classes", 0)
        self.trunk = timm.create_model(model_name, pretrained=False, **timm_kwargs)
        t = self.trunk
        if getattr(t, "num_prefix_tokens", 0) != 1 or getattr(t, "cls_token", None) is None:
            raise ValueError(
                f"timm model {model_name!r} has {getattr(t, 'num_prefix_tokens', 0)} prefix tokens; vidlang's hooks "
                "need exactly one class token and no register tokens"
            )
        self.runners = [self._runner(type(b).__name__, model_name) for b in t.blocks]
        width = t.embed_dim
        if timm_kwargs["num_classes"]:
            self.proj = None  # timm's head projects to num_classes
            proj_dim = timm_kwargs["num_classes"]
        else:
            self.proj = nn.Parameter(width**-0.5 * torch.randn(width, proj_dim))  # [C, E]
        patch = t.patch_embed.patch_size[0]
        cfg_mean = tuple(t.pretrained_cfg.get("mean", ImageConfig.image_mean))
        cfg_std = tuple(t.pretrained_cfg.get("std", ImageConfig.image_std))
        heads = getattr(t.blocks[0].attn, "num_heads", max(1, width // 64))
        self.cfg = ImageConfig(
            width=width,
            layers=len(t.blocks),
            heads=heads,
            patch_size=patch,
            image_size=t.patch_embed.img_size[0],
            embed_dim=proj_dim,
            act="gelu",
            image_mean=cfg_mean,
            image_std=cfg_std,
        )
        self.grid = tuple(t.patch_embed.grid_size)
        if weights is not None:
            self.load_trunk_weights(weights)

    @property
    def rotary(self) -> bool:
        return getattr(self.trunk, "rope", None) is not None  # EVA02-style rotary position embeddings

    @staticmethod
    def _runner(block_type: str, model_name: str) -> LayerRunner:
        if block_type not in LAYER_RUNNERS:
            raise ValueError(
                f"timm model {model_name!r} uses block type {block_type}, which has no hook runner "
                f"(supported: {', '.join(LAYER_RUNNERS.names())})"
            )
        return LAYER_RUNNERS.get(block_type)

    def load_trunk_weights(self, path: str | Path) -> None:
        """Load timm weights from a local file (safe loading only), through the model's own key filter."""
        from vidlang.models.clip.convert import unwrap_state_dict
        from vidlang.models.clip.pretrained import read_state_file

        sd = unwrap_state_dict(read_state_file(path))
        filter_fn = getattr(sys.modules[type(self.trunk).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, self.trunk)
        if not self.trunk.num_classes:  # the classifier / projection head is not used
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = self.trunk.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match the timm trunk: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )

    def layer_list(self) -> nn.ModuleList:
        return self.trunk.blocks

    def embed_frames(self, frames: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """``[N, 3, H, W]`` -> tokens ``[N, 1+Np, C]`` (cls + pos embed), rotary embedding or None, grid."""
        t = self.trunk
        p = t.patch_embed.patch_size
        grid = (frames.shape[-2] // p[0], frames.shape[-1] // p[1])
        x = t.patch_embed(frames)
        out = t._pos_embed(x)
        x, rope = out if isinstance(out, tuple) else (out, None)
        if getattr(t, "patch_drop", None) is not None and not isinstance(out, tuple):
            x = t.patch_drop(x)
        return x, rope, grid

    def pre_norm(self, x: Tensor) -> Tensor:
        return self.trunk.norm_pre(x)

    def run_layer(self, i: int, x: Tensor, attn_input: Transform, before_mlp: Transform, rope: Tensor | None) -> Tensor:
        if rope is not None and getattr(self.trunk, "rope_mixed", False):
            rope = rope[i]  # one rotary embedding per layer
        return self.runners[i](self.trunk.blocks[i], x, attn_input, before_mlp, rope)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.trunk.norm(x)

    def project(self, x: Tensor) -> Tensor:
        pooled = self.trunk.forward_head(x, pre_logits=self.proj is not None)  # [N, C] (or [N, E] via head)
        return pooled @ self.proj if self.proj is not None else pooled  # [N, E]


__all__ = ["LAYER_RUNNERS", "TimmImageTower", "run_eva_layer", "run_vit_layer"]

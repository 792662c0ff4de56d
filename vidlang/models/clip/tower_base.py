"""What the towers share: ``width``/``embed_dim``, gradient checkpointing, the layer loop and the hook plumbing.

:class:`Tower` is the base of the text and image towers. :class:`ImageTower` adds the ViT forward with the
hook points of the temporal-block contract (:mod:`vidlang.models.contract`), written once for
:class:`~vidlang.models.clip.image.ClipImageTower` and :class:`~vidlang.models.clip.timm_tower.TimmImageTower`::

    embed_frames -> embed -> pre_norm
    for i: before_layer(i) -> run_layer(i, attn_input, before_mlp) -> after_layer(i)
    final_norm (all tokens) -> project

With gradient checkpointing each layer *including its hooks* is one checkpointed unit, so the hooks run
again during backward: they must be functions of their inputs and parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vidlang.models.contract import HookContext, TemporalBlock, TextTowerView

Transform = Callable[[Tensor], Tensor] | None


@dataclass
class ImageOutput:
    frame_tokens: Tensor  # [B, T, 1+N, C] last-layer tokens after the final norm
    frame_embeds: Tensor  # [B, T, E] projected CLS (or pooled) feature
    ctx: HookContext  # the context the hooks saw (aux losses, state)


def resolve_hooks(block: TemporalBlock | None, hooks: frozenset[str] | None) -> frozenset[str]:
    """``hooks`` as given, else the hooks ``block`` implements (none without a block)."""
    if hooks is not None:
        return hooks
    return block.implemented_hooks() if block is not None else frozenset()


def check_tokens_removed(
    x: Tensor, expected: int, block: TemporalBlock | None, tokens: str = "tokens", added: str = "appended"
) -> None:
    """Raise when a block left extra tokens in ``x [N, L, C]`` after the last layer (``L != expected``)."""
    if x.shape[1] != expected:
        raise RuntimeError(
            f"temporal block {type(block).__name__} left {x.shape[1]} {tokens} after the last layer; "
            f"it must remove the tokens it {added} (expected {expected})"
        )


class Tower(nn.Module):
    """Base of the towers: ``cfg`` (with ``width`` and ``embed_dim``), gradient checkpointing, the layer loop."""

    cfg: Any
    gradient_checkpointing: bool = False

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def layer_list(self) -> nn.ModuleList:
        """The transformer layers."""
        return self.layers

    def compile_layers(self, **kwargs: Any) -> None:
        """``torch.compile`` every transformer layer in place (``nn.Module.compile``: parameter names, state dicts
        and the hook calls between layers are unchanged). ``kwargs`` go to ``torch.compile``."""
        for layer in self.layer_list():
            layer.compile(**kwargs)

    def run_layers(self, layer: Callable[..., Tensor], num_layers: int, x: Tensor, *args: Any) -> Tensor:
        """``x = layer(i, x, *args)`` for each ``i < num_layers``; each call is one checkpointed unit when
        gradient checkpointing is on and gradients are enabled."""
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i in range(num_layers):
            x = checkpoint(layer, i, x, *args, use_reentrant=False) if use_ckpt else layer(i, x, *args)
        return x


class ImageTower(Tower, ABC):
    """A ViT image tower with the hook points: ``video [B, T, 3, H, W]`` -> :class:`ImageOutput`.

    A subclass provides ``kind`` (see :data:`vidlang.models.contract.IMAGE_TOWER_KINDS`), ``grid``, ``layer_list``
    (its transformer layers), ``embed_frames``, ``pre_norm``, ``run_layer``, ``final_norm`` and ``project``; what
    blocks may read of it is :class:`~vidlang.models.contract.ImageTowerView`.
    """

    kind: ClassVar[str]
    grid: tuple[int, int]

    @property
    def rotary(self) -> bool:
        """True if attention uses rotary position embeddings (then blocks must not append tokens)."""
        return False

    def class_position_embedding(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The class embedding ``[C]`` and the position embedding ``[1+N, C]`` for ``grid``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its class / position embeddings")

    def forward(
        self,
        video: Tensor,
        block: TemporalBlock | None = None,
        hooks: frozenset[str] | None = None,
        state: dict | None = None,
        text_tower: TextTowerView | None = None,
    ) -> ImageOutput:
        """``video [B, T, 3, H, W]`` (normalised float) -> :class:`ImageOutput`.

        ``hooks`` is ``block.implemented_hooks()``, computed once by the caller (computed here if None).
        ``state`` seeds the per-call ``HookContext.state``; ``text_tower`` (the model's) is handed to the hooks
        and to ``pool`` in ``ctx.text_tower``, this tower in ``ctx.image_tower``.
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"{type(self).__name__} expects video [B, T, 3, H, W], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        hooks = resolve_hooks(block, hooks)
        x, rope, grid = self.embed_frames(video.flatten(0, 1))  # [B*T, 1+N, C]
        ctx = HookContext(batch=b, frames=t, grid=grid, training=self.training, state=dict(state or {}),
                          image_tower=self, text_tower=text_tower)
        n_tokens = x.shape[1]
        if "embed" in hooks:
            x = block.embed(x, ctx)
        x = self.pre_norm(x)
        x = self.run_layers(self._layer, len(self.layer_list()), x, rope, block, hooks, ctx)
        check_tokens_removed(x, n_tokens, block)
        x = self.final_norm(x)  # [B*T, 1+N, C]
        embeds = self.project(x)  # [B*T, E]
        return ImageOutput(frame_tokens=x.view(b, t, n_tokens, -1), frame_embeds=embeds.view(b, t, -1), ctx=ctx)

    def _layer(
        self,
        i: int,
        x: Tensor,
        rope: Tensor | None,
        block: TemporalBlock | None,
        hooks: frozenset[str],
        ctx: HookContext,
    ) -> Tensor:
        """One transformer layer with its hooks (the unit of gradient checkpointing)."""
        if "before_layer" in hooks:
            x = block.before_layer(i, x, ctx)
        attn_input = (lambda h: block.attn_input(i, h, ctx)) if "attn_input" in hooks else None
        before_mlp = (lambda r: block.before_mlp(i, r, ctx)) if "before_mlp" in hooks else None
        x = self.run_layer(i, x, attn_input, before_mlp, rope)
        if "after_layer" in hooks:
            x = block.after_layer(i, x, ctx)
        return x

    @abstractmethod
    def layer_list(self) -> nn.ModuleList:
        """The transformer layers."""

    @abstractmethod
    def embed_frames(self, frames: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """``[N, 3, H, W]`` -> tokens ``[N, 1+Np, C]``, rotary embedding (or None) and the patch grid."""

    @abstractmethod
    def pre_norm(self, x: Tensor) -> Tensor:
        """The norm before the first layer."""

    @abstractmethod
    def run_layer(self, i: int, x: Tensor, attn_input: Transform, before_mlp: Transform, rope: Tensor | None) -> Tensor:
        """Layer ``i`` on ``x [N, L, C]`` with the block's ``attn_input`` / ``before_mlp`` transforms."""

    @abstractmethod
    def final_norm(self, x: Tensor) -> Tensor:
        """The norm after the last layer, on all tokens."""

    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """Normalised tokens ``[N, 1+Np, C]`` -> embeddings ``[N, E]``."""


__all__ = ["ImageTower", "Tower", "ImageOutput", "check_tokens_removed", "resolve_hooks"]

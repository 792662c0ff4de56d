"""The video-text model: image tower (with hook points) + temporal block + text tower."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vidlang.models.clip.text import TextTower
from vidlang.models.clip.tower_base import ImageTower
from vidlang.models.contract import TemporalBlock, TextOutput, VideoOutput
from vidlang.models.optim import join, lookup, param_groups


@dataclass
class VideoTextOutput:
    video: VideoOutput | None
    text: TextOutput | None
    logit_scale: Tensor  # [] exp(logit_scale), the contrastive temperature inverse

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in (self.text, self.video):
            if part is not None:
                out.update(part.aux_losses)
        return out


class VideoTextModel(nn.Module):
    """``image_tower`` + ``block`` + ``text_tower`` + ``logit_scale`` (log of the inverse temperature).

    The towers call only the hooks the block implements (computed once here). Parameter names:
    ``image_tower.*``, ``text_tower.*``, ``block.*``, ``logit_scale``.

    The optimisation recipe (:meth:`param_groups`): ``lr_mults`` / ``weight_decays`` map parameter-name prefixes
    to an lr multiplier / a weight decay (longest prefix wins, see :mod:`vidlang.models.optim`): the block's
    declared ones (relative to it, so under ``block.``) overridden by the given ones (``ModelConfig.lr_mults`` /
    ``weight_decays``), e.g. ``{"block": 10, "block.aggregate": 1, "image_tower": 0.1}``.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        block: TemporalBlock,
        logit_scale_init: float = math.log(1 / 0.07),
        lr_mults: Mapping[str, float] | None = None,
        weight_decays: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if image_tower.embed_dim != text_tower.embed_dim:
            raise ValueError(
                f"image tower embeds to {image_tower.embed_dim} but text tower to {text_tower.embed_dim}"
            )
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.block = block
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self._hooks = block.implemented_hooks()
        self.lr_mults = {**{join("block", k): v for k, v in block.lr_mults.items()}, **(lr_mults or {})}
        self.weight_decays = {**{join("block", k): v for k, v in block.weight_decays.items()}, **(weight_decays or {})}
        self.freeze_policy = "full"
        self.block_weights_loaded = False  # the block's weights came from a pretrained source (build_model)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parameters under this model's recipe (``lr`` and ``weight_decay``
        are the task's base values): see :func:`vidlang.models.optim.param_groups`."""
        return param_groups(self, lr, weight_decay, self.lr_mults, self.weight_decays)

    def lr_mult(self, name: str) -> float:
        """The lr multiplier of parameter (or module) ``name``, e.g. ``"block"``."""
        return lookup(self.lr_mults, name, 1.0)

    @property
    def embed_dim(self) -> int:
        return self.image_tower.embed_dim

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.image_tower.cfg.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.image_tower.cfg.image_std

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.image_tower.set_gradient_checkpointing(enabled)
        self.text_tower.set_gradient_checkpointing(enabled)

    def encode_video(self, video: Tensor, state: dict | None = None) -> VideoOutput:
        """``video [B, T, 3, H, W]`` normalised float -> :class:`VideoOutput` (embeds ``[B, E]``, not normalised).

        ``state`` seeds ``HookContext.state`` for this call (e.g. ``{"caption_ids": ...}`` for blocks
        with a captioning head)."""
        vis = self.image_tower(video, self.block, self._hooks, state=state, text_tower=self.text_tower)
        out = self.block.pool(vis.frame_tokens, vis.frame_embeds, vis.ctx)
        out.aux_losses = {**vis.ctx.aux_losses, **out.aux_losses}
        return out

    def encode_image(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` -> per-image embeddings ``[B, E]`` (one-frame videos through the tower)."""
        return self.image_tower(images[:, None], self.block, self._hooks, text_tower=self.text_tower).frame_embeds[:, 0]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextOutput:
        """``input_ids [A, Lt]``, ``attention_mask [A, Lt]`` -> :class:`TextOutput` (embeds ``[A, E]``)."""
        return self.text_tower(input_ids, attention_mask, self.block, self._hooks)

    def caption_state(
        self, input_ids: Tensor, attention_mask: Tensor | None, caption_index: Tensor | None, num_videos: int
    ) -> dict | None:
        """Hook state carrying one caption per video (``caption_ids [B, Lt]``) for blocks with a
        captioning head (``block.wants_caption_ids``) while training; ``None`` otherwise.

        ``caption_index [A]`` maps captions to videos (None: caption i belongs to video i); each video
        takes its first caption. Videos without any caption leave the state out (no caption loss)."""
        if not (self.training and self.block.wants_caption_ids):
            return None
        if caption_index is None:
            if input_ids.shape[0] != num_videos:
                return None
            first = torch.arange(num_videos, device=input_ids.device)
        else:
            order = torch.arange(caption_index.shape[0], device=caption_index.device)
            first = torch.full((num_videos,), -1, dtype=torch.long, device=caption_index.device)
            first.scatter_reduce_(0, caption_index, order, reduce="amin", include_self=False)
            if (first < 0).any():
                return None
        state = {"caption_ids": input_ids[first]}
        if attention_mask is not None:
            state["caption_mask"] = attention_mask[first]
        return state

    def forward(
        self,
        video: Tensor | None = None,  # [B, T, 3, H, W]
        input_ids: Tensor | None = None,  # [A, Lt]
        attention_mask: Tensor | None = None,  # [A, Lt]
        caption_index: Tensor | None = None,  # [A] video of each caption (None: caption i -> video i)
    ) -> VideoTextOutput:
        state = None
        if video is not None and input_ids is not None:
            state = self.caption_state(input_ids, attention_mask, caption_index, video.shape[0])
        v = self.encode_video(video, state=state) if video is not None else None
        t = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        return VideoTextOutput(video=v, text=t, logit_scale=self.logit_scale.exp())

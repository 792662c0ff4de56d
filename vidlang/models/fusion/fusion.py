"""Audio-visual fusion for retrieval / recognition (registry ``FUSIONS``).

Every fusion module has the signature::

    fusion(video_embeds [B, E], audio_tokens [B, Qa, D], audio_mask [B] bool, video_tokens [B, Qv, Dv] | None)
        -> fused video embeddings [B, E]

and the guarantees: rows whose ``audio_mask`` is False are returned *exactly* as ``video_embeds``
(the audio tokens of such rows are never read), and every module starts as the identity
(zero-initialised gate / output projection), so adding audio to a trained video model changes nothing
until the fusion is trained. ``symile`` is the exception: it returns Symile's video-side vector for the Symile loss
(:class:`SymileFusion`).

``AudioVisualModel`` wraps a ``VideoTextModel`` + ``AudioBranch`` + fusion into one retrieval model:
``encode_video(video, audio_mel, audio_mask)`` returns the fused ``VideoOutput``; text goes through the
wrapped model unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.audio.encoder import AudioBranch
from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.optim import DEFAULT_GROUP, param_groups
from vidlang.models.video_clip import VideoTextModel, VideoTextOutput
from vidlang.registry import Registry

FUSIONS: Registry[type[nn.Module]] = Registry("audio-visual fusion")


def _keep_video(fused: Tensor, video_embeds: Tensor, audio_mask: Tensor) -> Tensor:
    """Rows without audio get exactly the video embedding."""
    return torch.where(audio_mask.to(fused.device, torch.bool)[:, None], fused, video_embeds)


@FUSIONS.register("none")
class NoFusion(nn.Module):
    """Ignores audio: the video-only baseline."""

    def __init__(self, embed_dim: int, audio_dim: int, **kwargs: Any) -> None:
        super().__init__()

    def forward(
        self, video_embeds: Tensor, audio_tokens: Tensor, audio_mask: Tensor, video_tokens: Tensor | None = None
    ) -> Tensor:
        return video_embeds


@FUSIONS.register("gated_sum")
class GatedSum(nn.Module):
    """``v + tanh(g) * Linear(LN(mean_q audio))``, one gate per channel, ``g`` zero-initialised."""

    def __init__(self, embed_dim: int, audio_dim: int, **kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(audio_dim)
        self.proj = nn.Linear(audio_dim, embed_dim)
        self.gate = nn.Parameter(torch.zeros(embed_dim))  # [E]

    def forward(
        self, video_embeds: Tensor, audio_tokens: Tensor, audio_mask: Tensor, video_tokens: Tensor | None = None
    ) -> Tensor:
        audio = self.proj(self.norm(audio_tokens.mean(dim=1)))  # [B, E]
        fused = video_embeds + torch.tanh(self.gate) * audio.to(video_embeds.dtype)
        return _keep_video(fused, video_embeds, audio_mask)


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """The (normed) video embedding, as one query, attends to the (normed) audio tokens; the attention output
    goes through a zero-initialised projection and is added to the video embedding."""

    def __init__(self, embed_dim: int, audio_dim: int, heads: int = 8, **kwargs: Any) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"cross_attention fusion: embed_dim {embed_dim} is not divisible by {heads} heads")
        self.norm_q = nn.LayerNorm(embed_dim)
        self.norm_kv = nn.LayerNorm(audio_dim)
        self.attn = nn.MultiheadAttention(embed_dim, heads, kdim=audio_dim, vdim=audio_dim, batch_first=True)
        self.out = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, video_embeds: Tensor, audio_tokens: Tensor, audio_mask: Tensor, video_tokens: Tensor | None = None
    ) -> Tensor:
        q = self.norm_q(video_embeds)[:, None]  # [B, 1, E]
        kv = self.norm_kv(audio_tokens.to(q.dtype))  # [B, Qa, D]
        attended, _ = self.attn(q, kv, kv, need_weights=False)  # [B, 1, E]
        fused = video_embeds + self.out(attended[:, 0])
        return _keep_video(fused, video_embeds, audio_mask)


@FUSIONS.register("symile")
class SymileFusion(nn.Module):
    """Audio as its own modality for the Symile loss (``contrastive.loss: symile``, :mod:`vidlang.losses.symile`).

    :meth:`audio_embeds` is the clip's audio embedding ``u = Linear(LN(mean_q audio tokens))`` ``[B, E]`` that the
    loss scores against the unfused video embedding and the caption. The forward returns Symile's video-side
    vector ``w = sqrt(E) * normalize(v) * normalize(u)`` (element-wise), for which ``t . w`` is the triple's score
    ``sqrt(E) * MIP(v, u, t)`` the loss trains (``t`` normalised): retrieval ranks by that raw dot product, not by
    a cosine. A clip without audio takes the neutral ``u = 1 / sqrt(E)``, so ``w = normalize(v)`` and its score is
    the video-text cosine. Two exceptions to the fusion guarantees: rows without audio are the *normalised* video
    embedding (same direction), and the module is not the identity at initialisation (it is trained with Symile
    from the start)."""

    def __init__(self, embed_dim: int, audio_dim: int, **kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(audio_dim)
        self.proj = nn.Linear(audio_dim, embed_dim)

    def audio_embeds(self, audio_tokens: Tensor) -> Tensor:
        """``audio_tokens [B, Qa, D]`` -> the unnormalised audio embeddings ``[B, E]``."""
        return self.proj(self.norm(audio_tokens.mean(dim=1)))

    def forward(
        self, video_embeds: Tensor, audio_tokens: Tensor, audio_mask: Tensor, video_tokens: Tensor | None = None
    ) -> Tensor:
        video = F.normalize(video_embeds.float(), dim=-1)  # [B, E]
        audio = F.normalize(self.audio_embeds(audio_tokens).float(), dim=-1)  # [B, E]
        # the loss's neutral audio (vidlang.losses.symile.neutral_audio): sqrt(E) x v x 1/sqrt(E) = v
        w = torch.where(audio_mask.to(video.device, torch.bool)[:, None], math.sqrt(video.shape[-1]) * video * audio,
                        video)
        return w.to(video_embeds.dtype)


def build_fusion(name: str, embed_dim: int, audio_dim: int, **kwargs: Any) -> nn.Module:
    return FUSIONS.build(name, embed_dim, audio_dim, **kwargs)


class AudioVisualModel(nn.Module):
    """``VideoTextModel`` + ``AudioBranch`` + a fusion: audio-aware video embeddings for retrieval.

    Parameter names: ``video_model.*``, ``audio.*``, ``fusion.*``. ``freeze_video=True`` freezes the
    wrapped video-text model (train only the audio branch and the fusion). The audio input is what
    ``LogMelFrontend`` returns: ``audio_mel [B, S, 1, M, F]`` and ``audio_mask [B]``.

    Optimisation recipe (:meth:`param_groups`): the video model's own, plus ``lr_mults`` / ``weight_decays`` for
    the new parts by prefix (``audio``, ``fusion``, ``audio.qformer`` ...; ``""`` = both), as in
    :mod:`vidlang.models.optim`; their groups are named ``audio_*`` unless a longer prefix names them.
    """

    def __init__(
        self,
        video_model: VideoTextModel,
        audio: AudioBranch,
        fusion: str = "gated_sum",
        fusion_args: dict[str, Any] | None = None,
        freeze_video: bool = False,
        lr_mults: Mapping[str, float] | None = None,
        weight_decays: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.video_model = video_model
        self.audio = audio
        self.fusion = build_fusion(fusion, video_model.embed_dim, audio.dim, **(fusion_args or {}))
        self.lr_mults, self.weight_decays = dict(lr_mults or {}), dict(weight_decays or {})
        if freeze_video:
            self.video_model.requires_grad_(False)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The video model's groups, then those of the audio branch and the fusion (see the class docstring)."""
        groups = self.video_model.param_groups(lr, weight_decay)
        new_parts = nn.ModuleDict({"audio": self.audio, "fusion": self.fusion})
        for g in param_groups(new_parts, lr, weight_decay, self.lr_mults, self.weight_decays):
            if g["name"].startswith(f"{DEFAULT_GROUP}_"):
                g["name"] = "audio" + g["name"][len(DEFAULT_GROUP) :]
            groups.append(g)
        return groups

    @property
    def embed_dim(self) -> int:
        return self.video_model.embed_dim

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.video_model.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.video_model.image_std

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.video_model.logit_scale

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.video_model.set_gradient_checkpointing(enabled)

    def encode_video(
        self, video: Tensor, audio_mel: Tensor | None = None, audio_mask: Tensor | None = None,
        state: dict | None = None,
    ) -> VideoOutput:
        """video [B, T, 3, H, W], audio_mel [B, S, 1, M, F] | None, audio_mask [B] -> fused VideoOutput.

        ``state`` seeds the temporal block's hook state (as in :meth:`VideoTextModel.encode_video`)."""
        out = self.video_model.encode_video(video, state=state)
        if audio_mel is None:
            return out
        if audio_mel.shape[0] != video.shape[0]:
            raise ValueError(f"audio batch {audio_mel.shape[0]} != video batch {video.shape[0]}")
        audio = self.audio(audio_mel, audio_mask)
        out.embeds = self.fusion(out.embeds, audio.tokens, audio.mask, out.tokens)  # [B, E]
        return out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextOutput:
        return self.video_model.encode_text(input_ids, attention_mask)

    def forward(
        self,
        video: Tensor | None = None,  # [B, T, 3, H, W]
        input_ids: Tensor | None = None,  # [A, Lt]
        attention_mask: Tensor | None = None,  # [A, Lt]
        audio_mel: Tensor | None = None,  # [B, S, 1, M, F]
        audio_mask: Tensor | None = None,  # [B] bool
    ) -> VideoTextOutput:
        v = self.encode_video(video, audio_mel, audio_mask) if video is not None else None
        t = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        return VideoTextOutput(video=v, text=t, logit_scale=self.logit_scale.exp())

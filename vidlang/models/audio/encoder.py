"""Audio encoder: spectrogram backbone per segment -> segment position embedding -> audio Q-former.

Backbones (registry ``AUDIO_BACKBONES``) map normalised log-mel images ``[N, 1, M, F]`` to one
embedding per segment ``[N, width]``:

- ``vit``: a small spectrogram ViT (overlapping 16x16 patches with stride 10 as AST / ImageBind,
  CLS token, learnable position embedding, pre-LN transformer, final LayerNorm, CLS output).
- ``ast``: a pretrained Audio Spectrogram Transformer from a *local* Hugging Face directory
  (``transformers.ASTModel.from_pretrained(path, local_files_only=True)``), pooled output.

``AudioBranch`` (Video-LLaMA's audio branch): backbone per segment -> ``[B, S, width]`` + segment
position embedding -> ``QFormer`` (8 queries, 2 layers) -> ``[B, Qa, D]``. Samples whose ``mask`` is
False (no audio) are not encoded; their rows of ``tokens`` are zero and must be ignored via ``mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vidlang.models.qformer import QFormer
from vidlang.registry import Registry

AUDIO_BACKBONES: Registry[type[nn.Module]] = Registry("audio backbone")


@AUDIO_BACKBONES.register("vit")
class SpectrogramViT(nn.Module):
    """ViT over a log-mel image ``[N, 1, num_mel_bins, frames]`` -> CLS features ``[N, width]``."""

    def __init__(
        self,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        patch_size: int = 16,
        stride: int = 10,
        num_mel_bins: int = 128,
        frames: int = 204,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_mel_bins < patch_size or frames < patch_size:
            raise ValueError(f"spectrogram {num_mel_bins}x{frames} is smaller than one {patch_size}x{patch_size} patch")
        self.width = width
        self.input_size = (num_mel_bins, frames)
        self.grid = ((num_mel_bins - patch_size) // stride + 1, (frames - patch_size) // stride + 1)
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch_size, stride=stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.ln_out = nn.LayerNorm(width)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [N, 1, M, F] -> [N, width]."""
        if tuple(mel.shape[-2:]) != self.input_size:
            m, f = self.input_size
            raise ValueError(f"spectrogram ViT expects mel [N, 1, {m}, {f}], got {tuple(mel.shape)}")
        x = self.patch_embed(mel).flatten(2).transpose(1, 2)  # [N, P, W]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [N, 1+P, W]
        for layer in self.layers:
            x = layer(x)
        return self.ln_out(x[:, 0])


@AUDIO_BACKBONES.register("ast")
class ASTBackbone(nn.Module):
    """Pretrained AST from a local directory; pooled output ``[N, hidden]``.

    AST's position embedding fixes the input length to ``config.max_length`` frames, so the time axis
    is cropped or padded to it; padding uses ``pad_value`` = the normalised value of a zero log-mel
    (``(0 - mean) / std``, AST's own feature extractor pads the same way).
    """

    def __init__(self, path: str, pad_value: float = 4.268 / 9.138) -> None:
        super().__init__()
        from transformers import ASTModel

        try:
            self.model = ASTModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot load AST weights from local directory {path!r}: {err}") from err
        cfg = self.model.config
        self.width = cfg.hidden_size
        self.num_mel_bins = cfg.num_mel_bins
        self.max_length = cfg.max_length
        self.pad_value = pad_value

    def forward(self, mel: Tensor) -> Tensor:
        """mel [N, 1, M, F] -> [N, hidden]."""
        if mel.shape[-2] != self.num_mel_bins:
            raise ValueError(f"AST checkpoint expects {self.num_mel_bins} mel bins, got {mel.shape[-2]}")
        x = mel[:, 0].transpose(1, 2)  # [N, F, M] (AST's time-major layout)
        extra = self.max_length - x.shape[1]
        x = torch.nn.functional.pad(x, (0, 0, 0, extra), value=self.pad_value) if extra > 0 else x[:, : self.max_length]
        return self.model(input_values=x).pooler_output


@dataclass
class AudioOutput:
    tokens: Tensor  # [B, Qa, D] audio Q-former outputs (rows with mask False are zero; ignore them)
    segment_embeds: Tensor  # [B, S, width] per-segment backbone embeddings (+ position embedding)
    mask: Tensor  # [B] bool, True where the clip has audio


class AudioBranch(nn.Module):
    """Spectrogram backbone per segment + segment position embedding + audio Q-former."""

    def __init__(
        self,
        backbone: nn.Module,
        dim: int | None = None,
        max_segments: int = 8,
        num_queries: int = 8,
        qformer_layers: int = 2,
        qformer_heads: int = 8,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        width = int(backbone.width)
        self.backbone = backbone
        self.dim = dim or width
        self.max_segments = max_segments
        self.segment_position_embedding = nn.Parameter(torch.randn(1, max_segments, width) * 0.02)  # [1, S_max, W]
        self.qformer = QFormer(self.dim, num_queries, qformer_layers, qformer_heads, context_dim=width)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries

    def forward(self, mel: Tensor, mask: Tensor | None = None) -> AudioOutput:
        """mel [B, S, 1, M, F], mask [B] bool -> AudioOutput(tokens [B, Qa, D])."""
        b, s = mel.shape[:2]
        if mel.dim() != 5 or s > self.max_segments:
            raise ValueError(f"audio branch expects mel [B, S<={self.max_segments}, 1, M, F], got {tuple(mel.shape)}")
        mask = torch.ones(b, dtype=torch.bool, device=mel.device) if mask is None else mask.to(mel.device, torch.bool)
        idx = mask.nonzero().flatten()  # samples that have audio
        width = self.segment_position_embedding.shape[-1]
        tokens = mel.new_zeros(b, self.num_queries, self.dim)
        seg = mel.new_zeros(b, s, width)
        if idx.numel():
            present = mel.index_select(0, idx).flatten(0, 1)  # [b' * S, 1, M, F]
            emb = (
                self.backbone(present).reshape(idx.numel(), s, width) + self.segment_position_embedding[:, :s]
            )  # [b', S, W]
            tokens = tokens.index_copy(0, idx, self.qformer(emb))
            seg = seg.index_copy(0, idx, emb)
        return AudioOutput(tokens=tokens, segment_embeds=seg, mask=mask)


@dataclass
class AudioConfig:
    """Typed config of the audio branch (for YAML / LightningCLI)."""

    backbone: str = "vit"  # a name in AUDIO_BACKBONES
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"width": 768} or {"path": "ast_dir"}
    dim: int | None = None  # Q-former width; default = backbone width
    max_segments: int = 8
    num_queries: int = 8
    qformer_layers: int = 2
    qformer_heads: int = 8
    freeze_backbone: bool = False


def build_audio_branch(cfg: AudioConfig) -> AudioBranch:
    backbone = AUDIO_BACKBONES.build(cfg.backbone, **cfg.backbone_args)
    return AudioBranch(
        backbone,
        dim=cfg.dim,
        max_segments=cfg.max_segments,
        num_queries=cfg.num_queries,
        qformer_layers=cfg.qformer_layers,
        qformer_heads=cfg.qformer_heads,
        freeze_backbone=cfg.freeze_backbone,
    )

"""CLIP4Clip's "tightTransf" similarity head: a cross-encoder that scores every (caption, video) pair.

For a caption's projected EOT feature ``[E]`` and a video's projected frame embeddings ``[T, E]`` (unnormalised):
the sequence ``[text; frame_1 .. frame_T]`` + position embeddings ``0..T`` -> dropout (0.1) -> ``layers`` (4)
CLIP-style pre-LN layers (QuickGELU, ``E // 64`` heads, no causal mask; padded frames of a short clip are masked
as keys) -> LayerNorm -> the text slot's output -> Linear E->E -> QuickGELU -> Linear E->1 = the pair's logit.
No normalisation, no logit scale. :meth:`TightTransformerSimilarity.forward` scores all ``[A, B]`` pairs, ``chunk``
captions at a time (evaluation over a large gallery); training (CLIP4Clip) uses the local batch only, with the
symmetric cross-entropy on the ``[B, B]`` logits.

Initialisation as CLIP4Clip (:meth:`~TightTransformerSimilarity.init_from_text_tower`): the position table from the
text tower's positional embedding, the layers from its first ``layers`` layers; the pooler and the output layer
N(0, 0.02) with zero biases, the pooler's LayerNorm 1 / 0.

The head belongs to the retrieval task (it is not a temporal block: it needs the caption). Deviations from
CLIP4Clip: LayerNorm eps 1e-5 (CLIP's) instead of its 1e-12; a key mask instead of its additive -1e6 (the same
attention weights, exactly zero on padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.clip.layers import LayerNorm, QuickGELU, ResidualAttentionLayer, init_transformer_
from vidlang.models.contract import TextTowerView


class TightTransformerSimilarity(nn.Module):
    """Cross-encoder similarity head (module docstring): ``(text [A, E], frames [B, T, E]) -> logits [A, B]``."""

    def __init__(
        self,
        embed_dim: int = 512,
        layers: int = 4,
        heads: int | None = None,
        max_positions: int = 77,
        act: str = "quick_gelu",
        dropout: float = 0.1,
        chunk: int = 16,
    ) -> None:
        super().__init__()
        e = embed_dim
        self.embed_dim = e
        self.chunk = int(chunk)
        self.position_embedding = nn.Parameter(torch.empty(max_positions, e))  # [P, E]: text slot 0, frames 1..T
        nn.init.normal_(self.position_embedding, std=0.02)
        self.dropout = nn.Dropout(dropout)
        h = heads or max(1, e // 64)
        self.layers = nn.ModuleList(ResidualAttentionLayer(e, h, 4 * e, act) for _ in range(layers))
        init_transformer_(self.layers, e)
        self.pool_norm = LayerNorm(e)
        self.pool_dense = nn.Linear(e, e)
        self.pool_act = QuickGELU()
        self.score = nn.Linear(e, 1)
        for layer in (self.pool_dense, self.score):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @property
    def max_frames(self) -> int:
        return self.position_embedding.shape[0] - 1

    def init_from_text_tower(self, text_tower: TextTowerView) -> None:
        """CLIP4Clip's initialisation: the text tower's positional embedding (first rows) and first layers.

        Raises ``ValueError`` when the shapes differ (text width != E, or other heads / MLP widths).
        """
        tpe = text_tower.positional_embedding  # [ctx, W]
        if tpe.shape[1] != self.embed_dim:
            raise ValueError(f"tightTransf: text width {tpe.shape[1]} != embed dim {self.embed_dim}")
        pairs = list(zip(text_tower.layer_list(), self.layers, strict=False))
        if len(pairs) < len(self.layers):
            raise ValueError(f"tightTransf: the text tower has {len(pairs)} layers, the head {len(self.layers)}")
        for src, dst in pairs:
            if src.attn.heads != dst.attn.heads or src.mlp.fc1.out_features != dst.mlp.fc1.out_features:
                raise ValueError(
                    f"tightTransf: the text layers have {src.attn.heads} heads / MLP width {src.mlp.fc1.out_features}, "
                    f"the head {dst.attn.heads} / {dst.mlp.fc1.out_features}"
                )
        with torch.no_grad():
            rows = min(self.position_embedding.shape[0], tpe.shape[0])
            self.position_embedding[:rows].copy_(tpe[:rows])
            for src, dst in pairs:
                dst.load_state_dict(src.state_dict())

    def pair_logits(self, text: Tensor, frames: Tensor, video_mask: Tensor | None = None) -> Tensor:
        """Logits of aligned pairs: ``text [N, E]``, ``frames [N, T, E]``, ``video_mask [N, T]`` -> ``[N]``."""
        n, t, _ = frames.shape
        if t > self.max_frames:
            raise ValueError(f"tightTransf got {t} frames but has {self.max_frames} frame positions")
        x = torch.cat([text[:, None].to(frames.dtype), frames], dim=1)  # [N, 1+T, E]
        x = self.dropout(x + self.position_embedding[: 1 + t].to(x.dtype))
        keys = None
        if video_mask is not None:
            valid = torch.cat([torch.ones_like(video_mask[:, :1]), video_mask], dim=1).bool()  # [N, 1+T]
            keys = valid[:, None, None, :]  # [N, 1, 1, 1+T]
        for layer in self.layers:
            x = layer(x, attn_mask=keys)
        pooled = self.pool_act(self.pool_dense(self.pool_norm(x)[:, 0]))  # [N, E]
        return self.score(pooled).squeeze(-1)

    def forward(
        self, text: Tensor, frames: Tensor, video_mask: Tensor | None = None, chunk: int | None = None
    ) -> Tensor:
        """``text [A, E]`` (projected EOT features), ``frames [B, T, E]``, ``video_mask [B, T]`` (True = real
        frame) -> logits ``[A, B]``, computed ``chunk`` captions (default ``self.chunk``) at a time."""
        if text.ndim != 2 or frames.ndim != 3 or text.shape[1] != frames.shape[2]:
            raise ValueError(
                f"tightTransf expects text [A, E] and frames [B, T, E], got {tuple(text.shape)} and "
                f"{tuple(frames.shape)}"
            )
        if video_mask is not None and video_mask.shape != frames.shape[:2]:
            raise ValueError(f"video_mask {tuple(video_mask.shape)} does not match frames {tuple(frames.shape)}")
        a, (b, t, e) = text.shape[0], frames.shape
        step = max(1, chunk or self.chunk)
        rows = []
        for i in range(0, a, step):
            part = text[i : i + step]  # [a', E]
            n = part.shape[0]
            pair_text = part[:, None].expand(n, b, e).reshape(n * b, e)
            pair_frames = frames[None].expand(n, b, t, e).reshape(n * b, t, e)
            pair_mask = None if video_mask is None else video_mask[None].expand(n, b, t).reshape(n * b, t)
            rows.append(self.pair_logits(pair_text, pair_frames, pair_mask).view(n, b))
        return torch.cat(rows, dim=0)

    def loss(self, text: Tensor, frames: Tensor, video_mask: Tensor | None = None) -> Tensor:
        """CLIP4Clip's training loss on a local batch of matched pairs (caption i <-> video i): the mean of the
        cross-entropies over rows and over columns of the ``[B, B]`` logits."""
        logits = self.forward(text, frames, video_mask, chunk=text.shape[0])
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().t(), target)) / 2


__all__ = ["TightTransformerSimilarity"]

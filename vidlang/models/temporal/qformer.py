"""``qformer`` (Video-LLaMA's video Q-former) as a temporal block.

Per-frame tokens ``[B, T, M, Dc]`` + learnable frame position embedding (``max_frames`` = 32 rows)
-> flatten ``[B, T*M, Dc]`` -> ``QFormer``: ``num_queries`` (32) learnable queries, ``num_layers`` (2)
BERT-style layers of self-attention, cross-attention to the frame tokens and MLP -> ``[B, Q, D]``.

``source`` picks the per-frame tokens (all read from the image tower's output, see ``FRAME_SOURCES``):
``tokens`` (default: CLS + all patch tokens, ``M = 1+N``, the closest to Video-LLaMA's per-frame image
Q-former tokens), ``cls`` (frame CLS only, ``M = 1``) or ``embeds`` (projected frame embeddings,
``M = 1``, width E).

More than ``max_frames`` frames: ``frame_overflow="interpolate"`` (default) linearly resamples the
frame position table to T (first and last rows kept); ``"error"`` raises. With T <= max_frames the first
T rows are used, as Video-LLaMA does.

Outputs: ``VideoOutput.tokens`` = the Q query outputs ``[B, Q, D]`` (for the chat encoder, which
projects them to the LLM width) and a pooled video embedding ``[B, E]`` for retrieval / recognition:
``pool="queries"`` (default) = ``Linear(D -> E)`` of the mean query; ``pool="residual"`` = frame-mean
CLIP embedding + a zero-initialised ``Linear(D -> E)`` of the mean query (starts as mean pooling).

Video-LLaMA trains the Q-former with the image encoder frozen: ``freeze_backbone = True``.

``llm_dim``: also hold Video-LLaMA's ``llama_proj`` (``Linear(D -> llm_dim)``, :attr:`llm_head`), the projection of
the query outputs to the LLM width; a :class:`~vidlang.models.chat.ChatEncoder` over an LLM of that width starts its
video projection from it (``vidlang convert --from videollama`` fills it from a released checkpoint). ``ln_eps``:
the Q-former's LayerNorm epsilon (Video-LLaMA's BERT: 1e-12).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vidlang.models.clip.layers import resample_temporal_embed
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput
from vidlang.models.qformer import QFormer

# name -> (select(frame_tokens [B,T,1+N,C], frame_embeds [B,T,E]) -> [B,T,M,Dc], width(spec) -> Dc)
from vidlang.models.temporal.base import BLOCKS

# name -> (select(frame_tokens [B,T,1+N,C], frame_embeds [B,T,E]) -> [B,T,M,Dc], width(spec) -> Dc)
FRAME_SOURCES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[TowerSpec], int]]] = {
    "tokens": (lambda tok, emb: tok, lambda s: s.width),
    "cls": (lambda tok, emb: tok[:, :, :1], lambda s: s.width),
    "embeds": (lambda tok, emb: emb[:, :, None], lambda s: s.embed_dim),
}
POOL_MODES = ("queries", "residual")
OVERFLOW_MODES = ("interpolate", "error")


@BLOCKS.register("qformer")
class VideoQFormer(TemporalBlock):
    """Video-LLaMA video Q-former; pooled embedding for retrieval and Q tokens for chat."""

    freeze_backbone = True
    zero_init_identity = False  # True only with pool="residual"; the default "queries" pool is not

    def __init__(
        self,
        spec: TowerSpec,
        num_queries: int = 32,
        num_layers: int = 2,
        dim: int | None = None,
        heads: int | None = None,
        source: str = "tokens",
        max_frames: int = 32,
        frame_overflow: str = "interpolate",
        pool: str = "queries",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        norm_first: bool = False,
        position_init_std: float = 1.0,
        ln_eps: float = 1e-5,
        llm_dim: int | None = None,
    ) -> None:
        super().__init__(spec)
        if source not in FRAME_SOURCES:
            raise ValueError(f"qformer source {source!r} unknown; choose from {sorted(FRAME_SOURCES)}")
        if pool not in POOL_MODES or frame_overflow not in OVERFLOW_MODES:
            raise ValueError(f"qformer pool must be in {POOL_MODES} and frame_overflow in {OVERFLOW_MODES}")
        self.select, width_of = FRAME_SOURCES[source]
        self.source, self.pool_mode, self.frame_overflow = source, pool, frame_overflow
        context_dim = width_of(spec)
        self.dim = dim or spec.width
        self.max_frames = max_frames
        # Video-LLaMA's nn.Embedding(max_frame_pos, D) keeps PyTorch's default init, N(0, 1): frame order must be
        # visible next to the frame tokens' scale from the first step (0.02 left the block order-blind for hundreds)
        self.frame_position_embedding = nn.Parameter(torch.randn(max_frames, context_dim) * position_init_std)
        self.qformer = QFormer(
            self.dim,
            num_queries,
            num_layers,
            heads or max(1, self.dim // 64),
            context_dim=context_dim,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            norm_first=norm_first,
            ln_eps=ln_eps,
        )
        self.llm_proj = nn.Linear(self.dim, llm_dim) if llm_dim else None  # Video-LLaMA's llama_proj
        self.embed_proj = nn.Linear(self.dim, spec.embed_dim)  # mean query -> E
        if pool == "residual":
            nn.init.zeros_(self.embed_proj.weight)
            nn.init.zeros_(self.embed_proj.bias)

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries

    @property
    def token_dim(self) -> int:
        return self.dim

    @property
    def embed_head(self) -> nn.Module:
        return self.embed_proj

    @property
    def llm_head(self) -> nn.Linear | None:
        return self.llm_proj

    def frame_positions(self, t: int) -> Tensor:
        """Frame position embeddings for T frames -> ``[T, Dc]``."""
        if t <= self.max_frames:
            return self.frame_position_embedding[:t]
        if self.frame_overflow == "error":
            raise ValueError(
                f"qformer got {t} frames but max_frames={self.max_frames}; raise max_frames or use "
                "frame_overflow='interpolate'"
            )
        return resample_temporal_embed(self.frame_position_embedding, t)

    def query_tokens(self, frame_tokens: Tensor, frame_embeds: Tensor) -> Tensor:
        """frame_tokens [B, T, 1+N, C], frame_embeds [B, T, E] -> Q-former outputs [B, Q, D]."""
        x = self.select(frame_tokens, frame_embeds)  # [B, T, M, Dc]
        pos = self.frame_positions(x.shape[1]).to(x.dtype)
        x = x + pos[None, :, None, :]
        return self.qformer(x.flatten(1, 2))  # [B, Q, D]

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        tokens = self.query_tokens(frame_tokens, frame_embeds)  # [B, Q, D]
        embeds = self.embed_proj(tokens.mean(dim=1))  # [B, E]
        if self.pool_mode == "residual":
            embeds = frame_embeds.mean(dim=1) + embeds
        return VideoOutput(embeds=embeds, frame_embeds=frame_embeds, tokens=tokens)

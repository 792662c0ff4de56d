"""A small Q-former: learnable queries that self-attend and cross-attend to a context.

Used by the video Q-former temporal block (``vidlang/models/temporal/qformer.py``) and by the
audio branch (``vidlang/models/audio/encoder.py``). It follows Video-LLaMA's BERT-style
Q-former (``cross_attention_freq = 1``): the query embeddings go through a LayerNorm, then
every layer does self-attention over the queries, cross-attention from the queries to the
context and an MLP, each followed by a residual add and a LayerNorm (post-LN, as BERT).
``norm_first=True`` gives the pre-LN variant (LayerNorm before each sub-layer, one final LN).
``ln_eps``: the LayerNorms' epsilon (BERT's, hence Video-LLaMA's, is 1e-12; PyTorch's default 1e-5 here).

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (runs on CPU and GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value widths (cross-attention)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, Q, D], context [B, L, Dk] (defaults to x), mask [B, L] bool (True = attend) -> [B, Q, D]."""
        context = x if context is None else context
        b, q, d = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:  # [B, L, D] -> [B, h, L, D/h]
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)),
            split(self.k_proj(context)),
            split(self.v_proj(context)),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, h, Q, D/h]
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class QFormerLayer(nn.Module):
    """Self-attention over queries, cross-attention to the context, MLP (post-LN or pre-LN)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        norm_first: bool = False,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.cross_attn = Attention(dim, heads, kv_dim=context_dim, dropout=dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln_self = nn.LayerNorm(dim, eps=ln_eps)
        self.ln_cross = nn.LayerNorm(dim, eps=ln_eps)
        self.ln_mlp = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """q [B, Q, D], context [B, L, Dc], mask [B, L] bool -> [B, Q, D]."""
        if self.norm_first:
            q = q + self.drop(self.self_attn(self.ln_self(q)))
            q = q + self.drop(self.cross_attn(self.ln_cross(q), context, mask))
            return q + self.drop(self.mlp(self.ln_mlp(q)))
        q = self.ln_self(q + self.drop(self.self_attn(q)))
        q = self.ln_cross(q + self.drop(self.cross_attn(q, context, mask)))
        return self.ln_mlp(q + self.drop(self.mlp(q)))


class QFormer(nn.Module):
    """``num_queries`` learnable queries attending to a context sequence.

    Args:
        dim: query width D.
        num_queries: Q.
        num_layers: number of (self-attn, cross-attn, MLP) layers.
        heads: attention heads (must divide ``dim``).
        context_dim: width of the context (keys/values); defaults to ``dim``.
        norm_first: pre-LN instead of BERT's post-LN.
        init_std: std of the query initialisation (BERT's ``initializer_range``).
        ln_eps: epsilon of every LayerNorm (BERT: 1e-12).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int = 32,
        num_layers: int = 2,
        heads: int = 8,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        norm_first: bool = False,
        init_std: float = 0.02,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_queries < 1 or num_layers < 1:
            raise ValueError(f"Q-former needs num_queries >= 1 and num_layers >= 1, got {num_queries}, {num_layers}")
        self.dim = dim
        self.num_queries = num_queries
        self.context_dim = context_dim or dim
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, dim) * init_std)  # [1, Q, D]
        self.ln_queries = nn.LayerNorm(dim, eps=ln_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, heads, self.context_dim, mlp_ratio, dropout, norm_first, ln_eps)
            for _ in range(num_layers)
        )
        self.ln_out: nn.Module = nn.LayerNorm(dim, eps=ln_eps) if norm_first else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """context [B, L, Dc], mask [B, L] bool (True = real token) -> queries [B, Q, D]."""
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"Q-former expects context [B, L, {self.context_dim}], got {tuple(context.shape)}")
        if mask is not None and not bool(mask.any(dim=1).all()):
            raise ValueError("Q-former context mask hides every token of some sample; drop that sample instead")
        q = self.drop(self.ln_queries(self.query_tokens.expand(context.shape[0], -1, -1)))  # [B, Q, D]
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                q = checkpoint(layer, q, context, mask, use_reentrant=False)
            else:
                q = layer(q, context, mask)
        return self.ln_out(q)

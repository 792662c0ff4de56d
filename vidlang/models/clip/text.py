"""The CLIP text tower with the text hooks of the temporal-block contract.

``token_embedding + positional_embedding -> text_embed -> for i: text_before_layer(i) -> attn
-> text_before_mlp(i) -> mlp -> text_after_layer(i) -> ln_final -> @ text_projection``.

Attention is causal plus a key-padding mask from ``attention_mask`` (right padding). The pooled
feature is the token at the last real position, ``attention_mask.sum(-1) - 1`` (tokenizers end
every caption with EOT). A block's ``text_embed`` may insert tokens (deep text prompts); it must
then update ``ctx.attention_mask`` to the new length and remove the tokens after the last layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vidlang.models.clip.configs import TextConfig
from vidlang.models.clip.layers import LayerNorm, LegacyLayerKeys, ResidualAttentionLayer, init_transformer_
from vidlang.models.clip.tower_base import Tower, check_tokens_removed, resolve_hooks
from vidlang.models.contract import HookContext, TemporalBlock, TextOutput


class TextTower(LegacyLayerKeys, Tower):
    """CLIP text transformer: ``token_embedding, positional_embedding, layers, ln_final, text_projection``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))  # [ctx, W]
        self.layers = nn.ModuleList(
            ResidualAttentionLayer(w, cfg.heads, cfg.mlp_hidden, cfg.act) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.embed_dim))  # [W, E]
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=w**-0.5)
        init_transformer_(self.layers, w)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"TextTower expects input_ids [A, Lt], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"captions of {input_ids.shape[1]} tokens exceed the text tower's context length "
                f"{self.cfg.context_length}; tokenize with truncation to {self.cfg.context_length}"
            )
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        if not bool(mask[:, 0].all()):
            raise ValueError("attention_mask must mark position 0 (SOT) as real in every row (right padding only)")
        return mask

    def forward(
        self,
        input_ids: Tensor,  # [A, Lt] int
        attention_mask: Tensor | None = None,  # [A, Lt] 1 = token, 0 = padding
        block: TemporalBlock | None = None,
        hooks: frozenset[str] | None = None,
    ) -> TextOutput:
        mask = self._check_inputs(input_ids, attention_mask)
        hooks = resolve_hooks(block, hooks)
        a, lt = input_ids.shape
        x = self.embed_tokens(input_ids)  # [A, Lt, W]
        ctx = HookContext(batch=a, frames=1, training=self.training, attention_mask=mask, text_tower=self)
        if "text_embed" in hooks:
            x = block.text_embed(x, ctx)
        attn_mask, is_causal = self._attention_mask(ctx.attention_mask, x.shape[1])
        x = self.run_layers(self._layer, len(self.layers), x, attn_mask, is_causal, block, hooks, ctx)
        check_tokens_removed(x, lt, block, tokens="text tokens", added="inserted")
        tokens = self.ln_final(x) @ self.text_projection  # [A, Lt, E]
        last = mask.sum(-1) - 1  # [A] index of EOT
        embeds = tokens[torch.arange(a, device=tokens.device), last]  # [A, E]
        return TextOutput(embeds=embeds, tokens=tokens, mask=mask, hidden=x, aux_losses=ctx.aux_losses)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``[A, Lt]`` ids -> token + position embeddings ``[A, Lt, W]``."""
        return self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]

    def layer_list(self) -> nn.ModuleList:
        return self.layers

    @staticmethod
    def _attention_mask(mask: Tensor | None, length: int) -> tuple[Tensor | None, bool]:
        """Causal + key padding: ``(None, True)`` without padding, else a bool mask ``[A, 1, L, L]``."""
        if mask is None or bool(mask.all()):
            return None, True
        if mask.shape[1] != length:
            raise RuntimeError(f"ctx.attention_mask has length {mask.shape[1]} but the text sequence has {length}")
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        return causal & mask.bool()[:, None, None, :], False

    def _layer(
        self,
        i: int,
        x: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        block: TemporalBlock | None,
        hooks: frozenset[str],
        ctx: HookContext,
    ) -> Tensor:
        if "text_before_layer" in hooks:
            x = block.text_before_layer(i, x, ctx)
        before_mlp = (lambda r: block.text_before_mlp(i, r, ctx)) if "text_before_mlp" in hooks else None
        x = self.layers[i](x, attn_mask=attn_mask, is_causal=is_causal, before_mlp=before_mlp)
        if "text_after_layer" in hooks:
            x = block.text_after_layer(i, x, ctx)
        return x


__all__ = ["TextTower"]

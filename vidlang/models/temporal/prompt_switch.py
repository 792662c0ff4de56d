"""``prompt_switch`` (Prompt Switch): a prompt cube exchanged across frames inside attention.

- A cube ``P [Np, Np, C]`` (Np = 6), init N(0, 0.02 * C^-0.5). Frames are grouped in chunks of Np;
  frame ``f`` of a chunk gets row ``P[f]`` (Np tokens) appended after CLS + patches, once, at
  ``before_layer(0)`` (after ``ln_pre``; no position embedding).
- In every layer's ``attn_input`` (the normed attention input only; the residual stream is not
  switched) prompt slot ``s`` of frame ``f`` is exchanged with slot ``f`` of frame ``s`` within the
  chunk: a transpose of the chunk's ``[frame, slot]`` block.
- After the last layer a new multi-head attention (queries: frame CLS; keys/values: all prompt
  tokens of the video; output projection zero-initialised) is added to the frame CLS and the
  prompts are removed; the tower then applies ``ln_post`` + projection; ``pool`` averages over T.

T not divisible by Np (the released code requires divisibility): the last chunk has ``n < Np``
frames; they take rows ``P[0..n-1]`` and only the square ``[n frames, first n slots]`` block is
transposed, the remaining slots stay with their frame.

With ``caption=True`` training adds a captioning head (2-layer causal transformer decoder, d = E, memory = the
unnormalised projected frame embeddings ``[B, T, E]``, vocabulary head initialised from the text
tower's token embedding), loss ``caption`` with default weight 0.5 (``default_aux_weights``).
The head needs the caption token ids of the batch's videos: ``wants_caption_ids`` is True, so
``VideoTextModel.caption_state`` passes one caption per video in ``ctx.state["caption_ids"]``
(``[B, Lt]``, with ``ctx.state["caption_mask"]``) on training forwards (the retrieval task and
``VideoTextModel.forward`` do this). ``caption`` defaults to True, as the paper trains with it.
Decoder inputs are the text tower's token + position embeddings (no gradient, as the released
code), predicting ``ids[:, 1:]``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.contract import HookContext, ImageTowerView, TemporalBlock, TextTowerView, TowerSpec, VideoOutput
from vidlang.models.temporal.base import BLOCKS


def switch_index(frames: int, num_prompts: int) -> Tensor:
    """Permutation of the flattened ``[T, Np]`` (frame, slot) grid that realises the chunk transpose.

    ``out[t * Np + s]`` is the source position for frame ``t``, slot ``s``.
    """
    idx = torch.arange(frames * num_prompts).view(frames, num_prompts)
    out = idx.clone()
    for start in range(0, frames, num_prompts):
        n = min(num_prompts, frames - start)
        out[start : start + n, :n] = idx[start : start + n, :n].T
    return out.flatten()


def _heads_for(width: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` that divides ``width``."""
    return next(h for h in range(min(wanted, width), 0, -1) if width % h == 0)


class CaptionHead(nn.Module):
    """Causal transformer decoder over caption tokens with the frame embeddings as memory."""

    def __init__(self, text_width: int, embed_dim: int, vocab_size: int, layers: int = 2, heads: int = 8) -> None:
        super().__init__()
        self.in_proj = nn.Identity() if text_width == embed_dim else nn.Linear(text_width, embed_dim)
        self.prenorm = nn.LayerNorm(embed_dim)
        layer = nn.TransformerDecoderLayer(
            embed_dim, _heads_for(embed_dim, heads), 4 * embed_dim, dropout=0.0, batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(embed_dim))
        self.head = nn.Linear(embed_dim, vocab_size)
        nn.init.zeros_(self.head.bias)

    def forward(self, token_embeds: Tensor, memory: Tensor) -> Tensor:
        """``token_embeds [B, L, W]``, ``memory [B, T, E]`` -> logits ``[B, L, vocab]``."""
        h = self.prenorm(self.in_proj(token_embeds))
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device, dtype=h.dtype)
        return self.head(self.decoder(h, memory, tgt_mask=causal, tgt_is_causal=True))


@BLOCKS.register("prompt_switch")
class PromptSwitch(TemporalBlock):
    """Prompt cube + per-layer prompt switch + prompt aggregation attention; mean over T."""

    freeze_backbone = False  # both towers fine-tuned at 1e-6, new modules at 1e-5
    lr_mults = {"": 10.0}
    zero_init_identity = False  # appended prompts are attended to by CLS from layer 0 on
    default_aux_weights = {"caption": 0.5}

    def __init__(
        self,
        spec: TowerSpec,
        num_prompts: int = 6,
        init_std: float = 0.02,
        caption: bool = True,
        caption_layers: int = 2,
        caption_heads: int = 8,
    ) -> None:
        super().__init__(spec)
        if num_prompts < 1:
            raise ValueError(f"prompt_switch needs num_prompts >= 1, got {num_prompts}")
        c = spec.width
        self.num_prompts = num_prompts
        self.prompts = nn.Parameter(torch.randn(num_prompts, num_prompts, c) * (init_std * c**-0.5))  # [Np, Np, C]
        self.aggregate = nn.MultiheadAttention(c, spec.heads, batch_first=True)
        nn.init.zeros_(self.aggregate.out_proj.weight)
        nn.init.zeros_(self.aggregate.out_proj.bias)
        self.caption_head = (
            CaptionHead(spec.text_width, spec.embed_dim, spec.vocab_size, caption_layers, caption_heads)
            if caption
            else None
        )
        self._warned = False

    @property
    def wants_caption_ids(self) -> bool:
        return self.caption_head is not None

    @property
    def appends_image_tokens(self) -> bool:
        return True

    # -- wiring ----------------------------------------------------------------------------------------
    def init_from_tower(self, image_tower: ImageTowerView, text_tower: TextTowerView | None) -> None:
        """Copy the text tower's token embedding into the head (the decoder inputs come from ``ctx.text_tower``)."""
        if self.caption_head is None or text_tower is None:
            return
        weight = text_tower.token_embedding.weight  # [vocab, W]
        if weight.shape == self.caption_head.head.weight.shape:
            with torch.no_grad():
                self.caption_head.head.weight.copy_(weight)

    # -- hooks ---------------------------------------------------------------------------------------------
    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if i != 0:
            return x
        rows = torch.arange(ctx.frames, device=x.device) % self.num_prompts  # frame -> cube row
        p = self.prompts[rows].to(x.dtype)  # [T, Np, C]
        p = p.unsqueeze(0).expand(ctx.batch, -1, -1, -1).reshape(x.shape[0], self.num_prompts, -1)
        return torch.cat([x, p], dim=1)  # [B*T, 1+N+Np, C]

    def attn_input(self, i: int, h: Tensor, ctx: HookContext) -> Tensor:
        npr = self.num_prompts
        prompts = h[:, -npr:].reshape(ctx.batch, ctx.frames * npr, -1)  # [B, T*Np, C]
        idx = switch_index(ctx.frames, npr).to(h.device)
        switched = prompts[:, idx].reshape(h.shape[0], npr, -1)  # [B*T, Np, C]
        return torch.cat([h[:, :-npr], switched], dim=1)

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if i != self.spec.layers - 1:
            return x
        npr, c = self.num_prompts, x.shape[-1]
        cls = x[:, 0].reshape(ctx.batch, ctx.frames, c)  # [B, T, C]
        kv = x[:, -npr:].reshape(ctx.batch, ctx.frames * npr, c)  # [B, T*Np, C]
        agg = self.aggregate(cls, kv, kv, need_weights=False)[0]  # [B, T, C]
        new_cls = (cls + agg).reshape(x.shape[0], 1, c)
        return torch.cat([new_cls, x[:, 1:-npr]], dim=1)  # [B*T, 1+N, C]

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        out = VideoOutput(embeds=frame_embeds.mean(dim=1), frame_embeds=frame_embeds)
        if ctx.training and self.caption_head is not None:
            loss = self._caption_loss(frame_embeds, ctx)
            if loss is not None:
                ctx.aux_losses["caption"] = loss
                out.aux_losses["caption"] = loss
        return out

    # -- captioning ------------------------------------------------------------------------------------------
    def _caption_targets(self, ctx: HookContext) -> tuple[Tensor, Tensor | None] | None:
        if "caption_ids" in ctx.state:
            return ctx.state["caption_ids"], ctx.state.get("caption_mask")
        if not self._warned:
            warnings.warn(
                "prompt_switch: training forward without ctx.state['caption_ids'] (see "
                "VideoTextModel.caption_state); the auxiliary caption loss is skipped",
                stacklevel=2,
            )
            self._warned = True
        return None

    def _caption_loss(self, frame_embeds: Tensor, ctx: HookContext) -> Tensor | None:
        targets = self._caption_targets(ctx)
        if targets is None:
            return None
        ids, mask = targets
        if ctx.text_tower is None:
            raise RuntimeError("prompt_switch: the caption loss needs the text tower in ctx.text_tower (the model's "
                               "encode_video passes it)")
        if ids.shape[0] != frame_embeds.shape[0]:
            raise ValueError(f"prompt_switch: {ids.shape[0]} caption id rows for {frame_embeds.shape[0]} videos")
        if mask is None:  # OpenAI convention: EOT has the largest id; everything after it is padding
            mask = torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(-1, keepdim=True)
        with torch.no_grad():
            tok = ctx.text_tower.embed_tokens(ids[:, :-1])  # [B, L-1, W]
        logits = self.caption_head(tok.to(frame_embeds.dtype), frame_embeds)  # [B, L-1, vocab]
        target = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)

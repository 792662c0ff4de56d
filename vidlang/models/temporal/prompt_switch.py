"""``prompt_switch`` (Prompt Switch, ICCV'23): a prompt cube exchanged across frames inside attention.

Mechanics (official code: ``bladewaltz1/PromptSwitch``, ``model/prompt_clip.py``):

- A cube ``P [Np, Np, C]`` (Np = ``num_prompts`` = 6), init N(0, 0.02 * C^-0.5). Frames are grouped in chunks of
  Np; frame ``f`` of a chunk gets row ``P[f]`` (Np tokens) appended after CLS + patches, once, at
  ``before_layer(0)`` (after ``ln_pre``; no position embedding).
- In every layer's ``attn_input`` (the normed attention input only; the residual stream is not switched) prompt
  slot ``s`` of frame ``f`` is exchanged with slot ``f`` of frame ``s`` within the chunk: a transpose of the
  chunk's ``[frame, slot]`` block.
- After the last layer a new multi-head attention (queries: frame CLS; keys/values: the prompt tokens of the
  frame's *group*; output projection zero-initialised) is added to the frame CLS and the prompts are removed; the
  tower then applies ``ln_post`` + projection.
- **Frame groups** (``group_frames``, default Np): a clip is processed as independent groups of ``group_frames``
  frames; the switch and the aggregation never cross a group. The official model fixes its frame count at the
  training value (6 = Np), so a 12-frame test clip runs as two independent 6-frame clips joined only by the final
  mean: here ``T = 12`` gives exactly the mean of the two 6-frame outputs. The official test frame order makes
  each group a complete pass over the video: ``vidlang.data.sampling`` sampler ``interleaved_segments``.
  ``group_frames=0``: one group per clip (vidlang before issue 14: the aggregation attends all T*Np prompts).
- **Pooling** (``pooling``): ``"normalized_mean"`` (official, default) L2-normalises each frame embedding, then
  averages over T; ``"mean"`` averages the raw frame embeddings.
- **Learning rates** (``lr_mults``): the prompt cube and the caption head at x10 (official: names with
  "prompt" / "caption" at 1e-5), the aggregation attention at x1 (official: the CLIP lr, 1e-6).

Captioning (``caption=True``, the paper's training): a 2-layer causal transformer decoder (d = E, post-norm, ReLU,
no dropout; memory = the unnormalised projected frame embeddings ``[B, T, E]``; vocabulary head initialised from
the text tower's token embedding) predicts ``ids[:, 1:]`` from the text tower's token + position embeddings of
``ids[:, :-1]`` (no gradient, as the released code). The block needs one caption per video: ``wants_caption_ids``
is True, so ``VideoTextModel.caption_state`` passes ``ctx.state["caption_ids"]`` (``[B, Lt]``, with
``ctx.state["caption_mask"]``) on training forwards. The loss ``caption`` is a token-weighted cross-entropy with
PyTorch's ``weight=`` semantics (``sum w_t * nll_t / sum w_t`` over the real target tokens): frequent tokens
(``frequent_words`` + SOT + EOT, official list) weigh ``frequent_weight`` (0.25), every other token 1. The ids of
those words depend on the vocabulary, so they are derived at run time from the model's tokenizer:
:meth:`PromptSwitch.set_tokenizer` (until it is called the loss is unweighted, with a warning). The official x0.5
is the block's ``default_aux_weights = {"caption": 0.5}`` (applied by the task through
``vidlang.losses.aux.weigh_aux_losses``), not a factor inside the loss: ``weight * caption`` equals the official
``CaptionLoss`` (``caption_loss_mult`` 0.5).

Deviations from the official code:

- T not divisible by Np (the official code asserts divisibility): the last chunk has ``n < Np`` frames; they take
  rows ``P[0..n-1]`` and only the square ``[n frames, first n slots]`` block is transposed, the remaining slots
  stay with their frame. Likewise a last partial frame group aggregates over its own prompts only.
- Weight decay: the official AdamW decays every parameter (0.2, the cube, biases and norms included);
  ``VideoTextModel.param_groups`` never decays 1-D tensors or prompts. A recipe-level difference (phase 14B).
- ``CaptionHead.in_proj`` (only when the text width differs from E; official B/32 has 512 = 512: identity).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

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


# Official CaptionLoss: these words (word-final BPE forms) and SOT / EOT weigh ``frequent_weight`` (0.25).
FREQUENT_WORDS: tuple[str, ...] = (
    "in", "on", "of", "to", "about", "this", "that", "a", "an", "the", "and", "there", "here", "is", "are", ".", ",",
)  # fmt: skip
POOLINGS = ("normalized_mean", "mean")


class CaptionTokenizer(Protocol):
    """What :meth:`PromptSwitch.set_tokenizer` reads of a tokenizer (``ClipTokenizer`` has it)."""

    bos_id: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...  # ids without BOS / EOT


def frequent_token_ids(tokenizer: CaptionTokenizer, words: Sequence[str] = FREQUENT_WORDS) -> list[int]:
    """The ids the caption loss down-weights: ``words`` encoded as one space-separated caption (as the official
    code tokenises its word string, so each word gets its in-caption form), plus BOS and EOT; sorted, unique."""
    ids = set(tokenizer.encode(" ".join(words))) if words else set()
    return sorted(ids | {int(tokenizer.bos_id), int(tokenizer.eot_id)})


def group_bounds(frames: int, group: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the consecutive frame groups of a clip (``group <= 0``: one group)."""
    if group <= 0 or group >= frames:
        return [(0, frames)]
    return [(s, min(s + group, frames)) for s in range(0, frames, group)]


@BLOCKS.register("prompt_switch")
class PromptSwitch(TemporalBlock):
    """Prompt cube + per-layer prompt switch + per-group prompt aggregation attention; pooled over T."""

    freeze_backbone = False  # both towers fine-tuned at 1e-6, new modules at 1e-5
    lr_mults = {"": 10.0, "aggregate": 1.0}  # official: 'prompt' / 'caption' names at 1e-5, the rest at 1e-6
    zero_init_identity = False  # appended prompts are attended to by CLS from layer 0 on
    default_aux_weights = {"caption": 0.5}  # the official caption_loss_mult

    def __init__(
        self,
        spec: TowerSpec,
        num_prompts: int = 6,
        init_std: float = 0.02,
        caption: bool = True,
        caption_layers: int = 2,
        caption_heads: int = 8,
        pooling: str = "normalized_mean",
        group_frames: int | None = None,
        frequent_words: Sequence[str] = FREQUENT_WORDS,
        frequent_weight: float = 0.25,
    ) -> None:
        super().__init__(spec)
        if num_prompts < 1:
            raise ValueError(f"prompt_switch needs num_prompts >= 1, got {num_prompts}")
        if pooling not in POOLINGS:
            raise ValueError(f"prompt_switch pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        group_frames = num_prompts if group_frames is None else int(group_frames)
        if group_frames < 0 or group_frames % num_prompts:
            raise ValueError(
                f"prompt_switch group_frames must be 0 (one group per clip) or a multiple of num_prompts "
                f"({num_prompts}), got {group_frames}"
            )
        if not frequent_weight >= 0:
            raise ValueError(f"prompt_switch frequent_weight must be >= 0, got {frequent_weight}")
        c = spec.width
        self.num_prompts = num_prompts
        self.pooling = pooling
        self.group_frames = group_frames
        self.frequent_words = tuple(frequent_words)
        self.frequent_weight = float(frequent_weight)
        self.prompts = nn.Parameter(torch.randn(num_prompts, num_prompts, c) * (init_std * c**-0.5))  # [Np, Np, C]
        self.aggregate = nn.MultiheadAttention(c, spec.heads, batch_first=True)
        nn.init.zeros_(self.aggregate.out_proj.weight)
        nn.init.zeros_(self.aggregate.out_proj.bias)
        self.caption_head = (
            CaptionHead(spec.text_width, spec.embed_dim, spec.vocab_size, caption_layers, caption_heads)
            if caption
            else None
        )
        # [vocab] caption-loss token weights, set from the tokenizer (set_tokenizer); not saved in checkpoints
        self.register_buffer("caption_token_weights", None, persistent=False)
        self._warned: set[str] = set()

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

    def bind_tokenizer(self, tokenizer: Any, text_tower: TextTowerView, fresh: bool) -> None:
        """The contract's hook: the caption loss's token weights from the task's tokenizer (:meth:`set_tokenizer`)."""
        self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: CaptionTokenizer) -> None:
        """Derive the caption loss's token weights from ``tokenizer`` (the one the captions are encoded with):
        ``frequent_weight`` for :func:`frequent_token_ids`, 1 elsewhere. Call it whenever the tokenizer is known
        (idempotent; the weights are not saved in checkpoints)."""
        vocab = self.spec.vocab_size
        ids = frequent_token_ids(tokenizer, self.frequent_words)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(
                f"prompt_switch: the tokenizer gives token ids {bad[:5]} outside the text tower's vocabulary of "
                f"{vocab}; the tokenizer does not belong to this model"
            )
        device = self.prompts.device
        weights = torch.ones(vocab, device=device)
        weights[torch.tensor(ids, device=device)] = self.frequent_weight
        self.caption_token_weights = weights

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
        prompts = x[:, -npr:].reshape(ctx.batch, ctx.frames, npr, c)  # [B, T, Np, C]
        new_cls = torch.cat([self._aggregate(cls, prompts, s, e) for s, e in self._groups(ctx.frames)], dim=1)
        return torch.cat([new_cls.reshape(x.shape[0], 1, c), x[:, 1:-npr]], dim=1)  # [B*T, 1+N, C]

    def _groups(self, frames: int) -> list[tuple[int, int]]:
        """Frame groups of a clip; whole groups of equal size run as one batch (a list of one range each)."""
        bounds = group_bounds(frames, self.group_frames)
        full = [b for b in bounds if b[1] - b[0] == bounds[0][1] - bounds[0][0]]
        merged = [(full[0][0], full[-1][1])]  # consecutive equal groups: one [start, end) range
        return merged + [b for b in bounds if b not in full]

    def _aggregate(self, cls: Tensor, prompts: Tensor, start: int, end: int) -> Tensor:
        """``cls [B, T, C]``, ``prompts [B, T, Np, C]`` -> ``cls + attention(cls, prompts)`` for frames
        ``[start, end)``, each group of ``group_frames`` attending its own prompts -> ``[B, end-start, C]``."""
        b, c = cls.shape[0], cls.shape[-1]
        size = end - start if self.group_frames <= 0 else min(self.group_frames, end - start)
        q = cls[:, start:end].reshape(-1, size, c)  # [B*G, size, C]
        kv = prompts[:, start:end].reshape(q.shape[0], size * self.num_prompts, c)  # [B*G, size*Np, C]
        out = q + self.aggregate(q, kv, kv, need_weights=False)[0]
        return out.reshape(b, end - start, c)

    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        frames = F.normalize(frame_embeds, dim=-1) if self.pooling == "normalized_mean" else frame_embeds
        out = VideoOutput(embeds=frames.mean(dim=1), frame_embeds=frame_embeds)
        if ctx.training and self.caption_head is not None:
            loss = self._caption_loss(frame_embeds, ctx)
            if loss is not None:
                ctx.aux_losses["caption"] = loss
                out.aux_losses["caption"] = loss
        return out

    # -- captioning ------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned.add(key)

    def _caption_targets(self, ctx: HookContext) -> tuple[Tensor, Tensor | None] | None:
        if "caption_ids" in ctx.state:
            return ctx.state["caption_ids"], ctx.state.get("caption_mask")
        self._warn_once(
            "ids",
            "prompt_switch: training forward without ctx.state['caption_ids'] (see VideoTextModel.caption_state); "
            "the auxiliary caption loss is skipped",
        )
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
        target = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)  # predict every real token after SOT
        weight = self.caption_token_weights
        if weight is None:
            self._warn_once(
                "weights",
                "prompt_switch: no caption token weights yet (call block.set_tokenizer(tokenizer)); the caption "
                "loss weighs every token 1 instead of the official 0.25 for frequent words",
            )
        else:
            weight = weight.to(device=logits.device, dtype=torch.float32)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), weight=weight, ignore_index=-100)

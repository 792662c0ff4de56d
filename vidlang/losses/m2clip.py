"""M2-CLIP's multi-task recognition losses (the TED block's paper), usable with any block.

- ``contrastive``: video-text KL. Each video in the batch is paired with its class text; the
  similarity ``[B, B]`` is pulled (KL) toward soft targets that spread each row's mass evenly over the
  videos of the same label (rows of ``y y^T``, normalised; ``y`` may be a mixed/smoothed target), in
  both directions (video->text and text->video), averaged. The official target is ``softmax(10 * same)``
  (:func:`official_same_label_targets`, pass it as ``soft``), nearly the same.
- ``cross_modal``: cross-entropy of the video-vs-all-class-texts logits ``[B, K]``. :func:`cross_modal_ce`
  applies it to the **logits**; the released M2-CLIP code applies ``CrossEntropyLoss`` to softmax
  *probabilities* (log-softmax on top of softmax: a bug that flattens the loss and its gradient), which
  :func:`cross_modal_ce_on_probabilities` reproduces for an official run.
- ``head``: cross-entropy of a visual linear head.
- ``mlm``: cross-modal masked language modelling, weight 0.1.

Loss weights: :data:`OFFICIAL_WEIGHTS` are the released code's ``((kl_v + kl_t) / 2 + ce) / 2 + head + mlm / 10``
= 0.5 / 0.5 / 1 / 0.1; :data:`DEFAULT_WEIGHTS` (1 / 1 / 1 / 0.1) is what the recognition task applies by default.

**MLM as official** (:func:`build_mlm_batch` + :class:`M2CLIPMLM`): the class prompt (``"A video of {}"``) is
split on whitespace into lower-cased words; ``max(1, round(0.2 * n_words))`` of them, chosen uniformly, are
replaced by a mask word (``"mask"``: the literal English word, BPE-encoded like any other, no 80/10/10); the
label of a masked word is its index in a *word-level* vocabulary of the prompt words (:class:`MLMVocabulary`,
e.g. 519 words for Kinetics-400), placed on the mask word's first token; every other position is -100. The
masked prompt goes through the text tower (its ids also serve the video-text contrastive term, as official);
the last text layer's output (``TextOutput.hidden``, before ``ln_final``) cross-attends to the video's frame
embeddings in a 13th text block, a frozen copy of the last text layer with a text adapter before its MLP, then
``ln_final`` and a BERT-style prediction head (Linear, GELU, LayerNorm eps 1e-12, decoder + bias).

Deviations from the official MLM (documented assumptions):

- Per-sample masking probability: the released code masks a sample when ``random.random() < 0`` (never: the
  MLM is switched off and its loss is NaN, since every label is ignored), so the value used for the paper is
  not recoverable. vidlang assumes **every** training prompt is masked (``sample_prob=1.0``); set it lower to
  mask only a fraction. A batch with no masked word gives a zero loss (with a graph), never NaN.
- Vocabulary: the sorted unique words of the prompts (template words included); the official Kinetics-400
  list has the same words plus ``"name"`` (the CSV header), so indices after it differ by one. A word outside
  the vocabulary gets label -100 (official: 0, i.e. the word "a"); it cannot happen with a vocabulary built
  from the prompts.
- A prompt longer than the context is cut (its EOT kept, labels of cut words dropped); official raises.
- The 13th block and ``ln_final`` are frozen copies taken when :class:`M2CLIPMLM` is built (official: the block
  is a frozen copy, ``ln_final`` is the text tower's own, frozen in M2-CLIP's recipe).

The earlier vidlang variant (:func:`mask_tokens` + :class:`CrossModalMLM`: 15% of the token ids replaced by
the pad id, a fresh cross-attention layer and a head over the tokenizer's vocabulary) stays available.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.losses.classification import soft_target_cross_entropy
from vidlang.models.clip.layers import Attention, ResidualAttentionLayer
from vidlang.models.temporal.ted import TextAdapter

DEFAULT_WEIGHTS: dict[str, float] = {"contrastive": 1.0, "cross_modal": 1.0, "head": 1.0, "mlm": 0.1}
OFFICIAL_WEIGHTS: dict[str, float] = {"contrastive": 0.5, "cross_modal": 0.5, "head": 1.0, "mlm": 0.1}
MLM_RATE = 0.2  # official share of masked words per prompt
MASK_WORD = "mask"  # official mask word (a plain word of the vocabulary)
IGNORE = -100


def same_label_targets(targets: Tensor) -> Tensor:
    """``targets [B, K]`` (one-hot or soft) -> ``[B, B]`` row-stochastic same-label weights."""
    sim = targets.float() @ targets.float().t()  # [B, B]
    return sim / sim.sum(dim=1, keepdim=True).clamp_min(1e-12)


def official_same_label_targets(labels: Tensor, sharpness: float = 10.0) -> Tensor:
    """M2-CLIP's soft targets ``softmax(10 * same_label [B, B])`` for class indices ``labels [B]``."""
    same = (labels[:, None] == labels[None, :]).float()  # [B, B]
    return torch.softmax(sharpness * same, dim=1)


def soft_contrastive_kl(logits: Tensor, targets: Tensor, soft: Tensor | None = None) -> Tensor:
    """Symmetric KL between ``softmax(logits [B, B])`` (video rows, text columns) and the same-label
    targets of ``targets [B, K]`` (or the given symmetric ``soft [B, B]``); batch mean, both directions averaged."""
    soft = same_label_targets(targets) if soft is None else soft.float()  # symmetric: serves both directions
    v2t = F.kl_div(F.log_softmax(logits.float(), dim=1), soft, reduction="batchmean")
    t2v = F.kl_div(F.log_softmax(logits.float().t(), dim=1), soft, reduction="batchmean")
    return 0.5 * (v2t + t2v)


def cross_modal_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-modal classification loss on **logits** ``[B, K]`` with (soft) ``targets [B, K]``."""
    return soft_target_cross_entropy(logits, targets)


def cross_modal_ce_on_probabilities(logits: Tensor, targets: Tensor) -> Tensor:
    """The released M2-CLIP term: cross-entropy applied to ``softmax(logits [B, K])`` as if they were logits
    (a bug, reproduced on purpose for official runs; :func:`cross_modal_ce` is the corrected form)."""
    return soft_target_cross_entropy(logits.float().softmax(dim=-1), targets)


# -- the official word-level MLM ------------------------------------------------------------------------
class Tokenizer(Protocol):
    """What :func:`build_mlm_batch` needs of a tokenizer (:class:`vidlang.models.clip.tokenizer.ClipTokenizer`)."""

    bos_id: int
    eot_id: int
    pad_id: int
    context_length: int

    def encode(self, text: str) -> list[int]: ...


def prompt_words(text: str) -> list[str]:
    """The words of a prompt as M2-CLIP splits them: lower-cased, on whitespace."""
    return text.lower().split()


class MLMVocabulary:
    """Word-level MLM classes: word -> index (M2-CLIP's ``*_mlm_lables.txt``)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = list(dict.fromkeys(w.lower() for w in words))
        if not self.words:
            raise ValueError("MLMVocabulary: no words")
        self._index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_prompts(cls, templates: Sequence[str], class_names: Sequence[str]) -> MLMVocabulary:
        """The sorted unique words of every ``template.format(name)`` (template words included)."""
        words = {w for t in templates for name in class_names for w in prompt_words(t.format(name))}
        return cls(sorted(words))

    def __len__(self) -> int:
        return len(self.words)

    def index(self, word: str) -> int | None:
        return self._index.get(word.lower())


def choose_masked_words(num_words: int, rate: float, rng: random.Random) -> list[int]:
    """``max(1, round(rate * num_words))`` distinct word positions, uniformly at random (none without words)."""
    if num_words == 0:
        return []
    count = min(num_words, max(1, round(num_words * rate)))
    return sorted(rng.sample(range(num_words), count))


@dataclass
class MLMBatch:
    input_ids: Tensor  # [A, Lt] long: BOS, word tokens (mask word at masked words), EOT, padding
    attention_mask: Tensor  # [A, Lt] long, 1 = token
    labels: Tensor  # [A, Lt] long: the word's vocabulary index at a masked word's first token, else -100


def build_mlm_batch(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    vocab: MLMVocabulary,
    *,
    rate: float = MLM_RATE,
    mask_word: str = MASK_WORD,
    sample_prob: float = 1.0,
    context_length: int | None = None,
    rng: random.Random | None = None,
) -> MLMBatch:
    """M2-CLIP's masked prompts (module docstring): each text is masked with probability ``sample_prob``.

    Ids are built word by word (each word encoded alone, as the official code does; for CLIP's BPE and
    vidlang's byte-level BPE this equals encoding the whole text). Word tokens beyond ``context_length - 2`` are
    cut (EOT kept), with their labels.
    """
    if not 0.0 <= rate <= 1.0 or not 0.0 <= sample_prob <= 1.0:
        raise ValueError(f"MLM rate and sample_prob must lie in [0, 1], got {rate} and {sample_prob}")
    mask_ids = tokenizer.encode(mask_word)
    if not mask_ids:
        raise ValueError(f"MLM mask word {mask_word!r} encodes to no token")
    rng = rng or random.Random()
    length = context_length or tokenizer.context_length
    ids = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.long)
    attn = torch.zeros((len(texts), length), dtype=torch.long)
    labels = torch.full((len(texts), length), IGNORE, dtype=torch.long)
    for row, text in enumerate(texts):
        words = prompt_words(text)
        masked = set(choose_masked_words(len(words), rate, rng)) if rng.random() < sample_prob else set()
        tokens: list[int] = []
        targets: list[int] = []
        for i, word in enumerate(words):
            if i in masked:
                label = vocab.index(word)
                tokens += mask_ids
                targets += [IGNORE if label is None else label] + [IGNORE] * (len(mask_ids) - 1)
            else:
                pieces = tokenizer.encode(word)
                tokens += pieces
                targets += [IGNORE] * len(pieces)
        keep = length - 2
        seq = [tokenizer.bos_id, *tokens[:keep], tokenizer.eot_id]
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        labels[row, 1 : 1 + len(targets[:keep])] = torch.tensor(targets[:keep], dtype=torch.long)
    return MLMBatch(ids, attn, labels)


def cross_attention(attn: Attention, query: Tensor, memory: Tensor) -> Tensor:
    """``attn``'s heads with queries from ``query [A, L, W]`` and keys / values from ``memory [A, M, W]`` (its
    fused ``qkv`` weights split into q, k, v; no mask) -> ``[A, L, W]``."""
    a, length, width = query.shape
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(query, w[:width], b[:width])  # [A, L, W]
    k, v = F.linear(memory, w[width:], b[width:]).split(width, dim=-1)  # [A, M, W] each

    def heads(x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], attn.heads, width // attn.heads).transpose(1, 2)  # [A, H, *, D]

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # [A, H, L, D]
    return attn.out_proj(out.transpose(1, 2).reshape(a, length, width))


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the positions with a label (``labels`` -100 elsewhere); 0 (not NaN) when none has one."""
    flat, target = logits.flatten(0, -2).float(), labels.flatten()
    if not bool((target != IGNORE).any()):
        return flat.sum() * 0.0  # keeps the graph: a zero gradient instead of NaN
    return F.cross_entropy(flat, target, ignore_index=IGNORE)


class M2CLIPMLM(nn.Module):
    """M2-CLIP's cross-modal MLM head: the 13th text block (cross-attention over the frames) + prediction head.

    ``text_layer`` / ``final_norm``: the text tower's last layer and ``ln_final``, copied and frozen here.
    ``adapter``: the 13th block's text adapter (width ``bottleneck``), before its MLP; ``adapter_init``
    ``"random"`` as official (where it starts as a copy of layer 11's adapter: :meth:`copy_adapter_from`).
    """

    def __init__(
        self,
        text_layer: ResidualAttentionLayer,
        final_norm: nn.Module,
        vocab_size: int,
        bottleneck: int = 384,
        adapter_init: str = "random",
    ) -> None:
        super().__init__()
        width = text_layer.ln_1.normalized_shape[0]
        self.width = width
        self.cross_layer = copy.deepcopy(text_layer).requires_grad_(False)  # frozen 13th block
        self.final_norm = copy.deepcopy(final_norm).requires_grad_(False)
        self.adapter = TextAdapter(width, min(bottleneck, width), adapter_init)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        for layer in (self.transform[0], self.decoder):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.transform[0].bias)

    @classmethod
    def from_text_tower(cls, text_tower: nn.Module, vocab_size: int, layer: int = -1, **kwargs) -> M2CLIPMLM:
        """Built on ``text_tower.layer_list()[layer]`` and ``text_tower.ln_final`` (vidlang's TextTower)."""
        return cls(text_tower.layer_list()[layer], text_tower.ln_final, vocab_size, **kwargs)

    def copy_adapter_from(self, adapter: TextAdapter) -> None:
        """Start the 13th block's adapter as a copy of ``adapter`` (official: of text layer 11's adapter)."""
        self.adapter.load_state_dict(adapter.state_dict())

    def forward(self, hidden: Tensor, frames: Tensor) -> Tensor:
        """``hidden [A, Lt, W]`` (last text layer's output, before ``ln_final``), ``frames [A, T, W]`` -> logits
        ``[A, Lt, V]``."""
        if frames.shape[-1] != self.width or hidden.shape[-1] != self.width:
            raise ValueError(
                f"M2CLIPMLM: text states {tuple(hidden.shape)} and frames {tuple(frames.shape)} must both have the "
                f"text width {self.width} (M2-CLIP needs embed dim == text width)"
            )
        layer = self.cross_layer
        x = hidden + cross_attention(layer.attn, layer.ln_1(hidden), layer.ln_1(frames))
        x = self.adapter(x)
        x = x + layer.mlp(layer.ln_2(x))
        return self.decoder(self.transform(self.final_norm(x))) + self.bias

    def loss(self, hidden: Tensor, frames: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on the masked words (:func:`masked_lm_loss`: 0, not NaN, without any)."""
        return masked_lm_loss(self.forward(hidden, frames), labels)


# -- the earlier vidlang variant --------------------------------------------------------------------------
def mask_tokens(
    ids: Tensor, mask: Tensor, mask_id: int, prob: float = 0.15, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Mask word tokens (not BOS, EOT or padding) of ``ids [A, Lt]``; at least one per caption.

    Returns ``masked_ids [A, Lt]`` and ``labels [A, Lt]`` (the original id where masked, -100 elsewhere).
    """
    lengths = mask.long().sum(dim=1)  # [A] BOS ... EOT
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, Lt]
    words = (pos >= 1) & (pos < (lengths[:, None] - 1))  # [A, Lt]
    u = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = words & (u < prob)
    # guarantee one masked word per caption that has words: the word with the smallest draw
    forced = torch.where(words, u, torch.full_like(u, 2.0)).argmin(dim=1)  # [A]
    has_words = words.any(dim=1)
    chosen[has_words, forced[has_words]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels


class CrossModalMLM(nn.Module):
    """Masked-token prediction from text token features ``[A, Lt, E]`` attending to frame features ``[A, T, E]``
    (the earlier vidlang variant; :class:`M2CLIPMLM` is the official one)."""

    def __init__(self, embed_dim: int, vocab_size: int, heads: int | None = None) -> None:
        super().__init__()
        heads = heads or max(1, embed_dim // 64)
        while embed_dim % heads:
            heads -= 1
        self.norm_q = nn.LayerNorm(embed_dim)
        self.norm_kv = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(embed_dim)
        self.vocab = nn.Linear(embed_dim, vocab_size)

    def forward(self, text_tokens: Tensor, frames: Tensor) -> Tensor:
        """``text_tokens [A, Lt, E]``, ``frames [A, T, E]`` -> vocabulary logits ``[A, Lt, V]``."""
        kv = self.norm_kv(frames)
        x = text_tokens + self.attn(self.norm_q(text_tokens), kv, kv, need_weights=False)[0]
        return self.vocab(self.norm_out(x))

    def loss(self, text_tokens: Tensor, frames: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on the masked positions (``labels`` = -100 elsewhere; 0, not NaN, without any)."""
        return masked_lm_loss(self.forward(text_tokens, frames), labels)

"""M2-CLIP's multi-task recognition losses (the TED block's paper), usable with any block.

- ``contrastive``: video-text KL. Each video in the batch is paired with its class text; the
  similarity ``[B, B]`` is pulled (KL) toward soft targets that spread each row's mass evenly over the
  videos of the same label (rows of ``y y^T``, normalised; ``y`` may be a mixed/smoothed target), in
  both directions (video->text and text->video), averaged.
- ``cross_modal``: cross-entropy of the video-vs-all-class-texts logits ``[B, K]``. **Logits**, not
  probabilities: the released M2-CLIP code feeds softmax *probabilities* to ``CrossEntropyLoss``
  (which applies log-softmax again), which flattens the loss and its gradient; vidlang applies it to
  the logits (:func:`cross_modal_ce`).
- ``head``: cross-entropy of a visual linear head.
- ``mlm``: cross-modal masked language modelling (weight 0.1): 15% of a class prompt's word tokens
  are replaced by the pad token, the prompt goes through the text tower, and each masked position's
  feature cross-attends to the video's frame embeddings before a vocabulary projection
  (:class:`CrossModalMLM`). CLIP's text tower is causal, so a masked position sees only its prefix
  (and the video): this is the same simplification as using a causal tower for MLM, documented here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.losses.classification import soft_target_cross_entropy

DEFAULT_WEIGHTS: dict[str, float] = {"contrastive": 1.0, "cross_modal": 1.0, "head": 1.0, "mlm": 0.1}


def same_label_targets(targets: Tensor) -> Tensor:
    """``targets [B, K]`` (one-hot or soft) -> ``[B, B]`` row-stochastic same-label weights."""
    sim = targets.float() @ targets.float().t()  # [B, B]
    return sim / sim.sum(dim=1, keepdim=True).clamp_min(1e-12)


def soft_contrastive_kl(logits: Tensor, targets: Tensor) -> Tensor:
    """Symmetric KL between ``softmax(logits [B, B])`` (video rows, text columns) and the same-label
    targets of ``targets [B, K]``; mean over rows, averaged over both directions."""
    soft = same_label_targets(targets)  # [B, B]; y y^T is symmetric, so it serves both directions
    v2t = F.kl_div(F.log_softmax(logits.float(), dim=1), soft, reduction="batchmean")
    t2v = F.kl_div(F.log_softmax(logits.float().t(), dim=1), soft, reduction="batchmean")
    return 0.5 * (v2t + t2v)


def cross_modal_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-modal classification loss on **logits** ``[B, K]`` with (soft) ``targets [B, K]``.

    (M2-CLIP's released code applies ``CrossEntropyLoss`` to softmax probabilities; that is a bug.)
    """
    return soft_target_cross_entropy(logits, targets)


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
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels


class CrossModalMLM(nn.Module):
    """Masked-token prediction from text token features ``[A, Lt, E]`` attending to frame features ``[A, T, E]``."""

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
        """Cross-entropy on the masked positions (``labels`` = -100 elsewhere)."""
        logits = self.forward(text_tokens, frames)  # [A, Lt, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

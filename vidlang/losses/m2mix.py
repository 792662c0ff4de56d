"""Geodesic multi-modal mixup (m^2-mix, Oh et al. NeurIPS 2023) as a retrieval loss (registry ``m2mix``).

Hard negatives are made on the hypersphere by mixing each positive pair's video and caption embeddings along
their geodesic: ``n_a = slerp(v_c(a), t_a; lam)`` with ``slerp(x, y; s) = sin(s th)/sin th x + sin((1-s) th)/sin th
y``, ``th = arccos(x . y)`` and ``lam ~ Beta(beta, beta)`` drawn once per step. The mixed logits keep the positives
and replace every negative by a mixed one (official code, ``--mmmix`` with ``--sep_scale``):

- caption row ``a``: positive ``t_a . v_c(a)``, negatives ``t_a . n_a'`` for the pairs ``a'`` of other videos
  (the other captions of the same video are neither);
- video row ``b``: positives ``v_b . t_a'`` for its captions, negatives ``v_b . n_a'`` for the pairs of other
  videos (several positives: each against the negatives only, as :func:`video_to_text_loss`).

All mixed logits are scaled by ``1 / mix_temperature`` (official: a separate 0.07; None: the main loss's scale),
and ``mix = CE(video rows) + CE(caption rows)`` (summed, as the official ``clip_loss2``). total = InfoNCE +
``weight`` x mix. With one caption per video this is the official form. Needs the embeddings (cosine
similarity). With the gather, every rank computes the mix term of the whole batch (also with ``local_loss``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.losses.contrastive import _NEG_FILL, LOSSES, ContrastiveLoss, Gathered, video_to_text_loss


def slerp(x: Tensor, y: Tensor, s: float | Tensor) -> Tensor:
    """Rows of unit vectors ``x, y [N, E]`` -> ``sin(s th)/sin th x + sin((1-s) th)/sin th y`` (official weights:
    ``s`` on ``x``'s side is ``sin(s th)``). Nearly identical rows are clamped away from ``th = 0``."""
    cos = (x * y).sum(dim=1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)  # [N, 1]
    th = torch.acos(cos)
    return (torch.sin(s * th) * x + torch.sin((1 - s) * th) * y) / torch.sin(th)


@LOSSES.register("m2mix")
class M2MixLoss(ContrastiveLoss):
    """InfoNCE + ``weight`` x the geodesic-mixup hard-negative loss (module docstring).

    Args:
        weight: of the mix term (official default 0.01; sweep 0.001-0.05).
        beta: ``lam ~ Beta(beta, beta)`` (official script: 0.5).
        mix_temperature: temperature of the mixed logits (official: 0.07); None = the main loss's scale.
        lam: a fixed mixing ratio instead of drawing it (tests, ablations).
    """

    needs_embeddings = True

    def __init__(self, weight: float = 0.01, beta: float = 0.5, mix_temperature: float | None = 0.07,
                 lam: float | None = None,
                 gather: bool = True, local_loss: bool = False, max_scale: float = 100.0,
                 temperature: float | None = None, directions: str = "mean") -> None:
        super().__init__(gather=gather, local_loss=local_loss, max_scale=max_scale, temperature=temperature,
                         directions=directions)
        if weight < 0 or beta <= 0 or (mix_temperature is not None and mix_temperature <= 0):
            raise ConfigError(f"loss 'm2mix': needs weight >= 0, beta > 0, mix_temperature > 0 (or null); got "
                              f"{weight}, {beta}, {mix_temperature}")
        if lam is not None and not 0.0 < lam < 1.0:
            raise ConfigError(f"loss 'm2mix': lam must lie in (0, 1), got {lam}")
        self.weight, self.beta, self.mix_temperature, self.lam = weight, beta, mix_temperature, lam

    def draw_lambda(self) -> float:
        if self.lam is not None:
            return self.lam
        return float(torch.distributions.Beta(self.beta, self.beta).sample())

    def extra_terms(self, batch: Gathered) -> dict[str, Tensor]:
        video, text, index = batch.video, batch.text, batch.caption_index
        paired = video[index]  # [A, E] the video of each caption
        mixed = slerp(paired, text, self.draw_lambda())  # [A, E] one hard negative per pair
        scale = batch.scale if self.mix_temperature is None else batch.scale.new_tensor(1 / self.mix_temperature)
        ids = torch.arange(video.shape[0], device=index.device)
        positives = ids[:, None] == index[None, :]  # [B, A]
        v_rows = torch.where(positives, video @ text.t(), video @ mixed.t())  # [B, A]
        same = index[:, None] == index[None, :]  # [A, A] pairs of the same video
        eye = torch.eye(index.numel(), dtype=torch.bool, device=index.device)
        t_rows = torch.where(eye, (text * paired).sum(dim=1).diag_embed(), text @ mixed.t())  # [A, A]
        t_rows = (scale * t_rows).masked_fill(same & ~eye, _NEG_FILL)
        mix = video_to_text_loss(scale * v_rows, positives) + video_to_text_loss(t_rows, eye)
        return {"mix": mix}

    def extra_weight(self, name: str) -> float:
        return self.weight

"""Alignment and uniformity terms (Wang & Isola, 2020) added to InfoNCE (registry ``align_uniform``).

On the L2-normalised embeddings of the (gathered) batch:

    align   = mean over (video, caption) positives of ||v - t||^alpha
    uniform = (U(videos) + U(captions)) / 2,   U(x) = log mean_{i<j} exp(-t * ||x_i - x_j||^2)

total = InfoNCE + align_weight * align + uniform_weight * uniform (``infonce_weight`` 0 trains on the two terms
alone, as Wang & Isola's loss). Adding both terms to the CLIP loss is the "contrastive gap" paper's recipe for
multi-modal embeddings that fill more of the sphere. Needs the embeddings: cosine similarity only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.losses.contrastive import LOSSES, ContrastiveLoss, Gathered


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """``mean_i ||x_i - y_i||^alpha`` of paired rows ``x, y [N, E]``."""
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of ``x [N, E]``; 0 for fewer than two rows."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    return torch.pdist(x.float(), p=2).pow(2).mul(-t).exp().mean().log()


@LOSSES.register("align_uniform")
class AlignUniformLoss(ContrastiveLoss):
    """InfoNCE + alignment + uniformity (module docstring)."""

    needs_embeddings = True

    def __init__(self, align_weight: float = 1.0, uniform_weight: float = 1.0, infonce_weight: float = 1.0,
                 alpha: float = 2.0, t: float = 2.0,
                 gather: bool = True, local_loss: bool = False, max_scale: float = 100.0,
                 temperature: float | None = None, directions: str = "mean") -> None:
        super().__init__(gather=gather, local_loss=local_loss, max_scale=max_scale, temperature=temperature,
                         directions=directions)
        if min(align_weight, uniform_weight, infonce_weight) < 0 or alpha <= 0 or t <= 0:
            raise ConfigError("loss 'align_uniform': weights must be >= 0 and alpha, t > 0, got "
                              f"{align_weight}, {uniform_weight}, {infonce_weight}, {alpha}, {t}")
        self.weights = {"align": align_weight, "uniform": uniform_weight}
        self.infonce_weight, self.alpha, self.t = infonce_weight, alpha, t

    def direction_losses(self, t2v: Tensor, text_targets: Tensor, v2t: Tensor, positives: Tensor
                         ) -> tuple[Tensor, Tensor]:
        t2v_loss, v2t_loss = super().direction_losses(t2v, text_targets, v2t, positives)
        return self.infonce_weight * t2v_loss, self.infonce_weight * v2t_loss

    def extra_terms(self, batch: Gathered) -> dict[str, Tensor]:
        align = alignment(batch.video[batch.caption_index], batch.text, self.alpha)
        uniform = (uniformity(batch.video, self.t) + uniformity(batch.text, self.t)) / 2
        return {"align": align, "uniform": uniform}

    def extra_weight(self, name: str) -> float:
        return self.weights[name]

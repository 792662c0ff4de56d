"""Soft-target contrastive loss for noisy captions: label smoothing and soft bootstrapping (registry ``soft_target``).

Each row of the InfoNCE (a caption over the videos; a (video, positive caption) pair over that caption and the
video's negative captions, as in :mod:`vidlang.losses.contrastive`) is a cross-entropy against a *soft* target
instead of the one-hot positive:

    q = (1 - smoothing) * onehot(positive) + smoothing / K           (K = the row's candidates)
    q <- (1 - bootstrap) * q + bootstrap * softmax(logits).detach()  (Reed et al. 2015, "soft" bootstrapping)

Label smoothing keeps a caption that does not describe its video (web captions) from pushing the logits to
infinity; bootstrapping lets the model's own (detached) in-batch prediction take part of the target, so a
near-duplicate negative is not pushed away at full strength. ``smoothing = bootstrap = 0`` is exactly ``infonce``.
Works with every similarity (it only changes the targets), with the gather and with ``local_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.losses.contrastive import _NEG_FILL, LOSSES, ContrastiveLoss


def soft_cross_entropy(logits: Tensor, valid: Tensor, target: Tensor, smoothing: float = 0.0,
                       bootstrap: float = 0.0) -> Tensor:
    """Per-row soft-target cross-entropy ``[R]`` over the valid candidates.

    ``logits [R, K]``, ``valid [R, K]`` bool (the row's candidates; the target must be one), ``target [R]`` column.
    """
    logits = logits.float().masked_fill(~valid, _NEG_FILL)
    logp = logits.log_softmax(dim=1)  # [R, K]
    onehot = F.one_hot(target, logits.shape[1]).to(logp.dtype)
    uniform = valid.to(logp.dtype) / valid.sum(dim=1, keepdim=True)
    q = (1.0 - smoothing) * onehot + smoothing * uniform
    if bootstrap:
        q = (1.0 - bootstrap) * q + bootstrap * logp.detach().exp()
    return -torch.where(valid, q * logp, torch.zeros_like(logp)).sum(dim=1)


@LOSSES.register("soft_target")
class SoftTargetLoss(ContrastiveLoss):
    """InfoNCE with soft targets (module docstring). ``smoothing``, ``bootstrap`` in [0, 1)."""

    def __init__(self, smoothing: float = 0.1, bootstrap: float = 0.0,
                 gather: bool = True, local_loss: bool = False, max_scale: float = 100.0,
                 temperature: float | None = None, directions: str = "mean") -> None:
        super().__init__(gather=gather, local_loss=local_loss, max_scale=max_scale, temperature=temperature,
                         directions=directions)
        for name, value in (("smoothing", smoothing), ("bootstrap", bootstrap)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"loss 'soft_target': {name} must lie in [0, 1), got {value}")
        self.smoothing, self.bootstrap = smoothing, bootstrap

    def direction_losses(self, t2v: Tensor, text_targets: Tensor, v2t: Tensor, positives: Tensor
                         ) -> tuple[Tensor, Tensor]:
        loss_t2v = soft_cross_entropy(t2v, torch.ones_like(t2v, dtype=torch.bool), text_targets, self.smoothing,
                                      self.bootstrap).mean()
        rows, cols = positives.nonzero(as_tuple=True)  # one row per (video, positive caption) pair: [P]
        if rows.numel() == 0:
            raise ValueError("video->text loss: no video has a caption in the batch")
        valid = ~positives[rows]  # [P, A] the video's negative captions ...
        valid[torch.arange(rows.numel(), device=rows.device), cols] = True  # ... and this positive
        pair = soft_cross_entropy(v2t[rows], valid, cols, self.smoothing, self.bootstrap)  # [P]
        per_video = torch.zeros(v2t.shape[0], device=pair.device).index_add_(0, rows, pair)
        count = positives.sum(dim=1)  # [B_rows]
        has = count > 0
        return loss_t2v, (per_video[has] / count[has]).mean()

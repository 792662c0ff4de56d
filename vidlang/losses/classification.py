"""Soft-target classification: label smoothing, mixup and cutmix on videos, soft-target cross-entropy.

Mixing follows the image recipe (timm's ``Mixup``) applied to whole clips: each batch is mixed with
itself flipped (sample ``i`` with ``B-1-i``), one ``lambda ~ Beta(alpha, alpha)`` per batch, the same
``lambda`` (and, for cutmix, the same box) for every frame of a clip. Targets are smoothed one-hot
vectors mixed with the same ``lambda``; for cutmix ``lambda`` is corrected to the exact pasted area.

Multi-label data: the targets given are ``[B, K]`` rows (multi-hot, or multi-hot normalised to sum 1
for the soft-target cross-entropy) instead of ``labels [B]``; smoothing (``y (1 - s) + s / K``) and
mixing apply to them row-wise in the same way, so a mixed row is ``lam y_i + (1 - lam) y_{B-1-i}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """``labels [B]`` -> ``[B, K]``: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` elsewhere."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must lie in [0, 1), got {smoothing}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


def multi_hot(label_set: Tensor, num_classes: int) -> Tensor:
    """``label_set [B, L]`` (class indices, ``-1`` = padding, as collated) -> float ``[B, K]`` with 1 at each label."""
    if label_set.ndim != 2:
        raise ValueError(f"label_set must be [B, L], got shape {tuple(label_set.shape)}")
    valid = label_set >= 0
    if bool((label_set[valid] >= num_classes).any()):
        bad = int(label_set[valid].max())
        raise ValueError(f"label {bad} outside [0, {num_classes}): the label set does not match the data")
    out = torch.zeros(label_set.shape[0], num_classes + 1, dtype=torch.float32, device=label_set.device)
    out.scatter_(1, torch.where(valid, label_set, num_classes).long(), 1.0)  # padding goes to a spare column
    return out[:, :num_classes]


def smooth_targets(targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """Label smoothing of target rows ``[B, K]``: ``targets * (1 - smoothing) + smoothing / K``
    (for one-hot rows the same as :func:`smooth_one_hot`)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must lie in [0, 1), got {smoothing}")
    return targets.float() * (1.0 - smoothing) + smoothing / targets.shape[1]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_k targets[b, k] * log_softmax(logits)[b, k]``; ``logits, targets [B, K]``."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A box ``(top, bottom, left, right)`` of about ``(1 - lam)`` of the area, centred uniformly at random
    and clipped to the frame."""
    ratio = (1.0 - lam) ** 0.5
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return top, bottom, left, right


def mix_videos(video: Tensor, lam: float) -> Tensor:
    """Mixup of ``video [B, ..., C, H, W]`` with its batch-flipped self: one ``lam`` for every frame."""
    return video * lam + video.flip(0) * (1.0 - lam)


def cutmix_videos(video: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """Paste ``box`` of the batch-flipped clips into ``video [B, ..., C, H, W]`` (same box on every frame)."""
    top, bottom, left, right = box
    out = video.clone()
    out[..., top:bottom, left:right] = video.flip(0)[..., top:bottom, left:right]
    return out


def mix_targets(labels: Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> Tensor:
    """``lam * y + (1 - lam) * y.flip(0)`` -> ``[B, K]``; ``y`` = smoothed one-hot of ``labels [B]``, or the
    smoothed target rows when ``labels`` is already ``[B, K]`` (multi-label data)."""
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"targets [B, K] with K = {num_classes} expected, got shape {tuple(labels.shape)}")
        y = smooth_targets(labels, smoothing)
    else:
        y = smooth_one_hot(labels, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


@dataclass
class MixOutput:
    video: Tensor  # same shape as the input
    targets: Tensor  # [B, K] soft targets (rows sum to 1 unless multi-hot rows were given)
    lam: float  # the weight of the un-flipped sample (1.0 = not mixed)
    mode: str  # "none", "mixup" or "cutmix"


class MixupCutmix:
    """Batch mixing for videos: ``(video [B, T, C, H, W] float, labels [B] or targets [B, K]) -> MixOutput``.

    ``mixup_alpha`` / ``cutmix_alpha``: Beta parameters (0 disables that kind); with both enabled,
    cutmix is chosen with ``switch_prob``. ``prob``: chance that a batch is mixed at all.
    ``label_smoothing`` applies to every batch, mixed or not.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0):
            raise ValueError(f"prob and switch_prob are probabilities, got {prob}, {switch_prob}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.label_smoothing = float(prob), float(switch_prob), float(label_smoothing)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _choose(self, generator: torch.Generator | None) -> tuple[str, float]:
        u = torch.rand(2, generator=generator).tolist()
        if not self.active or u[0] >= self.prob:
            return "none", 1.0
        use_cutmix = self.mixup_alpha == 0 or (self.cutmix_alpha > 0 and u[1] < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global RNG (seeded by Lightning)
        return ("cutmix" if use_cutmix else "mixup"), lam

    def __call__(
        self, video: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator | None = None
    ) -> MixOutput:
        mode, lam = self._choose(generator)
        if mode == "mixup":
            video = mix_videos(video, lam)
        elif mode == "cutmix":
            h, w = video.shape[-2:]
            box = cutmix_box(h, w, lam, generator)
            video = cutmix_videos(video, box)
            lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)  # the exact kept area
        targets = mix_targets(labels, num_classes, lam, self.label_smoothing)
        return MixOutput(video=video, targets=targets, lam=lam, mode=mode)

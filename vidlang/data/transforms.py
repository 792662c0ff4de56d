"""Video transforms as tensor ops on ``[..., T, C, H, W]`` that run unchanged on CPU and GPU.

Pipeline: in the worker (or on the GPU when frames are decoded there) a clip is cropped /
resized to a fixed ``size`` while still ``uint8`` so that batches stack; normalisation to
float with the model's mean/std happens on the device (the task calls :func:`normalize`
in ``on_after_batch_transfer``).

* Training: :class:`RandomResizedCrop` (one crop box per clip, shared by all its frames
  and views) + optional horizontal flip.
* Evaluation: short-side resize + center crop (:class:`ResizeCenterCrop`), or
  :class:`ThreeCrop` (three spatial views along the long side, for multi-view testing).

**Why the flip is off by default.** Mirroring a clip turns "moves left" into "moves right"
and a clockwise turn into a counter-clockwise one. On direction-sensitive data (the
synthetic corpus, SSv2, any caption mentioning a direction) a plain flip teaches the model
wrong pairs. :func:`flip_captions` swaps the direction words so that a flipped clip keeps a
true caption; labels cannot be swapped generically, so for recognition data with direction
classes keep the flip off.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SWAPS = {
    "left": "right",
    "leftward": "rightward",
    "leftwards": "rightwards",
    "clockwise": "counter-clockwise",
    "counterclockwise": "clockwise",
    "counter-clockwise": "clockwise",
    "anticlockwise": "clockwise",
    "anti-clockwise": "clockwise",
}
_SWAPS.update({v: k for k, v in list(_SWAPS.items()) if v not in _SWAPS})
_WORD = re.compile(r"(?<!\w)(" + "|".join(sorted(map(re.escape, _SWAPS), key=len, reverse=True)) + r")(?!\w)", re.I)


def _match_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


def flip_captions(captions: Sequence[str]) -> list[str]:
    """Swap direction words (left<->right, clockwise<->counter-clockwise) after a horizontal flip."""
    return [_WORD.sub(lambda m: _match_case(_SWAPS[m.group(0).lower()], m.group(0)), c) for c in captions]


def normalize(
    video: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """``uint8 [..., C, H, W]`` (any layout) -> contiguous float32 ``(x / 255 - mean) / std`` (channel dim at -3)."""
    if video.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 frames, got {video.dtype}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=video.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=video.device).view(-1, 1, 1)
    # one pass converts dtype and layout: channels-last batches come out contiguous
    x = torch.empty(video.shape, dtype=torch.float32, device=video.device).copy_(video)
    return x.div_(255.0).sub_(m).div_(s)


def resize_short_side(video: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[..., C, H, W]`` so that min(H, W) == size (aspect kept, antialiased)."""
    h, w = video.shape[-2:]
    if min(h, w) == size:
        return video
    if h <= w:
        new = (size, max(size, round(w * size / h)))
    else:
        new = (max(size, round(h * size / w)), size)
    return TF.resize(video, list(new), antialias=True)


class ResizeCenterCrop:
    """Eval transform: short-side resize to ``size`` then a ``size x size`` center crop."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:  # [..., T, C, H, W] -> [..., T, C, S, S]
        return TF.center_crop(resize_short_side(video, self.size), [self.size, self.size])


class ThreeCrop:
    """Multi-view eval: short-side resize, then 3 square crops along the long side.

    ``[V, T, C, H, W]`` -> ``[V * 3, T, C, S, S]`` (views ordered clip-major: clip0 crops 0..2, ...).
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        x = resize_short_side(video, self.size)  # [V, T, C, h, w]
        h, w = x.shape[-2:]
        s = self.size
        if w >= h:
            boxes = [(0, (w - s) * k // 2) for k in range(3)]
        else:
            boxes = [((h - s) * k // 2, 0) for k in range(3)]
        crops = [TF.crop(x, top, left, s, s) for top, left in boxes]  # 3 x [V, T, C, S, S]
        return torch.stack(crops, dim=1).flatten(0, 1)


def random_crop_box(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) box covering ``scale`` of the area with aspect in ``ratio``."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            return top, left, ch, cw
    # fallback: the largest centred box with the closest allowed aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class RandomResizedCrop:
    """Train transform: one random box per clip (all frames and views share it), resized to ``size``."""

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def __call__(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = video.shape[-2:]
        top, left, ch, cw = random_crop_box(h, w, self.scale, self.ratio, generator)
        # antialiasing only matters when shrinking; plain bilinear is ~25% faster when enlarging
        shrink = ch > self.size or cw > self.size
        return TF.resized_crop(video, top, left, ch, cw, [self.size, self.size], antialias=shrink)


class ClipTransform:
    """The per-sample transform used by the datasets: ``(video [V,T,C,H,W] uint8, captions) -> same``.

    ``mode``: ``"train"`` (random resized crop + optional flip), ``"eval"`` (resize + center crop)
    or ``"three_crop"`` (eval, V -> 3V spatial views). Output stays uint8.
    """

    def __init__(
        self,
        size: int = 224,
        mode: str = "eval",
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
    ) -> None:
        if mode not in ("train", "eval", "three_crop"):
            raise ValueError(f"transform mode must be train, eval or three_crop, got {mode!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        self.mode, self.size, self.hflip = mode, int(size), float(hflip)
        self._train = RandomResizedCrop(size, scale, ratio)
        self._eval = ResizeCenterCrop(size) if mode != "three_crop" else ThreeCrop(size)

    def __call__(
        self, video: torch.Tensor, captions: list[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        if self.mode != "train":
            return self._eval(video), captions
        video = self._train(video, generator)
        if self.hflip > 0 and float(torch.rand(1, generator=generator)) < self.hflip:
            video = TF.horizontal_flip(video)
            captions = flip_captions(captions)
        return video, captions

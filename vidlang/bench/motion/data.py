"""Data side of ``vidlang bench temporal``: the synthetic corpus decoded once into memory.

Every video of the corpus is decoded fully, once, resized (short side + centre crop) to the model's
image size and kept as ``uint8 [V, N, 3, S, S]``. Clips are then index look-ups:

- **eval**: TSN segment middles (:class:`~vidlang.data.sampling.SegmentSampler`, ``training=False``).
  They must be *symmetric* -- index ``k`` is sampled iff ``N - 1 - k`` is -- so that the eval clip of a
  video and of its time reversal hold the same frames in reverse order; then an order-free model
  (``mean``) gives both the same embedding and cannot separate a reverse pair. Segment middles are
  symmetric iff no middle falls exactly on a frame boundary, e.g. N = 3 T (our corpus: 24 frames, T = 8);
  :func:`eval_indices` checks it and refuses an asymmetric layout.
- **train**: a random time inside each segment (TSN training), drawn from one seeded generator, so
  every block sees the same clips in the same order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vidlang.data.synthetic.spec import MOTIONS, REVERSE_PAIRS


@dataclass
class ClipBank:
    """Decoded videos of one corpus split group, in memory."""

    frames: Tensor  # [V, N, 3, S, S] uint8, all N frames of every video
    timestamps: Tensor  # [N] float64 seconds (the same for every video of the corpus)
    duration: float  # seconds
    labels: Tensor  # [V] long, motion label (index in MOTIONS)
    shapes: Tensor  # [V] long, shape id
    colors: Tensor  # [V] long, colour id
    rgb: Tensor  # [V, 3] uint8, the primary shape's colour
    keys: list[str]

    def __len__(self) -> int:
        return self.frames.shape[0]


def ensure_corpus(corpus: str | Path, num_videos: int, seed: int, frames: int, progress: bool = True) -> Path:
    """Reuse ``corpus`` if it holds a manifest, else generate ``num_videos`` videos of ``frames`` frames there."""
    from vidlang.data.synthetic import generate_corpus

    out = Path(corpus)
    if (out / "manifest.csv").is_file():
        return out
    generate_corpus(out, num_videos, seed, size=64, frames=frames, fps=8.0, workers=2, progress=progress)
    return out


def read_manifest(corpus: Path) -> list[dict]:
    path = corpus / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {corpus} a vidlang synthetic corpus (vidlang synth)?")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"key", "path", "split", "motion", "shape", "color"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(f"{path}: empty or missing columns {sorted(missing)}")
    bad = sorted({r["motion"] for r in rows} - set(MOTIONS))
    if bad:
        raise ValueError(f"{path}: unknown motions {bad}; expected {MOTIONS}")
    return rows


def _decode_all(path: Path, size: int) -> tuple[Tensor, Tensor, float]:
    """All frames of one video -> (``uint8 [N, 3, size, size]``, timestamps ``[N]``, duration)."""
    from vidlang.data.decoding import open_video
    from vidlang.data.transforms import ResizeCenterCrop

    with open_video(path) as reader:
        ts = reader.frame_timestamps()
        frames = reader.get_frames(list(range(len(ts))))  # [N, 3, H, W]
        duration = reader.metadata.duration
    return ResizeCenterCrop(size)(frames), ts, duration


def load_bank(corpus: Path, rows: list[dict], size: int, desc: str, progress: bool = True) -> ClipBank:
    """Decode the videos of ``rows`` once into a :class:`ClipBank` (all must share one frame layout)."""
    from vidlang.data.synthetic.spec import COLORS, SHAPES
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    frames, ts0, dur0 = [], None, None
    for row in tqdm(rows, desc=f"decode {desc}", unit="video", disable=not progress):
        f, ts, dur = _decode_all(corpus / row["path"], size)
        if ts0 is None:
            ts0, dur0 = ts, dur
        elif ts.shape != ts0.shape or not torch.allclose(ts, ts0):
            raise ValueError(f"{corpus / row['path']}: frame timestamps differ from the corpus' first video")
        frames.append(f)
    return ClipBank(
        frames=torch.stack(frames),
        timestamps=ts0,
        duration=float(dur0),
        labels=torch.tensor([MOTIONS.index(r["motion"]) for r in rows]),
        shapes=torch.tensor([SHAPES.index(r["shape"]) for r in rows]),
        colors=torch.tensor([list(COLORS).index(r["color"]) for r in rows]),
        rgb=torch.tensor([COLORS[r["color"]] for r in rows], dtype=torch.uint8),
        keys=[r["key"] for r in rows],
    )


def eval_indices(timestamps: Tensor, duration: float, num_frames: int) -> Tensor:
    """Segment-middle frame indices ``[T]``; raises if they are not symmetric under time reversal."""
    from vidlang.data.sampling import build_sampler

    idx = build_sampler("segment", num_frames=num_frames)(timestamps, duration, training=False)[0]  # [T]
    n = timestamps.numel()
    if not torch.equal(idx, (n - 1) - idx.flip(0)):
        raise ValueError(
            f"eval sampling of {num_frames} segment middles over {n} frames is not symmetric under time reversal "
            f"(indices {idx.tolist()}): a segment middle falls on a frame boundary. Use a corpus with "
            f"frames = 3 x T (e.g. {3 * num_frames}) or another --frames"
        )
    return idx


def train_indices(bank: ClipBank, num_frames: int, batch: int, generator: torch.Generator) -> Tensor:
    """Random-offset segment indices for ``batch`` clips -> ``[batch, T]``."""
    from vidlang.data.sampling import build_sampler

    sampler = build_sampler("segment", num_frames=num_frames)
    rows = [sampler(bank.timestamps, bank.duration, training=True, generator=generator)[0] for _ in range(batch)]
    return torch.stack(rows)


def clips_at(bank: ClipBank, videos: Tensor, indices: Tensor) -> Tensor:
    """Clips of ``videos [B]`` at frame ``indices [B, T]`` (or ``[T]`` for all) -> ``uint8 [B, T, 3, S, S]``."""
    if indices.ndim == 1:
        indices = indices.expand(videos.shape[0], -1)
    return bank.frames[videos[:, None], indices]


def frame_moments(frames: Tensor, rgb: Tensor, tol: int = 60) -> Tensor:
    """Per-frame geometry of the primary shape, found by its colour -> ``[M, 5]`` float.

    ``frames uint8 [M, 3, S, S]``, ``rgb [M, 3]`` the shape's colour. Columns: centroid x, y in [-1, 1],
    sqrt(area fraction), and the orientation of its second moments weighted by elongation,
    ``((vxx - vyy), 2 vxy) / (vxx + vyy)`` (angle-doubled, so defined for a symmetric shape). A frame
    without any pixel of that colour gets zeros. Order-free: it looks at one frame at a time.
    """
    s = frames.shape[-1]
    diff = (frames.to(torch.int16) - rgb.to(torch.int16)[:, :, None, None]).abs().amax(dim=1)  # [M, S, S]
    mask = (diff <= tol).float()
    area = mask.sum(dim=(1, 2)).clamp_min(1.0)  # [M]
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1  # [S] in [-1, 1]
    y, x = coords[:, None], coords[None, :]
    cx = (mask * x).sum(dim=(1, 2)) / area
    cy = (mask * y).sum(dim=(1, 2)) / area
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]  # [M, S, S]
    vxx, vyy = (mask * dx * dx).sum(dim=(1, 2)) / area, (mask * dy * dy).sum(dim=(1, 2)) / area
    vxy = (mask * dx * dy).sum(dim=(1, 2)) / area
    total = (vxx + vyy).clamp_min(1e-6)
    out = torch.stack([cx, cy, (mask.sum(dim=(1, 2)) / (s * s)).sqrt(), (vxx - vyy) / total, 2 * vxy / total], 1)
    return out * (mask.sum(dim=(1, 2)) > 0)[:, None]


def _label_map(swaps: dict[str, str]) -> Tensor:
    """``[classes]`` long: the motion label a video gets after a transform that swaps these motions."""
    return torch.tensor([MOTIONS.index(swaps.get(m, m)) for m in MOTIONS])


# (dims to flip on [B, T, 3, S, S], label permutation) of each label-aware augmentation
AUGMENTATIONS: dict[str, tuple[tuple[int, ...], Tensor]] = {
    "reverse_time": ((1,), _label_map(REVERSE_PAIRS)),
    "hflip": ((4,), _label_map({"left": "right", "right": "left", "clockwise": "counterclockwise",
                                "counterclockwise": "clockwise"})),
    "vflip": ((3,), _label_map({"up": "down", "down": "up", "clockwise": "counterclockwise",
                                "counterclockwise": "clockwise"})),
}  # fmt: skip


def augment(clips: Tensor, labels: Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """Label-aware augmentation of ``clips [B, T, 3, S, S]`` and motion ``labels [B]``.

    Each clip is, independently with probability ``p`` each, reversed in time (a pair's label becomes its
    reverse), flipped horizontally (left <-> right, clockwise <-> counter-clockwise) and vertically
    (up <-> down, clockwise <-> counter-clockwise). Time reversal shows every clip's frame set under both
    labels of its pair, so frame order is the only way to tell them apart (no memorising a video).
    """
    clips, labels = clips.clone(), labels.clone()
    for dims, mapping in AUGMENTATIONS.values():
        pick = torch.rand(clips.shape[0], generator=generator) < p  # [B]
        if pick.any():
            clips[pick] = clips[pick].flip(dims)
            labels[pick] = mapping[labels[pick]]
    return clips, labels


def pair_members() -> list[tuple[int, int]]:
    """(label, reverse label) for every paired motion class."""
    return [(MOTIONS.index(a), MOTIONS.index(b)) for a, b in REVERSE_PAIRS.items()]

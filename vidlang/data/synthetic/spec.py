"""Vocabulary of the synthetic corpus and the deterministic per-video specs.

Everything a video shows or plays is decided here, from one seed, in the main
process; rendering and encoding are pure functions of a :class:`VideoSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Motion classes; the list index is the recognition label (stable).
MOTIONS: list[str] = ["static", "left", "right", "up", "down", "grow", "shrink", "clockwise", "counterclockwise"]
LABEL_NAMES: dict[str, str] = {
    "static": "staying still",
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "grow": "growing",
    "shrink": "shrinking",
    "clockwise": "turning clockwise",
    "counterclockwise": "turning counter-clockwise",
}
# Order-dependent pairs: the frames of one are the frames of the other, reversed in time.
REVERSE_PAIRS: dict[str, str] = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "grow": "shrink",
    "shrink": "grow",
    "clockwise": "counterclockwise",
    "counterclockwise": "clockwise",
}
SOUNDS: list[str] = ["low", "high", "beeping", "silence"]

SHAPES: list[str] = ["circle", "square", "triangle", "rectangle", "diamond", "cross", "arrow"]
ROTATABLE_SHAPES: list[str] = ["triangle", "rectangle", "arrow"]  # rotation is clearly visible on these
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "pink": (240, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (110, 110, 110), "white": (235, 235, 235)}

# a few tone frequencies (Hz) per sound and beep rates (Hz): a small set of distinct soundtracks, so each
# one is AAC-encoded once per worker and re-muxed (AAC encoding is the slowest step otherwise)
TONES: dict[str, tuple[float, ...]] = {
    "low": (196.0, 220.0, 247.0),
    "high": (1568.0, 1760.0, 1976.0),
    "beeping": (784.0, 880.0, 988.0),
    "silence": (0.0,),
}
BEEP_RATES: tuple[float, ...] = (3.0, 4.0, 5.0)

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_PATTERN = ("train",) * 8 + ("val", "test")  # 80 / 10 / 10


@dataclass(frozen=True)
class ShapeSpec:
    """One shape. Positions are fractions of the frame, ``size`` the diameter / frame side, angle in degrees."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float
    angle: float = 0.0


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render, encode and describe one video.

    The motion of ``primary`` goes from ``start`` to ``end`` of the attribute it moves
    (``cx``/``cy`` fraction, ``size`` fraction or ``angle`` degrees); the reversed
    member of a pair uses the same ``start``/``end`` with time reversed.
    """

    index: int
    key: str
    size: int
    frames: int
    fps: float
    background: str
    primary: ShapeSpec
    motion: str
    start: float
    end: float
    sound: str
    has_audio: bool
    tone_hz: float
    beep_hz: float
    sample_rate: int
    distractor: ShapeSpec | None = None
    split: str = "train"
    captions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> int:
        return MOTIONS.index(self.motion)

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def _balanced(values: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` values, each used equally often (+-1), in random order."""
    reps = -(-n // len(values))
    out = (values * reps)[:n]
    return [out[i] for i in rng.permutation(n)]


def _motion_geometry(motion: str, rng: np.random.Generator) -> tuple[ShapeSpec, float, float]:
    """Primary shape placement and the (start, end) of the moving attribute, large and inside the frame."""
    if motion in ("clockwise", "counterclockwise"):
        shape = str(rng.choice(ROTATABLE_SHAPES))
    else:
        shape = str(rng.choice(SHAPES))
    color = str(rng.choice(list(COLORS)))
    angle = float(rng.uniform(0, 360))
    size = float(rng.uniform(0.38, 0.48))
    cx, cy = (float(v) for v in rng.uniform(0.35, 0.65, 2))
    start = end = 0.0
    if motion in ("left", "right"):  # attribute cx: left edge -> right edge
        start, end = float(rng.uniform(0.22, 0.28)), float(rng.uniform(0.72, 0.78))
    elif motion in ("up", "down"):  # attribute cy: top -> bottom
        start, end = float(rng.uniform(0.22, 0.28)), float(rng.uniform(0.72, 0.78))
    elif motion in ("grow", "shrink"):  # attribute size: small -> large
        start, end = float(rng.uniform(0.2, 0.26)), float(rng.uniform(0.68, 0.78))
        cx, cy = (float(v) for v in rng.uniform(0.45, 0.55, 2))
    elif motion in ("clockwise", "counterclockwise"):  # attribute angle (degrees), clockwise on screen
        size = float(rng.uniform(0.58, 0.72))
        cx, cy = (float(v) for v in rng.uniform(0.45, 0.55, 2))
        start = angle
        end = angle + float(rng.uniform(120, 180))
    return ShapeSpec(shape, color, cx, cy, size, angle), start, end


def _distractor(primary: ShapeSpec, rng: np.random.Generator) -> ShapeSpec:
    """A small still shape in a corner, in another colour."""
    color = str(rng.choice([c for c in COLORS if c != primary.color]))
    cx, cy = (float(v) for v in rng.choice([0.14, 0.86], 2))
    return ShapeSpec(str(rng.choice(SHAPES)), color, cx, cy, 0.2, float(rng.uniform(0, 360)))


def make_specs(
    num_videos: int, seed: int, *, size: int = 64, frames: int = 24, fps: float = 8.0, sample_rate: int = 16000
) -> list[VideoSpec]:
    """Deterministic specs (with captions and split) for a corpus of ``num_videos`` videos."""
    from vidlang.data.synthetic.captions import make_captions

    if num_videos < 1:
        raise ValueError(f"need at least one video, got {num_videos}")
    if size < 16 or size % 2:
        raise ValueError(f"frame size must be an even number >= 16 (yuv420p), got {size}")
    if frames < 2:
        raise ValueError(f"need at least 2 frames per video, got {frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rng = np.random.default_rng(seed)
    motions, sounds = _balanced(MOTIONS, num_videos, rng), _balanced(SOUNDS, num_videos, rng)
    specs, silent_seen = [], 0
    for i in range(num_videos):
        primary, start, end = _motion_geometry(motions[i], rng)
        distractor = _distractor(primary, rng) if rng.random() < 0.35 else None
        has_audio = True
        if sounds[i] == "silence":  # every other silent video has no audio stream at all
            has_audio, silent_seen = silent_seen % 2 == 1, silent_seen + 1
        spec = VideoSpec(
            index=i,
            key=str(100_000_000 + i),
            size=size,
            frames=frames,
            fps=float(fps),
            background=str(rng.choice(list(BACKGROUNDS))),
            primary=primary,
            motion=motions[i],
            start=start,
            end=end,
            sound=sounds[i],
            has_audio=has_audio,
            tone_hz=float(rng.choice(TONES[sounds[i]])),
            beep_hz=float(rng.choice(BEEP_RATES)) if sounds[i] == "beeping" else 0.0,
            sample_rate=sample_rate,
            distractor=distractor,
        )
        specs.append(_with(spec, captions=tuple(make_captions(spec, rng))))
    splits = assign_splits(specs, rng)
    return [_with(s, split=splits[s.index]) for s in specs]


def _with(spec: VideoSpec, **changes) -> VideoSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def assign_splits(specs: list[VideoSpec], rng: np.random.Generator) -> dict[int, str]:
    """80/10/10 split stratified by motion: videos of each motion, shuffled, are laid end to end
    (motions in label order) and position ``i`` gets ``("train",)*8 + ("val", "test")`` at ``i % 10``."""
    order: list[int] = []
    for motion in MOTIONS:
        group = [s.index for s in specs if s.motion == motion]
        order += [group[j] for j in rng.permutation(len(group))]
    return {idx: _SPLIT_PATTERN[pos % len(_SPLIT_PATTERN)] for pos, idx in enumerate(order)}

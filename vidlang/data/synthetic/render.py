"""Pure-numpy rendering of a :class:`VideoSpec`: RGB frames and the mono waveform.

Shapes are unions of convex polygons (or a disc) in a unit frame (bounding radius
about 1), rasterised at pixel centres without anti-aliasing. The moving attribute
of frame ``k`` is ``start + (end - start) * p`` with ``p = j / (T - 1)`` and
``j = k`` for the forward member of a pair (``right``, ``down``, ``grow``,
``clockwise``) and ``j = T - 1 - k`` for its reverse, computed from the same integer
``j`` -- so the reversed motion is *bit-exactly* the time-reversed frame sequence.
Angles increase clockwise on screen (image y points down).
"""

from __future__ import annotations

import numpy as np

from vidlang.data.synthetic.spec import BACKGROUNDS, COLORS, ShapeSpec, VideoSpec

Poly = list[tuple[float, float]]


def _rect(hx: float, hy: float, x0: float = 0.0) -> Poly:
    return [(x0 - hx, -hy), (x0 + hx, -hy), (x0 + hx, hy), (x0 - hx, hy)]


# convex parts of each shape, vertices in order (unit coordinates, pointing to +x at angle 0)
SHAPE_POLYGONS: dict[str, list[Poly]] = {
    "square": [_rect(0.72, 0.72)],
    "rectangle": [_rect(0.95, 0.5)],
    "triangle": [[(1.0, 0.0), (-0.75, 0.66), (-0.75, -0.66)]],  # isosceles pointer: no rotational symmetry
    "diamond": [[(1.0, 0.0), (0.0, 0.62), (-1.0, 0.0), (0.0, -0.62)]],
    "cross": [_rect(0.95, 0.3), _rect(0.3, 0.95)],
    "arrow": [_rect(0.5, 0.22, x0=-0.45), [(1.0, 0.0), (0.05, 0.62), (0.05, -0.62)]],
}

# motion -> (attribute moved, +1 forward in time / -1 reversed)
MOTION_TRACKS: dict[str, tuple[str | None, int]] = {
    "static": (None, 1),
    "right": ("cx", 1),
    "left": ("cx", -1),
    "down": ("cy", 1),
    "up": ("cy", -1),
    "grow": ("size", 1),
    "shrink": ("size", -1),
    "clockwise": ("angle", 1),
    "counterclockwise": ("angle", -1),
}


def _inside_convex(u: np.ndarray, v: np.ndarray, poly: Poly) -> np.ndarray:
    """Boolean mask of points (u, v) inside a convex polygon (either vertex order)."""
    pts = np.asarray(poly, dtype=np.float64)
    nxt = np.roll(pts, -1, axis=0)
    pos = np.ones(u.shape, dtype=bool)
    neg = np.ones(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, nxt, strict=True):
        cross = (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)
        pos &= cross >= 0
        neg &= cross <= 0
    return pos | neg


def shape_mask(shape: ShapeSpec, height: int, width: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels the shape covers."""
    side = min(height, width)
    radius = max(shape.size * side / 2.0, 0.5)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - shape.cx * width, ys - shape.cy * height
    if shape.shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape.shape not in SHAPE_POLYGONS:
        raise ValueError(f"unknown shape {shape.shape!r}; known: circle, {', '.join(SHAPE_POLYGONS)}")
    theta = np.deg2rad(shape.angle)
    c, s = np.cos(theta), np.sin(theta)
    u, v = (c * dx + s * dy) / radius, (-s * dx + c * dy) / radius  # inverse rotation into the unit frame
    mask = np.zeros((height, width), dtype=bool)
    for poly in SHAPE_POLYGONS[shape.shape]:
        mask |= _inside_convex(u, v, poly)
    return mask


def shape_at(spec: VideoSpec, k: int) -> ShapeSpec:
    """The primary shape as it is in frame ``k``."""
    from dataclasses import replace

    attr, direction = MOTION_TRACKS[spec.motion]
    if attr is None:
        return spec.primary
    t = spec.frames
    j = k if direction > 0 else t - 1 - k
    p = j / (t - 1)
    return replace(spec.primary, **{attr: spec.start + (spec.end - spec.start) * p})


def render_video(spec: VideoSpec) -> np.ndarray:
    """The video's frames -> ``uint8 [T, H, W, 3]`` RGB."""
    h = w = spec.size
    base = np.empty((h, w, 3), dtype=np.uint8)
    base[:] = BACKGROUNDS[spec.background]
    if spec.distractor is not None:
        base[shape_mask(spec.distractor, h, w)] = COLORS[spec.distractor.color]
    out = np.empty((spec.frames, h, w, 3), dtype=np.uint8)
    color = np.asarray(COLORS[spec.primary.color], dtype=np.uint8)
    for k in range(spec.frames):
        out[k] = base
        out[k][shape_mask(shape_at(spec, k), h, w)] = color
    return out


def render_audio(spec: VideoSpec) -> np.ndarray | None:
    """The soundtrack -> float32 mono ``[S]`` in [-1, 1] at ``spec.sample_rate``; ``None`` without an audio stream.

    ``low``/``high``: a steady sine at ``tone_hz``; ``beeping``: the sine gated on and off
    ``beep_hz`` times a second; ``silence``: zeros (a real, silent track).
    """
    if not spec.has_audio:
        return None
    sr = spec.sample_rate
    n = round(spec.duration * sr)
    t = np.arange(n, dtype=np.float64) / sr
    if spec.sound == "silence":
        return np.zeros(n, dtype=np.float32)
    wave = 0.3 * np.sin(2 * np.pi * spec.tone_hz * t)
    if spec.sound == "beeping":
        wave *= (np.floor(t * spec.beep_hz * 2) % 2) == 0  # on for the first half of each period
    fade = min(n // 2, int(0.01 * sr))  # 10 ms fades: no clicks at the ends
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    return wave.astype(np.float32)

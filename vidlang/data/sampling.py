"""Frame samplers: choose *times* in seconds, then map them to frame indices.

Every sampler works on the video's real presentation timestamps, so it is safe for
variable frame rate: a time ``t`` maps to the frame on screen at ``t`` (the last frame
whose pts <= t, clamped to the first/last frame).

Rules shared by all samplers:

* **Span.** The video span is ``[ts[0], end)``. ``duration`` is measured from the first
  frame (``VideoMetadata.duration``), so ``end = ts[0] + duration`` when that lies after
  the last pts, and otherwise (unknown or inconsistent duration) ``ts[-1]`` plus the
  typical frame interval.
  An optional ``window=(start, end)`` (seconds, same time base as the timestamps;
  timestamped captions) is clamped to the video span; a window that is empty,
  reversed, not finite or lies outside the video raises :class:`ValueError`.
  Sampled times always lie inside the span, so indices stay within the frames shown
  during it.
* **Output.** ``LongTensor [V, T]``: ``V`` views (1 except for ``multiview`` in eval),
  ``T == num_frames`` always; each row is non-decreasing.
* **Short video (or window) rule.** A sampler never invents frames outside the span.
  If the span is shorter than the clip a sampler asks for, the clip is shrunk to the
  span; if the span holds fewer than ``T`` frames, several of the ``T`` times fall on
  the same frame, so the nearest frames repeat at consecutive positions (order kept)
  and ``T`` stays exactly ``num_frames``. E.g. 3 frames, ``segment`` with T=6 (eval)
  -> ``[0, 0, 1, 1, 2, 2]``.

Two options of every sampler, applied by :meth:`FrameSampler.sample_indices` after the sampling itself
(set by :func:`build_sampler` / ``data.sampling``):

* ``short_video``: ``repeat`` (default, the rule above) or ``mask`` (CLIP4Clip): a row keeps each of its
  distinct frames once, in order, and the slots after them are padding, marked False in a bool frame mask
  ``[V, T]`` (they repeat the last real frame, so that the clip still stacks; mask-aware blocks leave them
  out). A row is padded exactly when its ``T`` indices hold fewer than ``T`` distinct frames: a short span, or
  a training clip whose random times fall twice on one frame.
* ``frame_order``: ``ordinary`` (default), ``reverse`` or ``random`` (a new permutation per clip, from the
  sample's generator), applied to the real frames of each row (CLIP4Clip's ``--train_frame_order`` /
  ``--eval_frame_order`` 0 / 1 / 2); rows are then no longer non-decreasing.

Deviation from CLIP4Clip: its padded slots are zero images; here they repeat the last real frame (blocks that
honour the mask never see them; the others refuse a padded mask).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from vidlang.registry import Registry

Window = tuple[float, float]
SHORT_VIDEO_MODES = ("repeat", "mask")
FRAME_ORDERS = ("ordinary", "reverse", "random")


def video_span(timestamps: Tensor, duration: float) -> tuple[float, float]:
    """The ``[start, end)`` span in seconds covered by a video with these frame timestamps."""
    if timestamps.ndim != 1 or timestamps.numel() == 0:
        raise ValueError(f"frame timestamps must be a non-empty 1-D tensor, got shape {tuple(timestamps.shape)}")
    ts = timestamps.to(torch.float64)
    first, last = float(ts[0]), float(ts[-1])
    if duration is not None and math.isfinite(duration) and first + duration > last:
        return first, first + float(duration)
    step = float(ts.diff().median()) if ts.numel() > 1 else 0.0
    if not step > 0:
        step = 1e-3  # a single frame (or degenerate pts): a tiny span around it
    return first, last + step


def restrict_span(v_start: float, v_end: float, window: Window | None) -> tuple[float, float]:
    """The video span ``[v_start, v_end)`` restricted to ``window`` (ValueError for a bad or outside window)."""
    if window is None:
        return v_start, v_end
    w_start, w_end = (float(w) for w in window)
    if not (math.isfinite(w_start) and math.isfinite(w_end)) or w_end <= w_start:
        raise ValueError(f"invalid time window {window!r}: need finite start < end (seconds)")
    start, end = max(w_start, v_start), min(w_end, v_end)
    if end <= start:
        raise ValueError(f"time window {window!r} lies outside the video span [{v_start:.3f}, {v_end:.3f}) s")
    return start, end


def times_to_indices(timestamps: Tensor, times: Tensor) -> Tensor:
    """Index of the frame on screen at each time (last pts <= t, clamped) -> LongTensor like ``times``."""
    ts = timestamps.to(torch.float64).contiguous()
    idx = torch.searchsorted(ts, times.to(torch.float64).contiguous(), right=True) - 1
    return idx.clamp_(0, ts.numel() - 1).long()


def _uniform(shape: tuple[int, ...], training: bool, generator: torch.Generator | None, position: float) -> Tensor:
    """Random fractions in [0, 1) when training, else the fixed ``position``."""
    if training:
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.full(shape, float(position), dtype=torch.float64)


def mask_repeats(indices: Tensor) -> tuple[Tensor, Tensor]:
    """``short_video: mask``: ``indices [V, T]`` (rows non-decreasing) -> each row's distinct frames first, the
    rest of the row repeating the last one, and the bool mask ``[V, T]`` of the distinct ones."""
    t = indices.shape[1]
    rows, masks = [], []
    for row in indices:
        distinct = torch.unique_consecutive(row)
        rows.append(torch.cat([distinct, distinct[-1:].expand(t - distinct.numel())]))
        masks.append(torch.arange(t) < distinct.numel())
    return torch.stack(rows), torch.stack(masks)


def order_frames(
    indices: Tensor, mask: Tensor | None, order: str, generator: torch.Generator | None = None
) -> Tensor:
    """``indices [V, T]`` with the real frames of each row (all of it without a ``mask``) in ``order``."""
    if order == "ordinary":
        return indices
    if order not in FRAME_ORDERS:
        raise ValueError(f"frame order must be one of {FRAME_ORDERS}, got {order!r}")
    out = indices.clone()
    for v in range(indices.shape[0]):
        n = indices.shape[1] if mask is None else int(mask[v].sum())
        perm = torch.arange(n - 1, -1, -1) if order == "reverse" else torch.randperm(n, generator=generator)
        out[v, :n] = indices[v, :n][perm]
    return out


class FrameSampler(ABC):
    """Chooses ``num_frames`` frame indices per view from a video's timestamps (see module docs).

    ``short_video`` / ``frame_order``: the options of the module docstring (class defaults ``repeat`` /
    ``ordinary``; :func:`configure_sampler` sets them on an instance).
    """

    num_frames: int
    short_video: str = "repeat"
    frame_order: str = "ordinary"

    def __init__(self, num_frames: int) -> None:
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)

    @abstractmethod
    def sample_times(
        self,
        start: float,
        end: float,
        *,
        training: bool,
        generator: torch.Generator | None,
        position: float = 0.5,
        frame_interval: float = 0.0,
    ) -> Tensor:
        """Times in ``[start, end)`` -> float64 ``[T]``, non-decreasing.

        ``position`` in [0, 1] places a deterministic (eval) clip inside the span
        (0 = earliest, 0.5 = centred); it is ignored when ``training``.
        ``frame_interval`` is the video's average seconds per frame.
        """

    def num_views(self, training: bool) -> int:
        return 1

    def __call__(
        self,
        timestamps: Tensor,
        duration: float,
        *,
        training: bool,
        generator: torch.Generator | None = None,
        window: Window | None = None,
    ) -> Tensor:
        """Frame indices ``LongTensor [V, T]`` (rows non-decreasing)."""
        v_start, v_end = video_span(timestamps, duration)
        interval = (v_end - v_start) / timestamps.numel()
        start, end = restrict_span(v_start, v_end, window)
        times = self.view_times(start, end, training=training, generator=generator, frame_interval=interval)  # [V, T]
        # keep times strictly inside the half-open span despite rounding
        times = times.clamp(start, math.nextafter(end, -math.inf))
        return times_to_indices(timestamps, times)

    def sample_indices(
        self,
        timestamps: Tensor,
        duration: float,
        *,
        training: bool,
        generator: torch.Generator | None = None,
        window: Window | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Frame indices ``[V, T]`` after the ``short_video`` and ``frame_order`` options, and the bool frame mask
        ``[V, T]`` (None with ``short_video: repeat``)."""
        idx = self(timestamps, duration, training=training, generator=generator, window=window)
        mask = None
        if self.short_video == "mask":
            idx, mask = mask_repeats(idx)
        return order_frames(idx, mask, self.frame_order, generator), mask

    def view_times(
        self, start: float, end: float, *, training: bool, generator: torch.Generator | None, frame_interval: float
    ) -> Tensor:
        """Times of every view -> float64 ``[V, T]``."""
        times = self.sample_times(start, end, training=training, generator=generator, frame_interval=frame_interval)
        return times.unsqueeze(0)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


SAMPLERS: Registry[type[FrameSampler]] = Registry("frame sampler")


def configure_sampler(
    sampler: FrameSampler, short_video: str = "repeat", frame_order: str = "ordinary"
) -> FrameSampler:
    """Set the ``short_video`` / ``frame_order`` options of ``sampler`` (module docstring); returns it."""
    if short_video not in SHORT_VIDEO_MODES:
        raise ValueError(f"short_video must be one of {SHORT_VIDEO_MODES}, got {short_video!r}")
    if frame_order not in FRAME_ORDERS:
        raise ValueError(f"frame_order must be one of {FRAME_ORDERS}, got {frame_order!r}")
    sampler.short_video, sampler.frame_order = short_video, frame_order
    return sampler


def build_sampler(
    name: str, *, short_video: str = "repeat", frame_order: str = "ordinary", **kwargs: Any
) -> FrameSampler:
    """Build a registered sampler by name, e.g. ``build_sampler("segment", num_frames=8)``, with the
    ``short_video`` / ``frame_order`` options (module docstring)."""
    return configure_sampler(SAMPLERS.build(name, **kwargs), short_video, frame_order)


@SAMPLERS.register("segment")
class SegmentSampler(FrameSampler):
    """TSN: ``T`` equal segments of the span; a random time in each (training) or its middle (eval)."""

    def sample_times(self, start, end, *, training, generator, position=0.5, frame_interval=0.0):
        t = self.num_frames
        seg = (end - start) / t
        frac = _uniform((t,), training, generator, position)
        return start + (torch.arange(t, dtype=torch.float64) + frac) * seg


@SAMPLERS.register("dense")
class DenseSampler(FrameSampler):
    """``T`` consecutive frames at a fixed stride: a random clip start (training) or centred (eval).

    Give the stride in seconds (``stride_s``) or in frames (``frame_stride``, converted
    with the video's average frame rate at call time). A clip longer than the span
    is shrunk to the span (module rule).
    """

    def __init__(self, num_frames: int, stride_s: float | None = None, frame_stride: int | None = None) -> None:
        super().__init__(num_frames)
        if (stride_s is None) == (frame_stride is None):
            raise ValueError("dense sampler: give exactly one of stride_s (seconds) or frame_stride (frames)")
        if stride_s is not None and not stride_s > 0:
            raise ValueError(f"dense sampler: stride_s must be > 0, got {stride_s}")
        if frame_stride is not None and int(frame_stride) < 1:
            raise ValueError(f"dense sampler: frame_stride must be >= 1, got {frame_stride}")
        self.stride_s = None if stride_s is None else float(stride_s)
        self.frame_stride = None if frame_stride is None else int(frame_stride)

    def sample_times(self, start, end, *, training, generator, position=0.5, frame_interval=0.0):
        t, span = self.num_frames, end - start
        stride = self.stride_s if self.stride_s is not None else self.frame_stride * frame_interval
        if stride <= 0 or t * stride > span:  # does not fit: shrink the clip to the span
            stride = span / t
        slack = span - t * stride
        frac = _uniform((1,), training, generator, position)
        clip_start = start + float(frac) * slack
        return clip_start + (torch.arange(t, dtype=torch.float64) + 0.5) * stride


@SAMPLERS.register("fps")
class FpsSampler(FrameSampler):
    """About ``fps`` frames per second, at most ``max_frames`` (CLIP4Clip style; default 12,
    ``num_frames`` is accepted as an alias).

    The span is cut into ``n = ceil(span * fps)`` equal steps (about ``1 / fps`` s each)
    and one time is taken in each, at ``phase`` (0.5 in eval, random when training);
    if ``n > max_frames`` these times are evenly subsampled. ``T`` is
    always ``max_frames``: with fewer distinct times (short video) each one repeats
    evenly, in order (module rule), so batches stack; ``len(distinct)`` = min(max_frames,
    ceil(span * fps)).
    """

    def __init__(self, max_frames: int | None = None, fps: float = 1.0, num_frames: int | None = None) -> None:
        if max_frames is not None and num_frames is not None and num_frames != max_frames:
            raise ValueError(f"fps sampler: num_frames ({num_frames}) is an alias of max_frames ({max_frames})")
        super().__init__(next((v for v in (max_frames, num_frames) if v is not None), 12))
        if not fps > 0:
            raise ValueError(f"fps sampler: fps must be > 0, got {fps}")
        self.fps = float(fps)

    @property
    def max_frames(self) -> int:
        return self.num_frames

    def sample_times(self, start, end, *, training, generator, position=0.5, frame_interval=0.0):
        t = self.num_frames
        n = max(1, math.ceil((end - start) * self.fps - 1e-9))
        phase = float(_uniform((1,), training, generator, position))
        step = (end - start) / n  # = 1 / fps when the span is a whole number of periods, else a bit less
        times = start + (torch.arange(n, dtype=torch.float64) + phase) * step
        if n >= t:  # evenly subsample n -> t
            pick = torch.linspace(0, n - 1, t, dtype=torch.float64).round().long()
        else:  # repeat each distinct time evenly, order kept
            pick = torch.arange(t) * n // t
        return times[pick]


@SAMPLERS.register("multiview")
class MultiViewSampler(FrameSampler):
    """``K`` temporal views of another sampler.

    Eval: ``K`` deterministic clips whose positions ``(k + 0.5) / K`` spread evenly over
    the span (for ``segment``: K offsets inside each segment; for ``dense``/``fps``: K clip
    starts / phases). Training: one random view of the inner sampler -> ``V = 1``.
    """

    def __init__(self, sampler: FrameSampler | str = "segment", num_views: int = 4, **sampler_kwargs: Any) -> None:
        inner = build_sampler(sampler, **sampler_kwargs) if isinstance(sampler, str) else sampler
        if sampler_kwargs and not isinstance(sampler, str):
            raise ValueError("multiview: sampler kwargs are only used when the sampler is given by name")
        if isinstance(inner, MultiViewSampler):
            raise ValueError("multiview: cannot wrap another multiview sampler")
        if int(num_views) < 1:
            raise ValueError(f"multiview: num_views must be >= 1, got {num_views}")
        super().__init__(inner.num_frames)
        self.sampler = inner
        self.views = int(num_views)

    def num_views(self, training: bool) -> int:
        return 1 if training else self.views

    def sample_times(self, start, end, *, training, generator, position=0.5, frame_interval=0.0):
        return self.sampler.sample_times(
            start, end, training=training, generator=generator, position=position, frame_interval=frame_interval
        )

    def view_times(self, start, end, *, training, generator, frame_interval):
        kw = dict(frame_interval=frame_interval)
        if training:
            return self.sample_times(start, end, training=True, generator=generator, **kw).unsqueeze(0)
        positions = [(k + 0.5) / self.views for k in range(self.views)]
        views = [self.sample_times(start, end, training=False, generator=None, position=p, **kw) for p in positions]
        return torch.stack(views)  # [K, T]


def sample_clip_masked(
    reader: Any,
    sampler: FrameSampler,
    training: bool,
    generator: torch.Generator | None = None,
    window: Window | None = None,
    record: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sample and decode a clip from an open :class:`~vidlang.data.decoding.VideoReader`.

    Returns ``uint8 [V, T, C, H, W]`` and the bool frame mask ``[V, T]`` (None unless ``short_video: mask``).
    All views are decoded in one ``get_frames`` call. ``record`` (a dict) receives the frame indices
    (``record["frame_indices"]``, int64 ``[V, T]``; what the run record hashes).
    """
    idx, mask = sampler.sample_indices(
        reader.frame_timestamps(), reader.metadata.duration, training=training, generator=generator, window=window
    )  # [V, T]
    if record is not None:
        record["frame_indices"] = idx.clone()
    frames = reader.get_frames(idx.flatten().tolist())  # [V*T, C, H, W]
    return frames.reshape(idx.shape[0], idx.shape[1], *frames.shape[1:]), mask


@SAMPLERS.register("interleaved_segments")
class InterleavedSegmentSampler(FrameSampler):
    """Prompt Switch's test frame order: ``K = num_frames / segments`` interleaved passes over the whole video.

    The span is cut into ``segments`` equal segments (Prompt Switch: ``num_prompts`` = 6); pass ``i`` takes one
    time in every segment, at fraction ``(i + 1) / (K + 1)`` of it (eval) or at random (training, each pass
    independently). Output order is pass-major: ``[pass 0: segments 0..S-1, pass 1: segments 0..S-1, ...]``, so
    each consecutive group of ``segments`` frames is a complete, ordered view of the video (what Prompt Switch's
    frame groups process independently). With ``K = 1`` it is the ``segment`` sampler.

    The one exception to the module's output rule: rows are non-decreasing within each pass only. ``position``
    is not used. The official code picks frame indices (``(len - 1) // (K + 1) * (i + 1)`` into a segment of
    ``len`` frames); times here may land one frame later.
    """

    def __init__(self, num_frames: int, segments: int = 6) -> None:
        super().__init__(num_frames)
        if int(segments) < 1 or self.num_frames % int(segments):
            raise ValueError(
                f"interleaved_segments: num_frames ({self.num_frames}) must be a positive multiple of segments "
                f"({segments})"
            )
        self.segments = int(segments)

    @property
    def passes(self) -> int:
        return self.num_frames // self.segments

    def sample_times(self, start, end, *, training, generator, position=0.5, frame_interval=0.0):
        k, s = self.passes, self.segments
        if training:
            frac = torch.rand((k, s), generator=generator, dtype=torch.float64)
        else:
            frac = ((torch.arange(k, dtype=torch.float64) + 1) / (k + 1)).unsqueeze(1).expand(k, s)
        seg = (end - start) / s
        return (start + (torch.arange(s, dtype=torch.float64) + frac) * seg).flatten()  # [K*S], pass-major


def sample_clip(
    reader: Any,
    sampler: FrameSampler,
    training: bool,
    generator: torch.Generator | None = None,
    window: Window | None = None,
) -> Tensor:
    """:func:`sample_clip_masked` without the mask: ``uint8 [V, T, C, H, W]``."""
    return sample_clip_masked(reader, sampler, training, generator, window)[0]

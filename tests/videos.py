"""Small videos with known content, for decoding tests (usable by any test file).

Every frame carries its index as a binary pattern of large blocks (4 columns x 3
rows of 16x16 px at 64x48): block ``k`` is "on" (reddish) when bit ``k`` of the
frame index is set, else "off" (bluish). :func:`read_index` recovers the index
from a decoded frame, even after lossy coding or a resize, and the two colours
differ in red and blue so that a swapped channel order is caught.

Writers use PyAV (libx264, lossless ``qp=0``, or any codec PyAV has). Fixtures
are plain functions decorated with ``pytest.fixture``; a test module gets them with
``pytest_plugins = ["videos"]`` (or by importing them). They are session-scoped:
each video is written once per test session.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

ON = (220, 60, 30)  # RGB of a set bit
OFF = (20, 40, 200)  # RGB of a cleared bit
GRID = (3, 4)  # block rows, block columns: 12 bits, indices up to 4095
TIME_BASE = Fraction(1, 3000)  # exact for 10 and 12 fps and for multiples of 50 ms


def frame_pattern(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """The true RGB frame ``[H, W, 3]`` uint8 for a frame index."""
    rows, cols = GRID
    img = np.empty((height, width, 3), np.uint8)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        y0, y1 = r * height // rows, (r + 1) * height // rows
        x0, x1 = c * width // cols, (c + 1) * width // cols
        img[y0:y1, x0:x1] = ON if (index >> k) & 1 else OFF
    return img


def read_index(frame) -> int:
    """Recover the frame index from a decoded frame ``[C, H, W]`` or ``[H, W, C]`` (tensor or array)."""
    arr = np.asarray(frame)
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    h, w = arr.shape[:2]
    rows, cols = GRID
    index = 0
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        # the centre half of each block: free of resize / chroma bleeding at block edges
        y0, y1 = r * h // rows, (r + 1) * h // rows
        x0, x1 = c * w // cols, (c + 1) * w // cols
        dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
        block = arr[y0 + dy : y1 - dy, x0 + dx : x1 - dx].astype(np.float64)
        red, blue = block[..., 0].mean(), block[..., 2].mean()
        if red > blue:
            index |= 1 << k
    return index


@dataclass
class TestVideo:
    """A written video and the truth about it."""

    path: Path
    num_frames: int
    pts: list[float]  # presentation time of each frame, seconds
    width: int
    height: int
    fps: float  # average: frames / duration
    duration: float
    audio_freq: float | None = None
    audio_rate: int | None = None

    __test__ = False  # not a pytest class

    def truth(self, index: int) -> np.ndarray:
        return frame_pattern(index, self.height, self.width)


def write_video(
    dst: str | Path | io.BytesIO,
    num_frames: int = 24,
    fps: float = 12.0,
    size: tuple[int, int] = (64, 48),
    *,
    pts: Sequence[float] | None = None,
    codec: str = "libx264",
    fmt: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    audio_freq: float | None = None,
    audio_rate: int = 16000,
    audio_only: bool = False,
    gop: int = 6,
) -> list[float]:
    """Write a video of :func:`frame_pattern` frames; return the frame times in seconds.

    ``pts`` (seconds, increasing) gives irregular times for a variable-frame-rate
    video; otherwise frame ``i`` is at ``i / fps``. ``audio_freq`` adds an AAC sine
    track of that frequency lasting the video's duration; ``audio_only`` writes
    only that track (a zero-frame "video").
    """
    width, height = size
    times = list(pts) if pts is not None else [i / fps for i in range(num_frames)]
    frame_dur = 1.0 / fps if pts is None else (times[-1] - times[0]) / max(len(times) - 1, 1)
    duration = times[-1] + frame_dur
    kw = {"format": fmt} if fmt else {}
    with av.open(dst, "w", options=container_options or {}, **kw) as out:
        vstream = None
        if not audio_only:
            vstream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            vstream.width, vstream.height = width, height
            vstream.pix_fmt = "yuv420p"
            vstream.gop_size = gop
            vstream.codec_context.time_base = TIME_BASE
            vstream.time_base = TIME_BASE
            vstream.codec_context.max_b_frames = 2 if codec == "libx264" else 0
            lossless = {"qp": "0", "preset": "medium"} if codec == "libx264" else {}
            vstream.options = lossless if options is None else options
        astream = out.add_stream("aac", rate=audio_rate, layout="mono") if audio_freq else None
        if vstream is not None:
            for i, t in enumerate(times):
                frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
                frame.pts, frame.time_base = round(t / TIME_BASE), TIME_BASE
                out.mux(vstream.encode(frame))
            out.mux(vstream.encode(None))
        if astream is not None:
            _write_sine(out, astream, audio_freq, audio_rate, duration)
    return times


def sine(freq: float, rate: int, duration: float) -> np.ndarray:
    n = int(round(duration * rate))
    return (0.5 * np.sin(2 * math.pi * freq * np.arange(n) / rate)).astype(np.float32)


def _write_sine(out, astream, freq: float, rate: int, duration: float) -> None:
    samples = sine(freq, rate, duration)
    chunk = 1024
    for start in range(0, len(samples), chunk):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + chunk], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        out.mux(astream.encode(frame))
    out.mux(astream.encode(None))


def make_video(path: Path, num_frames: int = 24, fps: float = 12.0, size=(64, 48), **kw) -> TestVideo:
    """Write a video to ``path`` and describe it."""
    times = write_video(path, num_frames, fps, size, **kw)
    n = len(times)
    duration = times[-1] + (1.0 / fps if kw.get("pts") is None else (times[-1] - times[0]) / max(n - 1, 1))
    return TestVideo(
        path=path,
        num_frames=n,
        pts=times,
        width=size[0],
        height=size[1],
        fps=n / duration,
        duration=duration,
        audio_freq=kw.get("audio_freq"),
        audio_rate=kw.get("audio_rate", 16000) if kw.get("audio_freq") else None,
    )


BFRAMES = {"crf": "12", "preset": "medium", "x264-params": "bframes=2:b-adapt=0"}
VFR_PTS = [0.0, 0.05, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0, 1.05, 1.6, 1.65, 1.7, 1.75, 2.2, 2.3, 2.35]


# ---------------------------------------------------------------- fixtures (session-scoped)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def cfr_video(video_dir) -> TestVideo:
    """24 frames at 12 fps, 64x48, lossless H.264 with B-frames, a key frame every 6 frames, no audio."""
    return make_video(video_dir / "cfr.mp4", 24, 12.0)


@pytest.fixture(scope="session")
def vfr_video(video_dir) -> TestVideo:
    """16 frames at irregular times (:data:`VFR_PTS`), lossless H.264."""
    return make_video(video_dir / "vfr.mp4", len(VFR_PTS), 8.0, pts=VFR_PTS)


@pytest.fixture(scope="session")
def audio_video(video_dir) -> TestVideo:
    """20 frames at 10 fps with a 440 Hz AAC sine track at 16 kHz."""
    return make_video(video_dir / "audio.mp4", 20, 10.0, audio_freq=440.0, audio_rate=16000)


@pytest.fixture(scope="session")
def mkv_video(video_dir) -> TestVideo:
    """The :func:`cfr_video` content in Matroska (other container, millisecond time base)."""
    return make_video(video_dir / "cfr.mkv", 24, 12.0)


@pytest.fixture(scope="session")
def bframes_video(video_dir) -> TestVideo:
    """24 frames at 12 fps with B-frames (decode order != display order); lossy (crf 12), see ``LOSSY_TOL``."""
    return make_video(video_dir / "bframes.mp4", 24, 12.0, options=BFRAMES)


@pytest.fixture(scope="session")
def faststart_video(video_dir) -> TestVideo:
    """30 frames, MP4 with the index (moov) before the data: a truncated copy keeps a decodable prefix."""
    return make_video(video_dir / "faststart.mp4", 30, 10.0, container_options={"movflags": "faststart"})


def interior_mask(height: int, width: int, margin: int) -> np.ndarray:
    """``[H, W]`` bool: pixels at least ``margin`` px away from every block edge of :func:`frame_pattern`.

    Edges are where 4:2:0 chroma subsampling and resize filters mix neighbouring blocks, so
    pixel-exact checks look at block interiors only.
    """
    rows, cols = GRID
    ys, xs = np.arange(height), np.arange(width)

    def far(coords: np.ndarray, n: int, size: int) -> np.ndarray:
        edges = np.array([k * size / n for k in range(n + 1)])
        return np.abs(coords[:, None] + 0.5 - edges[None, :]).min(1) >= margin

    return far(ys, rows, height)[:, None] & far(xs, cols, width)[None, :]

"""The video-decoding contract shared by every backend.

A :class:`VideoReader` opens one video (a path, ``bytes`` or a binary file-like
object), reports :class:`VideoMetadata`, and returns frames as ``uint8``
tensors ``[T, C, H, W]`` (RGB) by frame index or by timestamp in seconds.
Any failure -- missing, empty, truncated, corrupt, non-video or zero-frame
input -- raises :class:`VideoDecodeError` naming the source, the backend and
the reason. Readers never return placeholder (all-zero) frames.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import BinaryIO, ClassVar, Union

import torch

from vidlang.registry import Registry

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # noqa: UP007 (runtime alias)
DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest frame (width x height) a reader decodes unless told otherwise: bigger ones are refused from the
container's metadata, before any decoding (a tiny file can declare an 8192x8192 stream that costs GBs)."""


class VideoDecodeError(RuntimeError):
    """A video could not be decoded. ``str(err)`` names the source, the backend and the reason."""

    def __init__(self, source: str, backend: str, reason: str) -> None:
        self.source = source
        self.backend = backend
        self.reason = reason
        super().__init__(f"{source}: cannot decode with {backend}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.source, self.backend, self.reason))


class FrameIndexError(VideoDecodeError, IndexError):
    """A requested frame index is outside ``[-N, N)``; both a :class:`VideoDecodeError` and an ``IndexError``."""


@dataclass(frozen=True)
class VideoMetadata:
    """Stream facts. Times are seconds; ``fps`` is the average rate (frames / duration).

    ``duration`` spans the first frame's pts to the end of the last frame; ``start_time`` is
    the first frame's pts (usually 0). ``width``/``height`` are the size of the frames as displayed
    (after ``rotation``, before any ``resize_short_side``). ``rotation`` is the display rotation in
    degrees counter-clockwise (0, 90, 180, 270) that readers apply to the coded frames, as the ffmpeg
    CLI does.
    """

    duration: float
    fps: float
    num_frames: int
    width: int
    height: int
    has_audio: bool
    audio_sample_rate: int | None = None
    start_time: float = 0.0
    rotation: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def describe_source(source: VideoSource) -> str:
    """A human-readable name for a source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, str) else f"<{type(source).__name__}>"


def source_bytes(source: VideoSource) -> bytes | None:
    """The raw bytes of an in-memory or file-like source, ``None`` for paths."""
    if isinstance(source, (str, os.PathLike)):
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        return source.read()
    raise TypeError(f"unsupported video source type {type(source).__name__}")


def check_path(source: VideoSource, backend: str) -> None:
    """Raise :class:`VideoDecodeError` early for a missing, non-regular or empty file."""
    if not isinstance(source, (str, os.PathLike)):
        return
    try:
        st = os.stat(source)  # one system call (this runs for every clip a loader opens)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF):
            raise VideoDecodeError(str(source), backend, "file not found") from e
        raise
    if not stat.S_ISREG(st.st_mode):
        raise VideoDecodeError(str(source), backend, "not a regular file")
    if st.st_size == 0:
        raise VideoDecodeError(str(source), backend, "file is empty (0 bytes)")


def resized_hw(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Output ``(height, width)`` for a short-side resize: aspect ratio kept, both rounded to even sizes."""
    if short_side is None:
        return height, width
    if short_side < 2:
        raise ValueError(f"resize_short_side must be >= 2, got {short_side}")
    scale = short_side / min(height, width)

    def even(x: float) -> int:
        return max(2, 2 * round(x / 2))

    return even(height * scale), even(width * scale)


CPU = torch.device("cpu")


def resolve_device(device: str | torch.device, backend: str) -> torch.device:
    """``device`` itself, or the CPU with a warning when CUDA is asked for but absent."""
    if device == "cpu":  # the common case, without building a device (~30 us with a cold CPU cache, per clip)
        return CPU
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"{backend}: CUDA decoding requested but no GPU is available; decoding on the CPU", stacklevel=3)
        return torch.device("cpu")
    return dev


def normalize_indices(indices: Sequence[int], num_frames: int, source: str, backend: str) -> list[int]:
    """Python-style indices (negatives count from the end) -> ``[0, N)``; :class:`FrameIndexError` otherwise."""
    out = list(map(int, indices))
    if not out or (min(out) >= 0 and max(out) < num_frames):  # the usual case, checked at C speed
        return out
    out = []
    for i in indices:
        j = int(i)
        if not -num_frames <= j < num_frames:
            raise FrameIndexError(source, backend, f"frame index {j} out of range for {num_frames} frames")
        out.append(j % num_frames)
    return out


class VideoReader(ABC):
    """One open video. Use as a context manager or call :meth:`close`.

    Args:
        source: a path, ``bytes`` or a binary file-like object (read fully into memory).
        device: ``"cpu"`` or a CUDA device for backends that decode on the GPU.
        resize_short_side: if set, frames are resized at decode time so that their
            short side has this many pixels (aspect ratio kept).
        max_pixels: largest frame (width x height) to decode; a bigger stream is refused at open,
            from the container's metadata (``None``: no limit).
    """

    backend: ClassVar[str]

    @abstractmethod
    def __init__(
        self,
        source: VideoSource,
        *,
        device: str | torch.device = "cpu",
        resize_short_side: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None: ...

    @property
    @abstractmethod
    def metadata(self) -> VideoMetadata: ...

    @abstractmethod
    def frame_timestamps(self) -> torch.Tensor:
        """Presentation time (seconds, float64) of every frame, ``[N]``, increasing."""

    @abstractmethod
    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at the given indices (any order, repeats allowed) -> ``[T, C, H, W]`` uint8 RGB."""

    def get_frames_at(self, times: Sequence[float]) -> torch.Tensor:
        """Frames displayed at the given times in seconds -> ``[T, C, H, W]`` uint8 RGB."""
        return self.get_frames(self.indices_at(times))

    def indices_at(self, times: Sequence[float]) -> list[int]:
        """Index of the frame on screen at each time (the last frame whose pts <= t)."""
        ts = self.frame_timestamps()
        t = torch.as_tensor(list(times), dtype=torch.float64)
        idx = torch.searchsorted(ts, t, right=True) - 1
        return idx.clamp_(0, len(ts) - 1).tolist()

    @abstractmethod
    def get_audio(self, sample_rate: int = 16000) -> torch.Tensor | None:
        """The whole audio track as float32 mono ``[S]`` at ``sample_rate``; ``None`` without audio."""

    def close(self) -> None:  # noqa: B027 - optional override
        pass

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


READERS: Registry[type[VideoReader]] = Registry("video decoding backend")

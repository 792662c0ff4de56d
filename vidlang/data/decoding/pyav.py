"""PyAV backend, the container scan every backend opens a video with, and the reader base built on it.

The scan (:func:`scan_video`) demuxes the video stream once without decoding and
builds a :class:`VideoIndex`: the true pts of every frame (display order, VFR
safe), key frames, stream size and audio facts. All backends use it, so they
agree on frame counts and timestamps by construction, and it is also the guard
that keeps fragile decoders (decord) away from inputs that are not videos.
:class:`ScannedReader` holds what the backends share around it (source, scan, device, output size,
metadata, timestamps, audio, index checks, error wrapping); each backend adds only its decoder.

Rules decided here (they hold for every backend):

- missing / empty / unreadable / non-video input -> :class:`VideoDecodeError`;
  a still image (PNG, JPEG, ... opened by FFmpeg's image demuxers) is *not* a video;
  a file without a video stream (audio only) or without any video packet is a zero-frame
  video and raises too.
- **truncated file**: when the container's index survives (MP4 with the index at the
  front, Matroska/WebM, AVI, ...) the video is its *decodable prefix*: frames whose data
  was read completely, up to the first missing or partial packet; metadata describes that
  prefix. When the index itself is lost (an MP4 cut before its trailing ``moov`` box)
  opening raises. A frame that still fails to decode raises when requested.
- corruption inside coded data is reported when the decoder reports it (a decode error, or
  a frame FFmpeg flags as corrupt for PyAV); it surfaces when the affected frames are
  requested, not at open.
"""

from __future__ import annotations

import io
import json
import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch

from vidlang.data.decoding.audio import decode_audio
from vidlang.data.decoding.base import (
    READERS,
    VideoDecodeError,
    VideoMetadata,
    VideoReader,
    VideoSource,
    check_path,
    describe_source,
    normalize_indices,
    resized_hw,
    resolve_device,
    source_bytes,
)

MAX_PACKETS = 5_000_000  # bound on the scan (about 46 h at 30 fps)
# FFmpeg demuxers that turn non-videos into "video" streams: still images (``image2``, ``*_pipe``),
# text rendered as ANSI art (``tty``, picked for ``.txt``/``.ans`` files)
NOT_VIDEO_FORMATS = {"image2": "a still image", "tty": "text (FFmpeg's ANSI-art reader)"}


def load_source(source: VideoSource, backend: str) -> tuple[str | bytes, str]:
    """``(path or bytes, display name)``; raises for a missing, non-regular or empty input."""
    name = describe_source(source)
    check_path(source, backend)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), name
    try:
        data = source_bytes(source)
    except (OSError, TypeError) as e:
        raise VideoDecodeError(name, backend, f"cannot read source: {e}") from e
    if not data:
        raise VideoDecodeError(name, backend, "input is empty (0 bytes)")
    return data, name


def av_input(src: str | bytes):
    return src if isinstance(src, str) else io.BytesIO(src)


def av_reason(err: Exception) -> str:
    """A short reason from a PyAV / FFmpeg exception."""
    msg = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return f"{msg} (not a video file, or corrupt)" if "Invalid data" in msg else msg


@dataclass
class VideoIndex:
    """What one demux pass learned about a video stream. Times are in stream ``time_base`` units."""

    pts: list[int]  # display order, increasing
    durations: list[int]  # packet duration per frame (0 when unknown)
    keyframes: list[bool]
    time_base: Fraction
    width: int
    height: int
    codec: str
    stream_index: int
    has_audio: bool
    audio_sample_rate: int | None
    truncated: bool  # a partial / unreadable packet ended the scan
    data_end: int | None  # byte offset just past the last complete packet, when known

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    def seconds(self) -> torch.Tensor:
        """``[N]`` float64 pts in seconds."""
        return torch.tensor(self.pts, dtype=torch.float64) * float(self.time_base)

    def metadata(self, num_frames: int | None = None) -> VideoMetadata:
        """Metadata of the first ``num_frames`` frames (all by default)."""
        n = self.num_frames if num_frames is None else num_frames
        tb = float(self.time_base)
        first, last = self.pts[0] * tb, self.pts[n - 1] * tb
        last_dur = self.durations[n - 1] * tb
        if last_dur <= 0:
            last_dur = (last - first) / (n - 1) if n > 1 else 0.0
        duration = last - first + last_dur
        return VideoMetadata(
            duration=duration,
            fps=n / duration if duration > 0 else 0.0,
            num_frames=n,
            width=self.width,
            height=self.height,
            has_audio=self.has_audio,
            audio_sample_rate=self.audio_sample_rate,
            start_time=first,
        )

    def frame_mappings_json(self) -> str:
        """The index in the JSON form torchcodec accepts as ``custom_frame_mappings``."""
        frames = [
            {"pts": p, "duration": d, "key_frame": int(k)}
            for p, d, k in zip(self.pts, self.durations, self.keyframes, strict=True)
        ]
        return json.dumps({"frames": frames})


def scan_video(src: str | bytes, name: str, backend: str) -> VideoIndex:
    """Demux (no decode) the best video stream of ``src`` into a :class:`VideoIndex`."""
    import av

    try:
        container = av.open(av_input(src), metadata_errors="ignore")
    except Exception as e:  # av.FFmpegError and friends: unreadable header
        raise VideoDecodeError(name, backend, av_reason(e)) from e
    with container:
        fmt = container.format.name
        kind = NOT_VIDEO_FORMATS.get(fmt) or ("a still image" if fmt.endswith("_pipe") else None)
        if kind:
            raise VideoDecodeError(name, backend, f"{kind} ({fmt} format), not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(name, backend, f"no video stream (streams: {', '.join(kinds)}); zero frames")
        stream = container.streams.video[0]
        packets, truncated, data_end = _demux(container, stream)
        audio = container.streams.audio[0] if container.streams.audio else None
        ctx = stream.codec_context
        facts = dict(width=ctx.width, height=ctx.height, codec=ctx.name, stream_index=stream.index)
        facts.update(time_base=stream.time_base, has_audio=audio is not None)
        facts["audio_sample_rate"] = (audio.sample_rate or None) if audio is not None else None
    if not packets:
        raise VideoDecodeError(name, backend, "the video stream has no decodable frames (zero frames)")
    if not facts["width"] or not facts["height"]:
        raise VideoDecodeError(name, backend, "the video stream has no frame size (corrupt header)")
    packets.sort()
    return VideoIndex(
        pts=[p[0] for p in packets],
        durations=[p[1] for p in packets],
        keyframes=[p[2] for p in packets],
        **facts,
        truncated=truncated,
        data_end=data_end,
    )


def _demux(container, stream) -> tuple[list[tuple[int, int, bool]], bool, int | None]:
    """Complete packets ``(pts, duration, key)`` of ``stream``, in decode order, up to the first bad one."""
    packets: list[tuple[int, int, bool]] = []
    bad_pts, data_end = None, None
    try:
        for n, pkt in enumerate(container.demux(stream)):
            if n >= MAX_PACKETS:
                break
            if pkt.size == 0:  # flush packet at the end
                continue
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if pkt.is_corrupt:
                bad_pts = ts if ts is not None else -1
                break
            if ts is None:
                continue
            packets.append((ts, pkt.duration or 0, bool(pkt.is_keyframe)))
            if pkt.pos is not None and pkt.pos >= 0:
                data_end = max(data_end or 0, pkt.pos + pkt.size)
    except Exception:  # a read error mid-file: keep what was read completely
        bad_pts = bad_pts if bad_pts is not None else float("inf")
    truncated = bad_pts is not None
    if truncated and bad_pts != float("inf"):
        # frames displayed after the missing one may lack reference data: keep the display-order prefix
        packets = [p for p in packets if p[0] < bad_pts] if bad_pts >= 0 else []
    return packets, truncated, data_end


# --------------------------------------------------------------------------- readers


def hwc_frames(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[T, H, W, C]`` uint8 array -> ``[T, C, H, W]`` tensor on ``device``."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)


class ScannedReader(VideoReader):
    """What every backend shares: open through the container scan, answer from the scan.

    The base loads the source, scans it (:func:`scan_video`), picks the device and the output size,
    and serves metadata, timestamps, audio, index checks and empty requests. A backend supplies
    ``_library`` (its import, done first: a backend that cannot load fails before any I/O), ``_open``
    (its decoder; it may lower ``self._n``, the number of frames it decodes, a prefix of the scan's),
    ``_decode`` (raw frames at checked indices), ``_frames`` (raw -> ``[T, C, H, W]`` uint8 on the
    device) and ``_reason`` (a short message from its exceptions).
    """

    cpu_fallback: ClassVar[bool] = True  # CUDA without a GPU: warn and decode on the CPU

    def __init__(
        self, source: VideoSource, *, device: str | torch.device = "cpu", resize_short_side: int | None = None
    ) -> None:
        lib = self._library()
        self._src, self.name = load_source(source, self.backend)
        self.index = scan_video(self._src, self.name, self.backend)
        self._device = resolve_device(device, self.backend) if self.cpu_fallback else torch.device(device)
        self._size = resized_hw(self.index.height, self.index.width, resize_short_side)
        self._n = self.index.num_frames
        try:
            self._open(lib)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.name, self.backend, self._reason(e)) from e
        self._meta = self.index.metadata(self._n)

    @staticmethod
    @abstractmethod
    def _library() -> Any: ...

    @abstractmethod
    def _open(self, lib: Any) -> None: ...

    @abstractmethod
    def _decode(self, indices: list[int]) -> Any: ...

    def _frames(self, decoded: Any, indices: list[int]) -> torch.Tensor:
        return decoded

    @staticmethod
    @abstractmethod
    def _reason(err: Exception) -> str: ...

    @property
    def metadata(self) -> VideoMetadata:
        return self._meta

    def frame_timestamps(self) -> torch.Tensor:
        return self.index.seconds()[: self._n]

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        idx = normalize_indices(indices, self._n, self.name, self.backend)
        if not idx:
            h, w = self._size
            return torch.empty((0, 3, h, w), dtype=torch.uint8, device=self._device)
        try:
            decoded = self._decode(idx)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.name, self.backend, f"decoding failed: {self._reason(e)}") from e
        return self._frames(decoded, idx)

    def get_audio(self, sample_rate: int = 16000) -> torch.Tensor | None:
        return decode_audio(self._src, sample_rate, self.name, self.backend) if self.index.has_audio else None

    def close(self) -> None:
        self._decoder = None


@READERS.register("pyav")
class PyAVReader(ScannedReader):
    """Decode with PyAV (FFmpeg bundled in the ``av`` wheel), one thread, seeking to key frames."""

    backend = "pyav"
    cpu_fallback = False  # frames are decoded on the CPU and moved to ``device`` as asked
    _reason = staticmethod(av_reason)

    @staticmethod
    def _library() -> Any:
        import av

        return av

    def _open(self, av: Any) -> None:
        self._pts_to_index = {p: i for i, p in enumerate(self.index.pts)}
        self._container = av.open(av_input(self._src), metadata_errors="ignore")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "SLICE"
        self._stream.codec_context.thread_count = 1

    def _decode(self, indices: list[int]) -> dict[int, np.ndarray]:
        return self._decode_sorted(sorted(set(indices)))

    def _frames(self, decoded: dict[int, np.ndarray], indices: list[int]) -> torch.Tensor:
        return hwc_frames(np.stack([decoded[i] for i in indices]), self._device)

    def _decode_sorted(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode the frames ``wanted`` (sorted display indices), seeking forward to key frames when it pays."""
        out: dict[int, np.ndarray] = {}
        frames, last = None, -1  # live frame iterator, display index of the last frame it gave
        for target in wanted:
            if target in out:
                continue
            key = self._key_before(target)
            if frames is None or target <= last or key > last + 1:
                frames = self._seek(key)
                last = -1
            last = self._decode_until(frames, target, set(wanted), out)
        return out

    def _key_before(self, target: int) -> int:
        keys = self.index.keyframes
        k = target
        while k > 0 and not keys[k]:
            k -= 1
        return k

    def _seek(self, key: int):
        pts = self.index.pts[key]
        self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        return self._container.decode(self._stream)

    def _decode_until(self, frames, target: int, wanted: set[int], out: dict[int, np.ndarray]) -> int:
        """Decode from ``frames`` until display index ``target`` is in ``out``; return the last index seen."""
        target_pts = self.index.pts[target]
        seen = -1
        for budget, frame in enumerate(frames):
            if budget > self.index.num_frames + 16:
                break
            if frame.pts is None:
                continue
            i = self._pts_to_index.get(frame.pts)
            if i is None:
                if frame.pts > target_pts:
                    break
                continue
            seen = i
            if i in wanted and i not in out:
                if frame.is_corrupt:
                    raise VideoDecodeError(self.name, self.backend, f"frame {i} is corrupt (damaged data)")
                out[i] = self._to_rgb(frame)
            if frame.pts >= target_pts:
                break
        if target not in out:
            raise VideoDecodeError(self.name, self.backend, f"frame {target} could not be decoded")
        return seen

    def _to_rgb(self, frame) -> np.ndarray:
        h, w = self._size
        if (h, w) != (frame.height, frame.width):
            frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR")
        return frame.to_ndarray(format="rgb24")  # [H, W, 3]

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None

"""The container scan every backend opens a video with, and the reader base built on it.

The scan (:func:`scan_video`) opens the file once with PyAV and demuxes its video packets without decoding
them, building a :class:`VideoIndex`: the pts of every frame (display order, VFR safe), key frames, stream
size, rotation, audio facts, and the facts that decide whether a backend can address frames exactly (see
docs/decoding.md). An MP4/MOV whose sample tables lie inside the file is known complete (:func:`index_complete`)
and only its video stream is read; any other file has every stream demuxed, to find where a truncated file's
complete packets end. An MP4's rotation is read by decoding its first frame, unless the backend reads the display
matrix itself (torchcodec). A complete H.264 MP4/MOV is indexed from its own sample tables instead
(:func:`index_video`, :mod:`vidlang.data.decoding.mp4`), to the same result with the same guards; every other file
is scanned. All backends use the index, so they agree on frame counts and timestamps by
construction, and it is also the guard that keeps fragile decoders (decord) away from inputs that are not videos
and every decoder away from decompression bombs. :class:`ScannedReader` holds what the backends share around it.

Rules decided here (they hold for every backend):

- missing / empty / unreadable / non-video input -> :class:`VideoDecodeError`;
  a still image (PNG, JPEG, ... opened by FFmpeg's image demuxers) is *not* a video;
  a file without a video stream (audio only) or without any video packet is a zero-frame
  video and raises too.
- a frame larger than ``max_pixels`` (width x height, default :data:`DEFAULT_MAX_PIXELS`) raises before
  anything is decoded; FFmpeg's own probing is capped at the same size.
- **truncated file**: when the container's index survives (MP4 with the index at the front,
  Matroska/WebM, AVI, ...) the video is its *decodable prefix*: frames whose data was read completely,
  up to the first missing or partial packet of any stream; metadata describes that prefix, and decoders
  (audio included) read the file only up to the end of the last complete packet. When the index itself is lost (an MP4
  cut before its trailing ``moov`` box) opening raises. A frame that still fails to decode raises when
  requested.
- corruption inside coded data is reported when the decoder reports it (a decode error, or
  a frame FFmpeg flags as corrupt for PyAV); it surfaces when the affected frames are
  requested, not at open.
- **rotation**: frames are returned as displayed, like the ffmpeg CLI (which rotates by default): a
  display matrix of 90/180/270 degrees is applied; ``width``/``height`` describe the displayed frame.
"""

from __future__ import annotations

import io
import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vidlang.data.decoding.audio import decode_audio
from vidlang.data.decoding.base import (
    DEFAULT_MAX_PIXELS,
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
from vidlang.data.decoding.mp4 import MOV_FORMAT, Unsupported, clean_keys_plain, read_mp4

MAX_PACKETS = 5_000_000  # bound on the scan, packets of all streams (about 20 h of 30 fps video with AAC audio)
# FFmpeg demuxers that turn non-videos into "video" streams: still images (``image2``, ``*_pipe``),
# text rendered as ANSI art (``tty``, picked for ``.txt``/``.ans`` files)
NOT_VIDEO_FORMATS = {"image2": "a still image", "tty": "text (FFmpeg's ANSI-art reader)"}
# demuxers whose files store no presentation timestamps: FFmpeg derives them, and with B-frames
# different FFmpeg versions derive different ones
NO_PTS_FORMATS = {"avi", "h264", "hevc", "m4v", "mpegvideo"}
ROTATION_PACKETS = 32  # packets decoded at most to read the display rotation


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


def av_options(max_pixels: int | None) -> dict[str, str]:
    """Options for ``av.open``: cap the size of any frame FFmpeg decodes while probing the streams."""
    return {} if max_pixels is None else {"max_pixels": str(max_pixels)}


def check_pixels(width: int, height: int, max_pixels: int | None, name: str, backend: str) -> None:
    """:class:`VideoDecodeError` when a ``width`` x ``height`` frame exceeds ``max_pixels``."""
    if max_pixels is not None and width * height > max_pixels:
        raise VideoDecodeError(
            name,
            backend,
            f"frame size {width}x{height} ({width * height / 1e6:.1f} Mpx) exceeds the pixel limit "
            f"max_pixels={max_pixels} ({max_pixels / 1e6:.1f} Mpx); refused before decoding (raise max_pixels "
            "to decode it)",
        )


@dataclass
class VideoIndex:
    """What one demux pass learned about a video stream. Times are in stream ``time_base`` units."""

    pts: list[int]  # display order, increasing (equal for frames that share a timestamp)
    durations: list[int]  # packet duration per frame (0 when unknown)
    keyframes: list[bool]
    time_base: Fraction
    width: int  # coded size (before rotation)
    height: int
    codec: str
    stream_index: int
    has_audio: bool
    audio_sample_rate: int | None
    truncated: bool  # a partial / unreadable packet ended the scan
    data_end: int | None  # byte offset just past the last complete packet (any stream), when known
    format: str = ""  # FFmpeg demuxer name
    rotation: int | None = 0  # display rotation, degrees counter-clockwise: 0, 90, 180 or 270 (None: not read)
    reordered: bool = False  # decode order differs from display order (B-frames)
    clean_keys: bool = True  # no key frame has frames displayed before it after it in decode order, or v.v.
    from_tables: bool = False  # read from an MP4's sample tables (mp4.read_mp4), not demuxed by PyAV
    container: Any = field(default=None, repr=False, compare=False)  # the scan's open PyAV container, if kept

    def release(self) -> Any:
        """Take the container the scan left open (``None`` if none); the caller closes it."""
        container, self.container = self.container, None
        return container

    def close(self) -> None:
        """Close the container the scan left open, if any."""
        container = self.release()
        if container is not None:
            container.close()

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def timestamps_stored(self) -> bool:
        """The container stores presentation timestamps (AVI and raw streams do not)."""
        return not any(f in NO_PTS_FORMATS for f in self.format.split(","))

    @property
    def order_from_timestamps(self) -> bool:
        """Sorting frames by pts gives the decoder's output order (false: AVI-like file with B-frames)."""
        return self.timestamps_stored or not self.reordered

    @property
    def duplicate_pts(self) -> bool:
        if self.from_tables:  # mp4.read_mp4 refuses duplicate timestamps
            return False
        return len(set(self.pts)) != len(self.pts)

    @property
    def display_size(self) -> tuple[int, int]:
        """``(height, width)`` of the displayed (rotated) frame."""
        return (self.width, self.height) if self.rotation in (90, 270) else (self.height, self.width)

    def seconds(self) -> torch.Tensor:
        """``[N]`` float64 pts in seconds (through numpy: a third of ``torch.tensor(list)``'s cost, same values)."""
        return torch.from_numpy(np.array(self.pts, dtype=np.float64) * float(self.time_base))

    def metadata(self, num_frames: int | None = None) -> VideoMetadata:
        """Metadata of the first ``num_frames`` frames (all by default)."""
        n = self.num_frames if num_frames is None else num_frames
        tb = float(self.time_base)
        first, last = self.pts[0] * tb, self.pts[n - 1] * tb
        last_dur = self.durations[n - 1] * tb
        if last_dur <= 0:
            last_dur = (last - first) / (n - 1) if n > 1 else 0.0
        duration = last - first + last_dur
        height, width = self.display_size
        return VideoMetadata(
            duration=duration,
            fps=n / duration if duration > 0 else 0.0,
            num_frames=n,
            width=width,
            height=height,
            has_audio=self.has_audio,
            audio_sample_rate=self.audio_sample_rate,
            start_time=first,
            rotation=self.rotation,
        )

    def frame_mappings_json(self) -> str:
        """The index in the JSON form torchcodec accepts as ``custom_frame_mappings`` (built as text: fast)."""
        frames = ",".join(
            f'{{"pts":{p},"duration":{d},"key_frame":{int(k)}}}'
            for p, d, k in zip(self.pts, self.durations, self.keyframes, strict=True)
        )
        return '{"frames":[' + frames + "]}"


def scan_video(
    src: str | bytes,
    name: str,
    backend: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    rotation: bool = True,
    keep_open: bool = False,
) -> VideoIndex:
    """Demux ``src`` into a :class:`VideoIndex` of its first video stream, from one ``av.open``.

    ``rotation``: read an MP4/MOV file's display rotation by decoding its first frame (``False``: leave
    ``VideoIndex.rotation`` ``None`` for a backend that reads it itself). ``keep_open``: leave the PyAV container
    open in ``VideoIndex.container`` for a reader to decode from (:meth:`VideoIndex.release` closes it).
    When the container's own index shows the file complete (:func:`index_complete`), only the video stream is
    demuxed; otherwise every stream is, to find where a truncated file's complete packets end.
    """
    import av

    try:
        container = av.open(av_input(src), metadata_errors="ignore", options=av_options(max_pixels))
    except Exception as e:  # av.FFmpegError and friends: unreadable header
        raise VideoDecodeError(name, backend, av_reason(e)) from e
    try:
        index = _scan(container, src, name, backend, max_pixels, rotation)
    except BaseException:
        container.close()
        raise
    if keep_open:
        index.container = container
    else:
        container.close()
    return index


def index_video(
    src: str | bytes,
    name: str,
    backend: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    rotation: bool = True,
    keep_open: bool = False,
) -> VideoIndex:
    """The :class:`VideoIndex` of ``src``: read from an H.264 MP4/MOV file's own sample tables when
    :func:`vidlang.data.decoding.mp4.read_mp4` can state it exactly (no PyAV, no container left open, the
    rotation always known), else by :func:`scan_video` (same arguments)."""
    try:
        found = read_mp4(src, max_pixels)
    except Unsupported:
        return scan_video(src, name, backend, max_pixels, rotation=rotation, keep_open=keep_open)
    except OSError as e:
        raise VideoDecodeError(name, backend, f"cannot read source: {e}") from e
    return VideoIndex(
        pts=_as_list(found.pts),
        durations=_as_list(found.durations),
        keyframes=_as_list(found.keyframes),
        time_base=found.time_base,
        width=found.width,
        height=found.height,
        codec="h264",
        stream_index=found.stream_index,
        has_audio=found.has_audio,
        audio_sample_rate=found.audio_sample_rate,
        truncated=False,
        data_end=found.data_end,
        format=MOV_FORMAT,
        rotation=found.rotation,
        reordered=found.reordered,
        clean_keys=found.clean_keys,
        from_tables=True,
    )


def _as_list(values: list | np.ndarray) -> list:
    return values if isinstance(values, list) else values.tolist()


def _scan(container, src: str | bytes, name: str, backend: str, max_pixels: int | None, rotation: bool) -> VideoIndex:
    import av

    fmt = container.format.name
    kind = NOT_VIDEO_FORMATS.get(fmt) or ("a still image" if fmt.endswith("_pipe") else None)
    if kind:
        raise VideoDecodeError(name, backend, f"{kind} ({fmt} format), not a video")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(name, backend, f"no video stream (streams: {', '.join(kinds)}); zero frames")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if not ctx.width or not ctx.height:
        limit = f" (or its first frame exceeds max_pixels={max_pixels})" if max_pixels is not None else ""
        raise VideoDecodeError(name, backend, f"the video stream has no frame size (corrupt header){limit}")
    check_pixels(ctx.width, ctx.height, max_pixels, name, backend)
    facts = dict(width=ctx.width, height=ctx.height, codec=ctx.name, stream_index=stream.index, format=fmt)
    delay = bool(ctx.has_b_frames)  # the decoder reorders frames (seen in the headers or while probing)
    audio = container.streams.audio[0] if container.streams.audio else None
    facts.update(time_base=stream.time_base, has_audio=audio is not None)
    facts["audio_sample_rate"] = (audio.sample_rate or None) if audio is not None else None
    mov = "mov" in fmt.split(",")
    reader = _Rotation(stream, max_pixels) if mov and rotation else None
    complete = mov and index_complete(container, src)
    if complete:  # the index lists every packet inside the file: the other streams need not be read
        for other in container.streams:
            if other.index != stream.index:
                other.discard = av.stream.Discard.all
    packets, truncated, data_end = _demux(container, stream, reader)
    if not packets:
        raise VideoDecodeError(name, backend, "the video stream has no decodable frames (zero frames)")
    if reader is not None and reader.degrees not in (0, 90, 180, 270):
        raise VideoDecodeError(name, backend, f"display rotation of {reader.degrees} degrees is not supported")
    decode_pts = [p[0] for p in packets]
    clean = clean_keys_plain(decode_pts, [p[2] for p in packets])
    reordered = delay or any(a > b for a, b in zip(decode_pts, decode_pts[1:], strict=False))
    packets.sort()
    return VideoIndex(
        pts=[p[0] for p in packets],
        durations=[p[1] for p in packets],
        keyframes=[p[2] for p in packets],
        **facts,
        truncated=truncated,
        data_end=data_end,
        rotation=(reader.degrees if reader is not None else None) if mov else 0,
        reordered=reordered,
        clean_keys=clean,
    )


def index_complete(container, src: str | bytes) -> bool:
    """An MP4/MOV container's sample tables list every packet of every stream, all inside the file.

    Then the file is not truncated (a file cut after its front ``moov`` box has entries past its end; one
    whose ``moov`` box is at the end and lost does not open). False for fragmented files (their tables do
    not count every sample) and whenever a stream's table and its header's frame count disagree.
    """
    size = len(src) if isinstance(src, bytes) else os.path.getsize(src)
    for s in container.streams:
        entries = s.index_entries
        if len(entries) == 0 or len(entries) != s.frames:
            return False
        if max(e.pos + e.size for e in entries) > size:
            return False
    return True


def read_rotation(src: str | bytes, name: str, backend: str, max_pixels: int | None) -> int:
    """The display rotation of an MP4/MOV file's first video stream (decodes its first frame; other formats: 0)."""
    import av

    try:
        with av.open(av_input(src), metadata_errors="ignore", options=av_options(max_pixels)) as container:
            if "mov" not in container.format.name.split(","):
                return 0
            stream = container.streams.video[0]
            reader = _Rotation(stream, max_pixels)
            for pkt in container.demux(stream):
                if pkt.size and not pkt.is_corrupt:
                    reader.feed(pkt)
                if reader.done:
                    break
    except Exception as e:
        raise VideoDecodeError(name, backend, av_reason(e)) from e
    if reader.degrees not in (0, 90, 180, 270):
        raise VideoDecodeError(name, backend, f"display rotation of {reader.degrees} degrees is not supported")
    return reader.degrees


class _Rotation:
    """Decodes the first frame of a stream during the scan to read its display rotation."""

    def __init__(self, stream, max_pixels: int | None) -> None:
        self.stream, self.degrees, self.fed, self.done = stream, 0, 0, False
        stream.codec_context.thread_count = 1
        if max_pixels is not None:
            stream.codec_context.options = {"max_pixels": str(max_pixels)}

    def feed(self, packet) -> None:
        if self.done:
            return
        self.fed += 1
        try:
            frames = self.stream.decode(packet)
        except Exception:  # a damaged first frame: try the next packet
            frames = []
        if frames:  # VideoFrame.rotation: the display matrix's angle (PyAV 18 has it; older ones may not)
            self.degrees = int(round(getattr(frames[0], "rotation", 0))) % 360
        self.done = bool(frames) or self.fed >= ROTATION_PACKETS


def _demux(container, stream, rotation: _Rotation | None) -> tuple[list[tuple[int, int, bool]], bool, int | None]:
    """Complete video packets ``(pts, duration, key)`` in decode order, up to the first bad packet of any stream.

    Also returns whether the file is truncated (a partial or unreadable packet) and the byte offset just
    past the last complete packet of any stream.
    """
    packets: list[tuple[int, int, bool]] = []
    bad_pts, data_end, partial = None, None, False
    try:
        for n, pkt in enumerate(container.demux()):
            if n >= MAX_PACKETS:
                break
            if pkt.size == 0:  # flush packet at the end of a stream
                continue
            is_video = pkt.stream_index == stream.index
            if pkt.is_corrupt:
                if is_video:
                    ts = pkt.pts if pkt.pts is not None else pkt.dts
                    bad_pts = ts if ts is not None else -1
                    break
                partial = True  # a damaged audio/other packet: the end of the file unless complete packets follow
                continue
            partial = False
            if pkt.pos is not None and pkt.pos >= 0:
                data_end = max(data_end or 0, pkt.pos + pkt.size)
            if not is_video:
                continue
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if ts is None:
                continue
            packets.append((ts, pkt.duration or 0, bool(pkt.is_keyframe)))
            if rotation is not None:
                rotation.feed(pkt)
    except Exception:  # a read error mid-file: keep what was read completely
        bad_pts = bad_pts if bad_pts is not None else float("inf")
    truncated = bad_pts is not None or partial
    if bad_pts is not None and bad_pts != float("inf"):
        # frames displayed after the missing one may lack reference data: keep the display-order prefix
        packets = [p for p in packets if p[0] < bad_pts] if bad_pts >= 0 else []
    return packets, truncated, data_end


# --------------------------------------------------------------------------- readers


def hwc_frames(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[T, H, W, C]`` uint8 array -> ``[T, C, H, W]`` tensor on ``device``."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)


class ScannedReader(VideoReader):
    """What every backend shares: open through the container scan, answer from the scan.

    The base loads the source, scans it (:func:`scan_video`, or takes the scan ``open_video`` already made),
    refuses files the backend cannot decode exactly (:meth:`unsupported`), picks the device and the output
    size, and serves metadata, timestamps, audio, index checks and empty requests. A backend supplies
    ``_library`` (its import, done first: a backend that cannot load fails before any I/O), ``_open``
    (its decoder; it may lower ``self._n``, the number of frames it decodes, a prefix of the scan's),
    ``_decode`` (raw frames at checked indices), ``_frames`` (raw -> ``[T, C, H, W]`` uint8 on the
    device) and ``_reason`` (a short message from its exceptions).
    """

    cpu_fallback: ClassVar[bool] = True  # CUDA without a GPU: warn and decode on the CPU
    scan_rotation: ClassVar[bool] = True  # needs the rotation from PyAV (False: the library reads it itself)
    keeps_container: ClassVar[bool] = False  # decodes from the scan's PyAV container (VideoIndex.container)

    def __init__(
        self,
        source: VideoSource,
        *,
        device: str | torch.device = "cpu",
        resize_short_side: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        scan: tuple[str | bytes, str, VideoIndex] | None = None,
    ) -> None:
        lib = self._library()
        if scan is None:
            self._src, self.name = load_source(source, self.backend)
            index = index_video(self._src, self.name, self.backend, max_pixels, rotation=self.scan_rotation,
                                keep_open=self.keeps_container)
        else:
            self._src, self.name, index = scan
        self.index = index
        try:
            if index.rotation is None and self.scan_rotation:
                index.rotation = read_rotation(self._src, self.name, self.backend, max_pixels)
            reason = self.unsupported(index)
            if reason:
                raise VideoDecodeError(self.name, self.backend, f"{reason}; use another backend (or 'auto')")
            self.max_pixels = max_pixels
            self._device = resolve_device(device, self.backend) if self.cpu_fallback else torch.device(device)
            self._resize = resize_short_side
            self._size = resized_hw(*index.display_size, resize_short_side)  # output (H, W), displayed
            self._n = index.num_frames
            try:
                self._open(lib)
            except VideoDecodeError:
                raise
            except Exception as e:
                raise VideoDecodeError(self.name, self.backend, self._reason(e)) from e
        finally:
            index.close()  # the scan's container, unless the reader took it
        self._meta = index.metadata(self._n)

    @classmethod
    def unsupported(cls, index: VideoIndex) -> str | None:
        """Why this backend cannot return the ffmpeg CLI's frames for a file so scanned (``None``: it can)."""
        return None

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

    def _complete_data(self) -> str | bytes:
        """The source, or for a truncated file its bytes up to the end of the last complete packet."""
        if not self.index.truncated or self.index.data_end is None:
            return self._src
        data = Path(self._src).read_bytes() if isinstance(self._src, str) else self._src
        return data[: self.index.data_end]

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
        """The audio track (of a truncated file: its complete packets)."""
        if not self.index.has_audio:
            return None
        return decode_audio(self._complete_data(), sample_rate, self.name, self.backend)

    def close(self) -> None:
        self._decoder = None

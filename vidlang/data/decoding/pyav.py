"""PyAV backend: FFmpeg bundled in the ``av`` wheel, one thread, on the CPU.

Two ways to reach frame ``i`` (both give the ffmpeg CLI's frame ``i``, see docs/decoding.md):

- **by timestamp** (the default): seek to the key frame at or before ``i`` and decode until the frame
  whose pts is the scan's pts of ``i``.
- **sequentially**, for files whose timestamps cannot give the display order: AVI (which stores no
  presentation timestamps) with B-frames -- MPEG-4 Part 2 as DivX/Xvid write it, packed B-frames
  included -- and files where frames share a timestamp. Frame ``i`` is the ``i``-th frame the decoder
  outputs from the start of the file, exactly as the ffmpeg CLI numbers them; a request for an earlier
  frame than the last one decoded restarts from the beginning (slow on long files, always right).

Seeking readers decode in the container the scan opened (one ``av.open`` per video); sequential passes and
truncated files open a fresh one (of the complete bytes). Frames are converted to RGB with swscale's bicubic
setting, the ffmpeg CLI's default (it matters for odd frame sizes only), then rotated as displayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError
from vidlang.data.decoding.scan import ScannedReader, av_input, av_options, av_reason, hwc_frames


@dataclass
class _Run:
    """A live decode from one seek: the frame iterator and the last display index it gave."""

    frames: Any
    last: int = -1


class _Frames:
    """The requested frames, written into one ``[T, H, W, 3]`` array as they are decoded (no list of frames to
    stack afterwards: a full decode of a long clip would hold it twice)."""

    def __init__(self, indices: list[int], size: tuple[int, int]) -> None:
        self.indices = indices
        self.row: dict[int, int] = {}  # display index -> its first row
        for row, i in enumerate(indices):
            self.row.setdefault(i, row)
        self.array = np.empty((len(indices), *size, 3), np.uint8)
        self.done: set[int] = set()

    def __contains__(self, index: int) -> bool:
        return index in self.done

    def put(self, index: int, rgb: np.ndarray) -> None:
        self.array[self.row[index]] = rgb
        self.done.add(index)

    def result(self) -> np.ndarray:
        """The array, with the rows of indices asked for twice copied from the first."""
        for row, i in enumerate(self.indices):
            if self.row[i] != row:
                self.array[row] = self.array[self.row[i]]
        return self.array


@READERS.register("pyav")
class PyAVReader(ScannedReader):
    """Decode with PyAV, seeking to key frames by timestamp, or sequentially where timestamps cannot be trusted."""

    backend = "pyav"
    keeps_container = True  # seeks and decodes in the container the scan read (one av.open per video)
    cpu_fallback = False  # frames are decoded on the CPU and moved to ``device`` as asked
    _reason = staticmethod(av_reason)

    @staticmethod
    def _library() -> Any:
        import av

        return av

    def _open(self, av: Any) -> None:
        self._av = av
        self._rgb = av.video.reformatter.VideoReformatter()  # one per reader: swscale's context is reused
        self._data = self._complete_data()
        self._pts_to_index = {p: i for i, p in enumerate(self.index.pts)}
        self.sequential = not self.index.order_from_timestamps or self.index.duplicate_pts
        self._container = None
        self._live: list | None = None  # sequential pass: [frame iterator, display index of its next frame]
        scanned = self.index.release()
        if scanned is not None and not self.sequential and not self.index.truncated:
            self._take(scanned)  # every request starts with a seek, which resets the demuxer and decoder
        else:
            if scanned is not None:
                scanned.close()
            self._reopen()
        h, w = self._size
        self._coded_size = (w, h) if self.index.rotation in (90, 270) else (h, w)  # converted size before rotating

    def _reopen(self) -> None:
        if self._container is not None:
            self._container.close()
        options = av_options(self.max_pixels)
        self._take(self._av.open(av_input(self._data), metadata_errors="ignore", options=options))

    def _take(self, container: Any) -> None:
        """Decode from ``container``: one thread, the pixel limit on the decoder (set before it opens)."""
        self._container = container
        self._stream = container.streams.video[0]
        ctx = self._stream.codec_context
        if not ctx.is_open:  # the scan may have opened it already (to read the rotation), with the same settings
            self._stream.thread_type = "SLICE"
            ctx.thread_count = 1
            if self.max_pixels is not None:
                ctx.options = {"max_pixels": str(self.max_pixels)}
        self._live = None

    def _decoded(self):
        """Frames the decoder outputs from the demuxer's position: complete packets, then a flush."""
        for pkt in self._container.demux(self._stream):
            if pkt.is_corrupt:  # a partial packet (truncated file): stop reading, keep what decodes
                break
            if pkt.size:
                yield from self._stream.decode(pkt)
        yield from self._stream.decode(None)

    def _decode(self, indices: list[int]) -> _Frames:
        out = _Frames(indices, self._size)
        if self.sequential:
            self._decode_sequential(sorted(out.row), out)
        else:
            self._decode_by_pts(sorted(out.row), out)
        return out

    def _frames(self, decoded: _Frames, indices: list[int]) -> torch.Tensor:
        return hwc_frames(decoded.result(), self._device)

    # ---------------------------------------------------------------- by timestamp

    def _decode_by_pts(self, wanted: list[int], out: _Frames) -> None:
        """Decode the frames ``wanted`` (sorted display indices) into ``out``, seeking forward to key frames when
        it pays."""
        run: _Run | None = None
        for target in wanted:
            if target in out:
                continue
            key = self._key_before(target)
            if run is None or target <= run.last or key > run.last + 1:
                run = self._seek(key)
            self._decode_until(run, target, out)

    def _key_before(self, target: int) -> int:
        keys = self.index.keyframes
        k = target
        while k > 0 and not keys[k]:
            k -= 1
        return k

    def _seek(self, key: int) -> _Run:
        self._live = None
        self._container.seek(self.index.pts[key], stream=self._stream, backward=True, any_frame=False)
        return _Run(self._decoded())

    def _decode_until(self, run: _Run, target: int, out: _Frames) -> None:
        """Decode from ``run`` until display index ``target`` is in ``out``."""
        target_pts = self.index.pts[target]
        for budget, frame in enumerate(run.frames):
            if budget > self.index.num_frames + 16:
                break
            if frame.pts is None:
                continue
            i = self._pts_to_index.get(frame.pts)
            if i is None:
                if frame.pts > target_pts:
                    break
                continue
            run.last = i
            if i in out.row and i not in out:
                out.put(i, self._to_rgb(frame, i))
            if frame.pts >= target_pts:
                break
        if target not in out:
            raise VideoDecodeError(self.name, self.backend, f"frame {target} could not be decoded")

    # ---------------------------------------------------------------- sequentially

    def _decode_sequential(self, wanted: list[int], out: _Frames) -> None:
        """Frame ``i`` is the ``i``-th frame out of the decoder from the start of the file."""
        if self._live is None or wanted[0] < self._live[1]:
            self._reopen()
            self._live = [self._decoded(), 0]
        frames, pos = self._live
        if pos <= wanted[-1]:
            for frame in frames:
                if pos in out.row:
                    out.put(pos, self._to_rgb(frame, pos))
                pos += 1
                if pos > wanted[-1]:
                    break
        self._live[1] = pos
        missing = [i for i in wanted if i not in out]
        if missing:
            raise VideoDecodeError(
                self.name, self.backend, f"frame {missing[0]} could not be decoded (the decoder gave {pos} frames)"
            )

    # ---------------------------------------------------------------- conversion

    def _to_rgb(self, frame, index: int) -> np.ndarray:
        """A decoded frame -> ``[H, W, 3]`` uint8 RGB at the output size, rotated as displayed."""
        if frame.is_corrupt:
            raise VideoDecodeError(self.name, self.backend, f"frame {index} is corrupt (damaged data)")
        h, w = self._coded_size
        if (h, w) != (frame.height, frame.width):
            frame = self._rgb.reformat(frame, width=w, height=h, format="rgb24", interpolation="BILINEAR")
        else:  # bicubic: the ffmpeg CLI's scaler setting
            frame = self._rgb.reformat(frame, format="rgb24", interpolation="BICUBIC")
        rgb = frame.to_ndarray()  # [h, w, 3]
        return np.rot90(rgb, self.index.rotation // 90) if self.index.rotation else rgb

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None
        self._live = None

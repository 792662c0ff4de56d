"""torchcodec backend: FFmpeg through PyTorch's decoder, on CPU or on a CUDA GPU (NVDEC).

The shared frame index (:func:`vidlang.data.decoding.scan.index_video`: an MP4's own sample tables, or the
PyAV container scan) is handed to torchcodec as its frame index (``custom_frame_mappings``), so torchcodec does
not scan the file a second time and its frame ``i`` is exactly the index's frame ``i`` (truncated files
included: torchcodec reads only their complete packets). An unrotated, unresized CPU decode of an MP4 indexed
from its tables opens torchcodec below ``VideoDecoder`` (:func:`core_ops`), with the index as tensors.
Resizing happens inside the decoder (``torchcodec.transforms.Resize``); torchcodec reads the display rotation
from the display matrix and applies it itself (the scan decodes no frame for it; a resized rotated file the scan
indexed opens the decoder a second time with the rotated output size; the MP4 fast path knows the rotation).

torchcodec finds a frame by its timestamp, so it refuses the files where timestamps cannot name
frames (see :meth:`TorchCodecReader.unsupported` and docs/decoding.md).
"""

from __future__ import annotations

import array
import inspect
from functools import cache
from typing import Any, ClassVar

import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError, resized_hw
from vidlang.data.decoding.scan import ScannedReader, VideoIndex


@cache
def core_ops() -> tuple[Any, Any, Any] | None:
    """torchcodec's own decoder constructor, stream setup and batch decode below ``VideoDecoder``, or ``None``.

    ``VideoDecoder`` turns the frame index into JSON and back and builds Python metadata that vidlang does not
    use (about 0.1 ms a clip, 5 % of a small clip's decode); these functions of ``torchcodec._core`` take the
    index as tensors. They are not public API: when this torchcodec lacks them, or they no longer take the keywords
    used here, the reader uses ``VideoDecoder``.
    """
    try:
        from torchcodec._core._decoder_utils import create_decoder
        from torchcodec._core._ffmpeg_ops import add_video_stream, get_frames_at_indices
    except (ImportError, AttributeError):
        return None
    uses = ((create_decoder, {"source", "seek_mode"}),
            (add_video_stream, {"num_threads", "dimension_order", "stream_index", "device", "custom_frame_mappings"}),
            (get_frames_at_indices, {"frame_indices"}))
    try:  # a torchcodec whose private functions changed their keywords: the public VideoDecoder instead
        if any(not names <= set(inspect.signature(fn).parameters) for fn, names in uses):
            return None
    except (TypeError, ValueError):
        return None
    return create_decoder, add_video_stream, get_frames_at_indices


def _tensor(values: list, code: str, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of Python ints or bools through an ``array.array`` (``code``): ~1.5 us for a short clip's
    index against ~6 us for ``torch.tensor(list)``. The tensor keeps the array alive. (An index is never empty:
    the scan and the MP4 reader refuse files without frames.)"""
    return torch.frombuffer(array.array(code, values), dtype=dtype)


@READERS.register("torchcodec")
class TorchCodecReader(ScannedReader):
    """Decode with ``torchcodec.decoders.VideoDecoder`` (one FFmpeg thread; NVDEC on ``device="cuda"``)."""

    backend = "torchcodec"
    scan_rotation = False  # torchcodec reads the display matrix itself (no frame decoded for it)
    direct: ClassVar[bool] = True  # open through :func:`core_ops` where it applies (False: always VideoDecoder)

    @classmethod
    def unsupported(cls, index: VideoIndex) -> str | None:
        if not index.order_from_timestamps:
            return (
                f"the {index.format} container stores no timestamps and the {index.codec} stream reorders frames "
                "(B-frames): torchcodec's FFmpeg derives other timestamps and misplaces or loses frames"
            )
        if index.duplicate_pts:
            return "frames share a timestamp, and torchcodec finds frames by timestamp (it returns the first of them)"
        return None

    @staticmethod
    def _library() -> Any:
        from torchcodec.decoders import VideoDecoder

        return VideoDecoder

    def _open(self, video_decoder: Any) -> None:
        self._core = self._core_route()
        if self._core is not None:
            create_decoder, add_video_stream, _ = self._core
            self._decoder = create_decoder(source=self._complete_data(), seek_mode="custom_frame_mappings")
            ix = self.index
            mappings = (_tensor(ix.pts, "q", torch.int64), _tensor(ix.keyframes, "b", torch.bool),
                        _tensor(ix.durations, "q", torch.int64))  # fmt: skip
            add_video_stream(self._decoder, num_threads=1, dimension_order="NCHW", stream_index=ix.stream_index,
                             device="cpu", custom_frame_mappings=mappings)  # fmt: skip
            return
        known = self.index.rotation  # None: an MP4/MOV whose rotation torchcodec reads from the display matrix
        self._decoder = self._new_decoder(video_decoder)
        rotation = round(self._decoder.metadata.rotation or 0) % 360
        if known is None:
            if rotation not in (0, 90, 180, 270):
                why = f"display rotation of {rotation} degrees is not supported"
                raise VideoDecodeError(self.name, self.backend, why)
            self.index.rotation = rotation
            size = resized_hw(*self.index.display_size, self._resize)
            if size != self._size:  # a resize to the displayed size: portrait once rotated
                self._size = size
                self._decoder = self._new_decoder(video_decoder)
        elif rotation != known:
            why = f"torchcodec reads a {rotation} degree rotation, the container scan {known}"
            raise VideoDecodeError(self.name, self.backend, why)

    def _new_decoder(self, video_decoder: Any) -> Any:
        kwargs = dict(
            stream_index=self.index.stream_index,
            num_ffmpeg_threads=1,
            device=str(self._device),
            custom_frame_mappings=self.index.frame_mappings_json(),
        )
        if self._size != self.index.display_size:
            from torchcodec.transforms import Resize

            kwargs["transforms"] = [Resize(self._size)]  # the displayed (rotated) size
        # frame indices are checked against the scan (torchcodec's len() may be estimated from the duration)
        return video_decoder(self._complete_data(), **kwargs)

    def _core_route(self) -> tuple[Any, Any, Any] | None:
        """:func:`core_ops` for an unrotated, unresized CPU decode of an MP4 read from its sample tables.

        Its display matrix is then the identity (so torchcodec applies no rotation: the check ``VideoDecoder``'s
        metadata serves is not needed) and its stream index a video track's.
        """
        ix = self.index
        plain = ix.from_tables and ix.rotation == 0 and self._size == ix.display_size and self._device.type == "cpu"
        return core_ops() if plain and self.direct else None

    def _decode(self, indices: list[int]) -> torch.Tensor:
        if self._core is not None:
            return self._core[2](self._decoder, frame_indices=indices)[0]  # [T, C, H, W]
        return self._decoder.get_frames_at(indices).data  # [T, C, H, W]

    @staticmethod
    def _reason(err: Exception) -> str:
        """The last line of torchcodec's message, without the C++ source location."""
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return msg.split(".cpp:")[-1].split(", ", 1)[-1] if ".cpp:" in msg else msg

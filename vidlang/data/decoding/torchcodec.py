"""torchcodec backend: FFmpeg through PyTorch's decoder, on CPU or on a CUDA GPU (NVDEC).

The shared container scan (:func:`vidlang.data.decoding.scan.scan_video`) is handed to
torchcodec as its frame index (``custom_frame_mappings``), so torchcodec does not scan the
file a second time and its frame ``i`` is exactly the scan's frame ``i`` (truncated files
included: torchcodec reads only their complete packets). Resizing happens inside the decoder
(``torchcodec.transforms.Resize``); torchcodec reads the display rotation from the display matrix and applies
it itself (the scan decodes no frame for it; a resized rotated file opens the decoder a second time with the
rotated output size).

torchcodec finds a frame by its timestamp, so it refuses the files where timestamps cannot name
frames (see :meth:`TorchCodecReader.unsupported` and docs/decoding.md).
"""

from __future__ import annotations

from typing import Any

import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError, resized_hw
from vidlang.data.decoding.scan import ScannedReader, VideoIndex


@READERS.register("torchcodec")
class TorchCodecReader(ScannedReader):
    """Decode with ``torchcodec.decoders.VideoDecoder`` (one FFmpeg thread; NVDEC on ``device="cuda"``)."""

    backend = "torchcodec"
    scan_rotation = False  # torchcodec reads the display matrix itself (no frame decoded for it)

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

    def _decode(self, indices: list[int]) -> torch.Tensor:
        return self._decoder.get_frames_at(indices).data  # [T, C, H, W]

    @staticmethod
    def _reason(err: Exception) -> str:
        """The last line of torchcodec's message, without the C++ source location."""
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return msg.split(".cpp:")[-1].split(", ", 1)[-1] if ".cpp:" in msg else msg

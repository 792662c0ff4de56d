"""torchcodec backend: FFmpeg through PyTorch's decoder, on CPU or on a CUDA GPU (NVDEC).

The shared container scan (:func:`vidlang.data.decoding.pyav.scan_video`) is handed to
torchcodec as its frame index (``custom_frame_mappings``), so torchcodec does not scan the
file a second time and its frame ``i`` is exactly the scan's frame ``i`` (truncated files
included). Resizing happens inside the decoder (``torchcodec.transforms.Resize``).
"""

from __future__ import annotations

from typing import Any

import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError
from vidlang.data.decoding.pyav import ScannedReader


@READERS.register("torchcodec")
class TorchCodecReader(ScannedReader):
    """Decode with ``torchcodec.decoders.VideoDecoder`` (one FFmpeg thread; NVDEC on ``device="cuda"``)."""

    backend = "torchcodec"

    @staticmethod
    def _library() -> Any:
        from torchcodec.decoders import VideoDecoder

        return VideoDecoder

    def _open(self, video_decoder: Any) -> None:
        kwargs = dict(
            stream_index=self.index.stream_index,
            num_ffmpeg_threads=1,
            device=str(self._device),
            custom_frame_mappings=self.index.frame_mappings_json(),
        )
        if self._size != (self.index.height, self.index.width):
            from torchcodec.transforms import Resize

            kwargs["transforms"] = [Resize(self._size)]
        self._decoder = video_decoder(self._src, **kwargs)
        # torchcodec may report the header's frame count (a truncated file lists missing frames): never fewer
        if len(self._decoder) < self.index.num_frames:
            raise VideoDecodeError(
                self.name, self.backend, f"index mismatch: {len(self._decoder)} vs {self.index.num_frames} frames"
            )

    def _decode(self, indices: list[int]) -> torch.Tensor:
        return self._decoder.get_frames_at(indices).data  # [T, C, H, W]

    @staticmethod
    def _reason(err: Exception) -> str:
        """The last line of torchcodec's message, without the C++ source location."""
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return msg.split(".cpp:")[-1].split(", ", 1)[-1] if ".cpp:" in msg else msg

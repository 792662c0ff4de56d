"""torchcodec backend: FFmpeg through PyTorch's decoder, on CPU or on a CUDA GPU (NVDEC).

The shared container scan (:func:`vidlang.data.decoding.pyav.scan_video`) is handed to
torchcodec as its frame index (``custom_frame_mappings``), so torchcodec does not scan the
file a second time and its frame ``i`` is exactly the scan's frame ``i`` (truncated files
included). Resizing happens inside the decoder (``torchcodec.transforms.Resize``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from vidlang.data.decoding.audio import decode_audio
from vidlang.data.decoding.base import (
    READERS,
    VideoDecodeError,
    VideoMetadata,
    VideoReader,
    VideoSource,
    normalize_indices,
    resized_hw,
)
from vidlang.data.decoding.pyav import load_source, scan_video


def resolve_device(device: str | torch.device, backend: str) -> torch.device:
    """``device`` itself, or the CPU with a warning when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"{backend}: CUDA decoding requested but no GPU is available; decoding on the CPU", stacklevel=3)
        return torch.device("cpu")
    return dev


@READERS.register("torchcodec")
class TorchCodecReader(VideoReader):
    """Decode with ``torchcodec.decoders.VideoDecoder`` (one FFmpeg thread; NVDEC on ``device="cuda"``)."""

    backend = "torchcodec"

    def __init__(
        self, source: VideoSource, *, device: str | torch.device = "cpu", resize_short_side: int | None = None
    ) -> None:
        from torchcodec.decoders import VideoDecoder

        self._src, self.name = load_source(source, self.backend)
        self.index = scan_video(self._src, self.name, self.backend)
        self._meta = self.index.metadata()
        self._device = resolve_device(device, self.backend)
        self._size = resized_hw(self.index.height, self.index.width, resize_short_side)
        kwargs = dict(
            stream_index=self.index.stream_index,
            num_ffmpeg_threads=1,
            device=str(self._device),
            custom_frame_mappings=self.index.frame_mappings_json(),
        )
        if self._size != (self.index.height, self.index.width):
            from torchcodec.transforms import Resize

            kwargs["transforms"] = [Resize(self._size)]
        try:
            self._decoder = VideoDecoder(self._src, **kwargs)
        except Exception as e:  # RuntimeError from the C++ core, ValueError for unusable streams
            raise VideoDecodeError(self.name, self.backend, _reason(e)) from e
        # torchcodec may report the header's frame count (a truncated file lists missing frames): never fewer
        if len(self._decoder) < self.index.num_frames:
            raise VideoDecodeError(
                self.name, self.backend, f"index mismatch: {len(self._decoder)} vs {self.index.num_frames} frames"
            )

    @property
    def metadata(self) -> VideoMetadata:
        return self._meta

    def frame_timestamps(self) -> torch.Tensor:
        return self.index.seconds()

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        idx = normalize_indices(indices, self.index.num_frames, self.name, self.backend)
        if not idx:
            h, w = self._size
            return torch.empty((0, 3, h, w), dtype=torch.uint8, device=self._device)
        try:
            return self._decoder.get_frames_at(idx).data  # [T, C, H, W]
        except Exception as e:
            raise VideoDecodeError(self.name, self.backend, f"decoding failed: {_reason(e)}") from e

    def get_audio(self, sample_rate: int = 16000) -> torch.Tensor | None:
        return decode_audio(self._src, sample_rate, self.name, self.backend) if self.index.has_audio else None

    def close(self) -> None:
        self._decoder = None


def _reason(err: Exception) -> str:
    """The last line of torchcodec's message, without the C++ source location."""
    msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return msg.split(".cpp:")[-1].split(", ", 1)[-1] if ".cpp:" in msg else msg

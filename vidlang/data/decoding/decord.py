"""decord backend (CPU).

decord can crash or hang on inputs that are not videos, so it only ever sees a source
that the shared PyAV container scan (:func:`vidlang.data.decoding.pyav.scan_video`)
accepted. decord refuses to open a truncated MP4 whose index lists frames past the end of
the data; for such a file it reads, from memory, the bytes up to the end of the last
complete packet, which gives the same decodable prefix as the other backends. Frame
counts and timestamps come from the scan (decord's own count is only checked against it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

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
from vidlang.data.decoding.torchcodec import resolve_device


@READERS.register("decord")
class DecordReader(VideoReader):
    """Decode with ``decord.VideoReader`` (one thread); resizing happens inside decord."""

    backend = "decord"

    def __init__(
        self, source: VideoSource, *, device: str | torch.device = "cpu", resize_short_side: int | None = None
    ) -> None:
        import decord

        self._src, self.name = load_source(source, self.backend)
        self.index = scan_video(self._src, self.name, self.backend)
        self._device = resolve_device(device, self.backend)
        self._size = resized_hw(self.index.height, self.index.width, resize_short_side)
        h, w = self._size
        try:
            self._vr = decord.VideoReader(self._decord_input(), num_threads=1, width=w, height=h)
        except Exception as e:  # decord raises DECORDError / RuntimeError
            raise VideoDecodeError(self.name, self.backend, _reason(e)) from e
        # decord may see fewer frames than the scan in a truncated file: keep the common prefix
        self._n = min(len(self._vr), self.index.num_frames)
        if self._n == 0:
            raise VideoDecodeError(self.name, self.backend, "no decodable frames (zero frames)")
        self._meta = self.index.metadata(self._n)

    def _decord_input(self):
        if not self.index.truncated or self.index.data_end is None:
            return self._src if isinstance(self._src, str) else io.BytesIO(self._src)
        data = Path(self._src).read_bytes() if isinstance(self._src, str) else self._src
        return io.BytesIO(data[: self.index.data_end])

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
            batch = self._vr.get_batch(idx).asnumpy()  # [T, H, W, C]
        except Exception as e:
            raise VideoDecodeError(self.name, self.backend, f"decoding failed: {_reason(e)}") from e
        return torch.from_numpy(batch).permute(0, 3, 1, 2).to(self._device)

    def get_audio(self, sample_rate: int = 16000) -> torch.Tensor | None:
        return decode_audio(self._src, sample_rate, self.name, self.backend) if self.index.has_audio else None

    def close(self) -> None:
        self._vr = None


def _reason(err: Exception) -> str:
    """decord's message without its C++ log prefix and stack trace."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
    msg = lines[0] if lines else type(err).__name__
    return msg.rsplit(": ", 1)[-1] if "/src/" in msg else msg

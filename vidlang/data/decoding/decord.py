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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError
from vidlang.data.decoding.pyav import ScannedReader, hwc_frames


@READERS.register("decord")
class DecordReader(ScannedReader):
    """Decode with ``decord.VideoReader`` (one thread); resizing happens inside decord."""

    backend = "decord"

    @staticmethod
    def _library() -> Any:
        import decord

        return decord

    def _open(self, decord: Any) -> None:
        h, w = self._size
        self._decoder = decord.VideoReader(self._decord_input(), num_threads=1, width=w, height=h)
        # decord may see fewer frames than the scan in a truncated file: keep the common prefix
        self._n = min(len(self._decoder), self.index.num_frames)
        if self._n == 0:
            raise VideoDecodeError(self.name, self.backend, "no decodable frames (zero frames)")

    def _decord_input(self):
        if not self.index.truncated or self.index.data_end is None:
            return self._src if isinstance(self._src, str) else io.BytesIO(self._src)
        data = Path(self._src).read_bytes() if isinstance(self._src, str) else self._src
        return io.BytesIO(data[: self.index.data_end])

    def _decode(self, indices: list[int]) -> np.ndarray:
        return self._decoder.get_batch(indices).asnumpy()  # [T, H, W, C]

    def _frames(self, decoded: np.ndarray, indices: list[int]) -> torch.Tensor:
        return hwc_frames(decoded, self._device)

    @staticmethod
    def _reason(err: Exception) -> str:
        """decord's message without its C++ log prefix and stack trace."""
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
        msg = lines[0] if lines else type(err).__name__
        return msg.rsplit(": ", 1)[-1] if "/src/" in msg else msg

"""decord backend (CPU).

decord can crash or hang on inputs that are not videos, so it only ever sees a source
that the shared PyAV container scan (:func:`vidlang.data.decoding.scan.scan_video`)
accepted. Frame counts and timestamps come from the scan (decord's own count is only
checked against it).

decord numbers frames by counting decoder output after seeking to a key frame. That is exact only
when every key frame splits the stream cleanly (no open-GOP leading pictures) and timestamps give the
display order; otherwise (HEVC and MPEG-4 Part 2 with B-frames, open-GOP H.264, AVI with B-frames,
frames sharing a timestamp) this reader decodes sequentially from the start of the file and never lets
decord seek (docs/decoding.md). decord refuses to open a truncated MP4 whose index lists frames past the end
of the data, so such a file is read from memory up to the end of its last complete packet; other
truncated containers are passed whole (a cut AVI crashes decord).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from vidlang.data.decoding.base import READERS, VideoDecodeError
from vidlang.data.decoding.scan import ScannedReader, VideoIndex, hwc_frames

CHUNK_BYTES = 64 << 20  # frames decoded per decord call in sequential mode: about this many bytes


@READERS.register("decord")
class DecordReader(ScannedReader):
    """Decode with ``decord.VideoReader`` (one thread); resizing happens inside decord."""

    backend = "decord"

    @classmethod
    def unsupported(cls, index: VideoIndex) -> str | None:
        if index.rotation in (90, 270):
            return f"decord 0.6 cannot decode video displayed rotated by {index.rotation} degrees (fails or distorts)"
        return None

    @staticmethod
    def _library() -> Any:
        import decord

        return decord

    def _open(self, decord: Any) -> None:
        self._lib = decord
        self._new_decoder()
        # decord may see fewer frames than the scan in a truncated file: keep the common prefix
        self._n = min(len(self._decoder), self.index.num_frames)
        if self._n == 0:
            raise VideoDecodeError(self.name, self.backend, "no decodable frames (zero frames)")
        ix = self.index
        self.sequential = not (ix.order_from_timestamps and ix.clean_keys and not ix.duplicate_pts)

    def _new_decoder(self) -> None:
        h, w = self._size
        # given a size, even its own, decord costs more (~0.15 ms of CPU on a 32-frame 112x112 clip): only to resize
        size = {} if (h, w) == (self.index.height, self.index.width) else {"width": w, "height": h}
        self._decoder = self._lib.VideoReader(self._decord_input(), num_threads=1, **size)
        self._pos = 0  # decord's current frame: the next one it decodes without seeking

    def _decord_input(self):
        mp4 = "mov" in self.index.format.split(",")
        src = self._complete_data() if mp4 else self._src
        return src if isinstance(src, str) else io.BytesIO(src)

    def _decode(self, indices: list[int]) -> np.ndarray:
        if not self.sequential:
            return self._decoder.get_batch(indices).asnumpy()  # [T, H, W, C]
        return self._decode_sequential(indices)

    def _decode_sequential(self, indices: list[int]) -> np.ndarray:
        """Read forward from decord's current frame (from a fresh reader when going back): no decord seek."""
        wanted = sorted(set(indices))
        if wanted[0] < self._pos:
            self._new_decoder()
        h, w = self._size
        chunk = max(1, CHUNK_BYTES // (h * w * 3))
        out: dict[int, np.ndarray] = {}
        todo = set(wanted)
        while self._pos <= wanted[-1]:
            span = list(range(self._pos, min(self._pos + chunk, wanted[-1] + 1)))
            batch = self._decoder.get_batch(span).asnumpy()  # contiguous from the current frame: no seek
            out.update((i, batch[j]) for j, i in enumerate(span) if i in todo)
            self._pos = span[-1] + 1
        return np.stack([out[i] for i in indices])

    def _frames(self, decoded: np.ndarray, indices: list[int]) -> torch.Tensor:
        return hwc_frames(decoded, self._device)

    @staticmethod
    def _reason(err: Exception) -> str:
        """decord's message without its C++ log prefix and stack trace."""
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
        msg = lines[0] if lines else type(err).__name__
        return msg.rsplit(": ", 1)[-1] if "/src/" in msg else msg

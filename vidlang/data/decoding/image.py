"""``image`` backend: a still image (JPEG, PNG, WebP, ... anything Pillow reads) as a one-frame video.

Used for the entries of still-image formats (``FormatIndex.still_images``, e.g. ``image_captions``): the data
module opens them with this backend and samples one frame per clip, so images join the video pipeline (transforms,
collate, bad-sample policy) as one-frame videos. It is never chosen by ``auto`` (not in ``AUTO_ORDER``).

The frame is the image as displayed (its EXIF orientation applied), in RGB; ``resize_short_side`` resizes it
(bilinear) as the video backends do; an image larger than ``max_pixels`` is refused from its header, before the
pixels are decoded. A missing, empty, truncated, corrupt or non-image file raises
:class:`~vidlang.data.decoding.base.VideoDecodeError` (in a dataset: a bad sample, skipped and counted).
Timestamps: one frame at 0 s, duration 1 s.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from vidlang.data.decoding.base import (
    DEFAULT_MAX_PIXELS,
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

IMAGE_BACKEND = "image"


@READERS.register(IMAGE_BACKEND)
class ImageReader(VideoReader):
    """One still image as a one-frame video (module docstring)."""

    backend = IMAGE_BACKEND

    def __init__(
        self,
        source: VideoSource,
        *,
        device: str | torch.device = "cpu",
        resize_short_side: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        from PIL import Image, ImageOps

        self.name = describe_source(source)
        check_path(source, self.backend)
        data = source_bytes(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own size alarm: refuse
                img = Image.open(io.BytesIO(data) if data is not None else source)
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise VideoDecodeError(self.name, self.backend,
                                           f"{width}x{height} image is larger than max_pixels={max_pixels}")
                img = ImageOps.exif_transpose(img).convert("RGB")  # decodes the pixels
        except VideoDecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as err:
            raise VideoDecodeError(self.name, self.backend, f"not a readable image ({type(err).__name__}: {err})") \
                from None  # fmt: skip
        self._meta = VideoMetadata(duration=1.0, fps=1.0, num_frames=1, width=img.width, height=img.height,
                                   has_audio=False)  # fmt: skip
        h, w = resized_hw(img.height, img.width, resize_short_side)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.BILINEAR)
        frame = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # [3, H, W] uint8
        self._frame = frame.to(resolve_device(device, self.backend))

    @property
    def metadata(self) -> VideoMetadata:
        return self._meta

    def frame_timestamps(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.float64)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """``[T, 3, H, W]``: the image at every (valid) index."""
        idx = normalize_indices(indices, 1, self.name, self.backend)
        return self._frame[None].expand(len(idx), -1, -1, -1).contiguous()

    def get_audio(self, sample_rate: int = 16000) -> torch.Tensor | None:
        return None

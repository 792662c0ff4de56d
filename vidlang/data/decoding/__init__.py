"""Video decoding: one :class:`VideoReader` interface, several backends."""

from vidlang.data.decoding.base import (
    READERS,
    VideoDecodeError,
    VideoMetadata,
    VideoReader,
    VideoSource,
)

__all__ = ["READERS", "VideoDecodeError", "VideoMetadata", "VideoReader", "VideoSource"]

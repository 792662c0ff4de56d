"""Video decoding: one :class:`VideoReader` interface, several backends.

``open_video(source, backend="auto")`` opens a path, ``bytes`` or a binary file-like object
with torchcodec, PyAV or decord (registered in :data:`READERS`); see
:mod:`vidlang.data.decoding.scan` for the rules on truncated, corrupt, rotated, too large and
non-video input, and docs/decoding.md for what each backend decodes exactly.
"""

from vidlang.data.decoding.audio import decode_audio
from vidlang.data.decoding.auto import (
    AUTO_ORDER,
    available_backends,
    backend_available,
    open_video,
    resolve_backend,
)
from vidlang.data.decoding.base import (
    DEFAULT_MAX_PIXELS,
    READERS,
    FrameIndexError,
    VideoDecodeError,
    VideoMetadata,
    VideoReader,
    VideoSource,
    resized_hw,
)
from vidlang.registry import import_submodules

import_submodules(__name__, __path__)  # the backend modules register their readers in READERS

__all__ = [
    "AUTO_ORDER",
    "DEFAULT_MAX_PIXELS",
    "READERS",
    "FrameIndexError",
    "VideoDecodeError",
    "VideoMetadata",
    "VideoReader",
    "VideoSource",
    "available_backends",
    "backend_available",
    "decode_audio",
    "open_video",
    "resized_hw",
    "resolve_backend",
]

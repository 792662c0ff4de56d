"""``open_video``: one entry point that picks a backend.

``backend="auto"`` takes the first *importable* backend of :data:`AUTO_ORDER`
(torchcodec > pyav > decord, the order of measured sparse-sampling speed, DESIGN.md §2).
It does **not** retry another backend when the chosen one fails to decode a file: every
backend opens through the same container scan, so a file one backend rejects is, in all
cases we tested, bad for all of them, and retrying would triple the cost of bad files in
a data loader. A backend whose import fails (e.g. torchcodec without FFmpeg shared
libraries) is skipped once and remembered.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from vidlang.data.decoding.base import READERS, VideoReader, VideoSource

AUTO_ORDER = ("torchcodec", "pyav", "decord")
_MODULES = {"torchcodec": "torchcodec.decoders", "pyav": "av", "decord": "decord"}


@cache
def backend_available(name: str) -> bool:
    """Whether a backend's library imports here (torchcodec also needs FFmpeg shared libraries)."""
    try:
        importlib.import_module(_MODULES[name])
    except Exception:  # ImportError, or RuntimeError/OSError from a library that cannot load
        return False
    return True


def available_backends() -> list[str]:
    """Registered backends whose library imports, in :data:`AUTO_ORDER`."""
    return [b for b in AUTO_ORDER if b in READERS and backend_available(b)]


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend ``open_video`` would use for ``backend``."""
    if backend != "auto":
        READERS.get(backend)  # KeyError listing the registered names
        return backend
    names = available_backends()
    if not names:
        raise RuntimeError(f"no video decoding backend can be imported (tried {', '.join(AUTO_ORDER)})")
    return names[0]


def open_video(
    source: VideoSource,
    backend: str = "auto",
    *,
    device: str | torch.device = "cpu",
    resize_short_side: int | None = None,
) -> VideoReader:
    """Open a video (path, bytes or binary file-like) with ``backend`` ("auto", "torchcodec", "pyav", "decord").

    Raises :class:`~vidlang.data.decoding.base.VideoDecodeError` for a missing, empty,
    truncated-beyond-repair, corrupt, non-video or zero-frame input.
    """
    name = resolve_backend(backend)
    return READERS.build(name, source, device=device, resize_short_side=resize_short_side)

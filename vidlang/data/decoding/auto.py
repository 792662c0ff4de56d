"""``open_video``: one entry point that picks a backend.

``backend="auto"`` scans the file once and takes the first *importable* backend of
:data:`AUTO_ORDER` (torchcodec > pyav > decord, the order of measured sparse-sampling speed) that
can return the ffmpeg CLI's frames for it: each backend names the files it cannot decode exactly
(``unsupported``, decided from the scan's metadata; see docs/decoding.md), and ``auto`` passes over
them, handing the scan on so that the file is not scanned twice (the scan is made for the first backend: no
rotation decode for torchcodec, the container kept open for PyAV). It does **not** retry another
backend when the chosen one fails to decode a file: every backend opens through the same container
scan, so a file one backend rejects is, in all cases we tested, bad for all of them, and retrying
would triple the cost of bad files in a data loader. A backend whose import fails (e.g. torchcodec
without FFmpeg shared libraries) is skipped once and remembered.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS, READERS, VideoDecodeError, VideoReader, VideoSource
from vidlang.data.decoding.scan import index_video, load_source, read_rotation

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
    """The backend ``open_video`` would use for ``backend`` on an ordinary file (``auto``: the first importable).

    For a given file ``auto`` may pick a later one (see the module docstring); the reader's
    ``backend`` attribute says which.
    """
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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> VideoReader:
    """Open a video (path, bytes or binary file-like) with ``backend`` ("auto", "torchcodec", "pyav", "decord").

    ``max_pixels`` (width x height, ``None`` for no limit) refuses larger streams before decoding.
    Raises :class:`~vidlang.data.decoding.base.VideoDecodeError` for a missing, empty,
    truncated-beyond-repair, corrupt, non-video, zero-frame or too large input, and when an explicitly
    chosen backend cannot decode the file exactly.
    """
    kwargs = dict(device=device, resize_short_side=resize_short_side, max_pixels=max_pixels)
    first = resolve_backend(backend)
    if backend != "auto":
        return READERS.build(first, source, **kwargs)
    src, name = load_source(source, first)
    likely = READERS.get(first)  # scanned for the backend auto picks for most files
    index = index_video(src, name, first, max_pixels, rotation=likely.scan_rotation, keep_open=likely.keeps_container)
    reasons = []
    try:
        for b in available_backends():
            reader = READERS.get(b)
            if index.rotation is None and reader.scan_rotation:
                index.rotation = read_rotation(src, name, b, max_pixels)
            why = reader.unsupported(index)
            if why is None:
                return READERS.build(b, source, scan=(src, name, index), **kwargs)
            reasons.append(f"{b}: {why}")
    finally:
        index.close()  # the scan's container, unless the reader took it
    raise VideoDecodeError(name, "auto", "no backend decodes this file exactly (" + "; ".join(reasons) + ")")

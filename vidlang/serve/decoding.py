"""Turning one video into a model's evaluation clip, in this process or in a pool of decoding processes.

:class:`ClipDecoder` is the preprocessing of :class:`~vidlang.serve.inference.InferenceBundle` without the model:
decode (``open_video``, resized to the tower's image size on the short side while decoding), one clip of the
model's evaluation frame count from the ``segment`` sampler, centre crop; the audio track for audio-visual models.
It is a small picklable description, so :class:`DecodePool` can run it in worker processes.

Why processes: a video request spends most of its server time in decoding, and most of that time holds the
Python interpreter lock (the container scan, the decoder set-up, the sampling), so decoding threads and the
HTTP event loop take turns on one core. Worker processes each have their own interpreter: the server
process keeps only the HTTP layer and the batched model forward. Each worker imports torch and the decoders
(about 200 MB of memory each); the clips come back as arrays. Errors (``VideoDecodeError`` and its kinds)
come back as the same exceptions.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS, VideoDecodeError

VideoInput = str | os.PathLike | bytes


class VideoTooLongError(VideoDecodeError):
    """A video longer than the duration limit it was decoded under (refused before decoding frames)."""


@dataclass(frozen=True)
class ClipDecoder:
    """The evaluation preprocessing of one model (module docstring). ``audio_rate``: decode the audio track at
    this sample rate too (audio-visual models), ``None``: no audio."""

    backend: str
    image_size: int
    num_frames: int
    audio_rate: int | None = None

    def decode_clip(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    max_seconds: float | None = None) -> Tensor:
        """One video -> eval clip ``uint8 [T, 3, S, S]``; :class:`VideoDecodeError` when it cannot be decoded.

        A stream larger than ``max_pixels`` (width x height) is refused before decoding, one longer than
        ``max_seconds`` with :class:`VideoTooLongError`."""
        from vidlang.data.decoding import open_video
        from vidlang.data.sampling import build_sampler, sample_clip
        from vidlang.data.transforms import ResizeCenterCrop

        label = name or (str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} bytes>")
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        try:
            with open_video(src, backend=self.backend, resize_short_side=self.image_size,
                            max_pixels=max_pixels) as reader:
                duration = float(reader.metadata.duration)
                if max_seconds is not None and duration > max_seconds:
                    raise VideoTooLongError(label, reader.backend,
                                            f"{duration:.1f} s long, over the {max_seconds:g} s limit")
                sampler = build_sampler("segment", num_frames=self.num_frames)
                clip = sample_clip(reader, sampler, training=False)[0]  # [T, C, H', W'], short side S
        except VideoDecodeError:
            raise
        except (ValueError, RuntimeError, OSError) as err:  # a sampler/backend failure on odd input
            raise VideoDecodeError(label, self.backend, str(err)) from err
        return ResizeCenterCrop(self.image_size)(clip)

    def decode_audio(self, source: VideoInput, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     rate: int | None = None) -> Tensor | None:
        """The whole audio track (mono, at ``rate``, else ``audio_rate``, else 16 kHz) ``[S]``; ``None`` without
        audio."""
        from vidlang.data.decoding import open_video

        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        with open_video(src, backend="pyav", max_pixels=max_pixels) as reader:
            if not reader.metadata.has_audio:
                return None
            return reader.get_audio(rate or self.audio_rate or 16000)

    def decode_video(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_seconds: float | None = None) -> tuple[Tensor, Tensor | None]:
        """Clip ``uint8 [T, 3, S, S]`` and, when ``audio_rate`` is set, the audio track (else None)."""
        clip = self.decode_clip(source, name, max_pixels, max_seconds)
        return clip, (self.decode_audio(source, max_pixels) if self.audio_rate is not None else None)


# -- the pool -------------------------------------------------------------------------------------------------
_WORKER_DECODER: ClipDecoder | None = None


def _init_worker(decoder: ClipDecoder) -> None:
    """Set up a worker: one torch thread, and the decoders imported now rather than at its first video."""
    global _WORKER_DECODER
    torch.set_num_threads(1)  # one core per worker: the pool's size is the parallelism
    from vidlang.data.decoding import READERS
    from vidlang.data.decoding.scan import ScannedReader
    from vidlang.data.sampling import build_sampler  # noqa: F401 - imported for its import time only

    for name in READERS.names():
        reader = READERS.get(name)
        if issubclass(reader, ScannedReader):
            try:
                reader._library()
            except ImportError:  # a backend that is not installed: open_video says so when asked for it
                pass
    _WORKER_DECODER = decoder


def _decode_in_worker(source: VideoInput, name: str | None, max_pixels: int | None,
                      max_seconds: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    assert _WORKER_DECODER is not None, "decoding worker used before its initializer ran"
    clip, audio = _WORKER_DECODER.decode_video(source, name, max_pixels, max_seconds)
    return clip.numpy(), (audio.numpy() if audio is not None else None)


def _ready(hold_s: float) -> int:
    time.sleep(hold_s)  # held a moment, so that each start-up job occupies a worker of its own
    return os.getpid()


class DecodePool:
    """``processes`` worker processes running ``decoder.decode_video`` (started with ``forkserver``: the server
    process already runs threads, which ``fork`` does not copy safely)."""

    def __init__(self, decoder: ClipDecoder, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"a decoding pool needs at least 1 process, got {processes}")
        self.decoder, self.processes = decoder, processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        ctx = mp.get_context("forkserver")
        # the fork server imports these once; every worker forked from it shares their pages
        ctx.set_forkserver_preload([__name__, "vidlang.data.decoding", "vidlang.data.sampling", "torchcodec.decoders",
                                    "av", "decord"])  # a backend that is not installed is skipped
        return cf.ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_init_worker,
                                      initargs=(self.decoder,))

    def start(self, timeout: float = 120.0) -> list[int]:
        """Start every worker now (instead of at the first videos); returns their process ids."""
        futures = [self._pool.submit(_ready, 0.2) for _ in range(self.processes)]
        try:
            return [f.result(timeout=timeout) for f in futures]
        except cf.process.BrokenProcessPool as err:
            self.close()
            raise RuntimeError(
                "the video decoding processes could not start. They re-import the program's main module, as every "
                "multiprocessing start method but fork does: a script must build the server under "
                "`if __name__ == \"__main__\":`, and code read from stdin cannot be re-imported. Or decode in threads "
                "(--decode-processes 0 / ServeConfig(decode_processes=0))") from err

    def decode_video(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_seconds: float | None = None) -> tuple[Tensor, Tensor | None]:
        """As :meth:`ClipDecoder.decode_video`, in a worker; blocks the calling thread (not the interpreter)."""
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        src = os.fspath(src) if isinstance(src, os.PathLike) else src
        pool = self._pool
        try:
            try:
                future = pool.submit(_decode_in_worker, src, name, max_pixels, max_seconds)
            except RuntimeError:  # another thread just replaced a broken pool: use the new one
                pool = self._pool
                future = pool.submit(_decode_in_worker, src, name, max_pixels, max_seconds)
            clip, audio = future.result()
        except cf.process.BrokenProcessPool as err:  # a worker died (a decoder crash, killed, out of memory)
            with self._lock:  # the next videos get fresh workers; this one is refused, naming it
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
            label = name or (src if isinstance(src, str) else f"<{len(src)} bytes>")
            raise VideoDecodeError(label, self.decoder.backend, "a decoding process died while this video was being "
                                   "decoded (a decoder crash on it or on a concurrent video, or a killed process); "
                                   "retrying may succeed") from err
        return torch.from_numpy(clip), (torch.from_numpy(audio) if audio is not None else None)

    def close(self) -> None:
        """Stop the workers (a decode still running finishes in its process, unawaited)."""
        with self._lock:
            self._pool.shutdown(wait=False, cancel_futures=True)

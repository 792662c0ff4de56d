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

import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np
import torch
from torch import Tensor

from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS, VideoDecodeError
from vidlang.data.worker_memory import keep_freed_memory

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
_PRELOAD = [__name__, "vidlang.data.decoding", "vidlang.data.sampling", "torchcodec.decoders", "av", "decord"]


def _init_worker(decoder: ClipDecoder) -> None:
    """Set up a worker: one torch thread, freed memory kept for the next video (:mod:`vidlang.data.worker_memory`),
    and the decoders imported now rather than at its first video."""
    global _WORKER_DECODER
    torch.set_num_threads(1)  # one core per worker: the pool's size is the parallelism
    keep_freed_memory()
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


def _worker_main(conn: Connection, decoder: ClipDecoder) -> None:
    """A worker process: set up, say ``("ready", pid)``, then answer each request ``(source, name, max_pixels,
    max_seconds)`` with ``(True, (clip, audio))`` or ``(False, exception)`` until the server closes its end."""
    _init_worker(decoder)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the server closed the pool (or is gone)
            return
        try:
            answer: tuple[bool, object] = (True, _decode_in_worker(*request))
        except Exception as err:  # the decoder's errors go back to the request
            answer = (False, err)
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as err:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} ({err})")))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection  # the server's end of the worker's pipe


class DecodePool:
    """``processes`` worker processes running ``decoder.decode_video`` (started with ``forkserver``: the server
    process already runs threads, which ``fork`` does not copy safely). Each worker has a pipe of its own and
    decodes one video at a time: the calling thread sends the request and waits on the answer itself, with no
    pool manager threads in between (those cost the server process about 0.2 ms of CPU per video, measured)."""

    def __init__(self, decoder: ClipDecoder, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"a decoding pool needs at least 1 process, got {processes}")
        self.decoder, self.processes = decoder, processes
        self._ctx = mp.get_context("forkserver")
        # the fork server imports these once; every worker forked from it shares their pages
        self._ctx.set_forkserver_preload(_PRELOAD)  # a backend that is not installed is skipped
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker | None] = queue.Queue()  # None: closed
        self._workers: list[_Worker] = []
        self._started = self._closed = False

    def _spawn(self) -> _Worker:
        """A new worker, not yet known to be ready."""
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(theirs, self.decoder), name="vidlang-decoder",
                                    daemon=True)
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        with self._lock:
            self._workers.append(worker)
        return worker

    @staticmethod
    def _ready(worker: _Worker, timeout: float) -> int:
        """The worker's pid once it has set up; RuntimeError when it died or did not answer in time."""
        try:
            if worker.conn.poll(timeout):
                kind, pid = worker.conn.recv()
                if kind == "ready":
                    return int(pid)
        except (EOFError, OSError):
            pass
        raise RuntimeError("a decoding process did not start")

    def start(self, timeout: float = 120.0) -> list[int]:
        """Start every worker now (instead of at the first videos); returns their process ids."""
        with self._lock:
            if self._started:
                return [w.process.pid for w in self._workers if w.process.pid is not None]
            self._started = True
        try:
            workers = [self._spawn() for _ in range(self.processes)]
            end = time.monotonic() + timeout
            pids = [self._ready(w, max(0.0, end - time.monotonic())) for w in workers]
        except (RuntimeError, OSError) as err:
            self.close()
            raise RuntimeError(
                "the video decoding processes could not start. They re-import the program's main module, as every "
                "multiprocessing start method but fork does: a script must build the server under "
                "`if __name__ == \"__main__\":`, and code read from stdin cannot be re-imported. Or decode in threads "
                "(--decode-processes 0 / ServeConfig(decode_processes=0))") from err
        for w in workers:
            self._idle.put(w)
        return pids

    def decode_video(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_seconds: float | None = None) -> tuple[Tensor, Tensor | None]:
        """As :meth:`ClipDecoder.decode_video`, in a free worker (waiting for one); blocks the calling thread (not
        the interpreter)."""
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        src = os.fspath(src) if isinstance(src, os.PathLike) else src
        label = name or (src if isinstance(src, str) else f"<{len(src)} bytes>")
        if not self._started:
            self.start()
        stopped = "the decoding processes are stopped (the server is shutting down)"
        worker = None if self._closed else self._idle.get()
        if worker is None:  # the pool is closed
            self._idle.put(None)
            raise VideoDecodeError(label, self.decoder.backend, stopped)
        try:
            worker.conn.send((src, name, max_pixels, max_seconds))
            ok, value = worker.conn.recv()
        except (EOFError, OSError) as err:  # the worker died (a decoder crash, killed, out of memory)
            self._replace(worker)
            if self._closed:
                raise VideoDecodeError(label, self.decoder.backend, stopped) from err
            raise VideoDecodeError(label, self.decoder.backend, "a decoding process died while this video was being "
                                   "decoded (a decoder crash on it, or a killed process); retrying may succeed"
                                   ) from err
        self._idle.put(worker)
        if not ok:
            raise value
        clip, audio = value
        return torch.from_numpy(clip), (torch.from_numpy(audio) if audio is not None else None)

    def _replace(self, dead: _Worker) -> None:
        """Reap a dead worker and put a fresh one in its place (none once the pool is closed)."""
        with self._lock:
            if dead in self._workers:
                self._workers.remove(dead)
            closed = self._closed
        dead.conn.close()
        dead.process.join(1.0)
        if closed:
            return
        try:
            fresh = self._spawn()
            self._ready(fresh, 120.0)
        except (RuntimeError, OSError):  # cannot happen once the pool started; the pool is then one smaller
            return
        self._idle.put(fresh)

    def close(self) -> None:
        """Stop the workers (a decode still running is cut: its request is being cancelled anyway)."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        self._idle.put(None)  # wakes a thread waiting for a free worker
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
        end = time.monotonic() + 2.0
        for w in workers:
            w.process.join(max(0.0, end - time.monotonic()))

"""Bounded, cancellable, batching inference behind the HTTP API.

Every piece of model work is a :class:`Job` with a deadline. :meth:`Engine.admit` bounds how many jobs may
wait or run at once (``max_queue``); one more is refused with 503 and ``Retry-After``. A job runs in stages
and is dropped, its slot freed, as soon as it is cancelled (its request timed out, its client left, the
server stops): a queued job never starts, and a running one stops at the next stage boundary.

* text queries -> the text batcher: concurrent queries are tokenized and encoded as one batch, then ranked
  against the index (one matrix product for the batch);
* videos -> ``workers`` decode threads (decoding runs outside the model lock, under the pixel and duration
  limits; with ``decode_processes`` each thread hands its video to a pool of decoding processes,
  :mod:`vidlang.serve.decoding`) -> the clip batcher: the decoded clips of concurrent requests are encoded as one batch;
* chat -> one generation thread, checking for cancellation between generated pieces; a question about the
  collection (``rag_chat``) is retrieved, its clips decoded and answered on that thread too
  (:mod:`vidlang.serve.rag`).

A batcher takes what is queued, waits up to ``batch_window_s`` for more (at most ``max_batch``), drops
cancelled jobs, then runs one forward pass. Threads are daemons: a stage that is running when the process
exits never holds the exit up.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vidlang.serve.limits import Deadline, HttpError

QUEUED, RUNNING, FINISHED = "queued", "running", "finished"


class Job:
    """One unit of model work: a future for its result, a deadline, and a slot in the engine's queue.

    Life: ``queued`` -> ``running`` (a worker took it) -> ``finished``. :meth:`cancel` finishes a queued job at
    once (its slot is freed) and marks a running one, which its worker drops at the next stage boundary."""

    def __init__(self, engine: Engine, kind: str, deadline: Deadline, payload: Any) -> None:
        self.engine, self.kind, self.deadline, self.payload = engine, kind, deadline, payload
        self.future: cf.Future = cf.Future()
        self.state = QUEUED
        self.cancel_reason: str | None = None
        self._lock = threading.Lock()

    # -- called by the request side ------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Stop this job: a queued one never runs, a running one stops at its next stage boundary."""
        with self._lock:
            if self.state == FINISHED or self.cancel_reason is not None:
                return
            self.cancel_reason = reason
            queued = self.state == QUEUED
            if queued:
                self.state = FINISHED
        self.future.cancel()
        if queued:
            self.engine._release(self, "cancelled")

    # -- called by workers -----------------------------------------------------------------------------
    def start(self) -> bool:
        """A worker takes the job: False when it was cancelled (or its deadline passed) meanwhile."""
        if self.deadline.expired():
            self.cancel("deadline")
        with self._lock:
            if self.state != QUEUED:
                return False
            self.state = RUNNING
            return True

    def alive(self) -> bool:
        """Between stages: False (and the job is finished, its slot freed) when it was cancelled or timed out."""
        if self.deadline.expired():
            self.cancel("deadline")
        if self.cancel_reason is None:
            return True
        self._finish("cancelled")
        return False

    def done(self, result: Any = None, error: BaseException | None = None) -> None:
        """The job's end: its slot is freed, then its result or error goes to the future (unless cancelled)."""
        self._finish("error" if error is not None else "ok")
        if not self.future.done():
            try:
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
            except cf.InvalidStateError:  # cancelled at this very moment
                pass

    def _finish(self, outcome: str) -> None:
        with self._lock:
            if self.state == FINISHED:
                return
            self.state = FINISHED
        self.engine._release(self, "cancelled" if self.cancel_reason is not None else outcome)


@dataclass
class EngineConfig:
    workers: int = 2  # decode threads
    decode_processes: int = 0  # > 0: the decode threads hand each video to a pool of this many processes
    max_queue: int = 64  # jobs waiting or running; one more -> 503
    batch_window_s: float = 0.005  # a batcher waits this long for more work
    max_batch: int = 16
    max_pixels: int | None = 4096 * 4096
    max_video_s: float | None = 3600.0
    retry_after_s: int = 1


class Engine:
    """The queue in front of the model; see the module docstring. ``on_event(name, value)`` receives
    ``("batch_text"|"batch_clip", size)``, ``("finished", outcome)`` and ``("rejected", "queue_full"|
    "shutting_down")`` (for metrics)."""

    def __init__(self, bundle: Any, index: Any | None, config: EngineConfig,
                 on_event: Callable[[str, Any], None] | None = None, rag: Any | None = None) -> None:
        """``rag``: a :class:`~vidlang.serve.rag.CollectionRetriever` (questions about the collection); its
        retrieval bundle then also embeds the ``search`` queries."""
        self.bundle, self.index, self.config, self.rag = bundle, index, config, rag
        self.text_bundle = rag.bundle if rag is not None else bundle
        self.on_event = on_event or (lambda name, value: None)
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._closed = False
        self._decode_q: queue.Queue = queue.Queue()
        self._chat_q: queue.Queue = queue.Queue()
        self._text = Batcher("text", self._run_text, config.batch_window_s, config.max_batch, on_event=self.on_event)
        self._decoding = 0  # video jobs in the decode stage: clips on their way to the clip batcher
        self._clips = Batcher("clip", self._run_clips, config.batch_window_s, config.max_batch,
                              on_event=self.on_event, more=lambda: self._decoding > 0)
        self._pool = None
        if config.decode_processes > 0:
            from vidlang.serve.decoding import DecodePool

            self._pool = DecodePool(bundle.clip_decoder, config.decode_processes)
            self._pool.start()
        self._threads = [threading.Thread(target=self._decode_loop, name=f"vidlang-decode-{i}", daemon=True)
                         for i in range(max(1, config.workers))]
        self._threads.append(threading.Thread(target=self._chat_loop, name="vidlang-chat", daemon=True))
        for th in self._threads:
            th.start()

    # -- admission -----------------------------------------------------------------------------------
    @property
    def refusing(self) -> bool:
        """Whether new jobs are refused (the server is stopping)."""
        return self._closed

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return len(self._jobs)

    def admit(self, kind: str, deadline: Deadline, payload: Any) -> Job:
        """A new job, or 503 when the queue is full or the server is stopping."""
        with self._lock:
            closed, full = self._closed, len(self._jobs) >= self.config.max_queue
            if not (closed or full):
                job = Job(self, kind, deadline, payload)
                self._jobs.add(job)
        if closed:
            self.on_event("rejected", "shutting_down")
            raise HttpError(503, "the server is shutting down", {"Connection": "close"})
        if full:
            self.on_event("rejected", "queue_full")
            raise HttpError(503, f"the server is busy ({self.config.max_queue} requests queued); retry shortly",
                            {"Retry-After": str(self.config.retry_after_s)})
        return job

    def _release(self, job: Job, outcome: str) -> None:
        self.on_event("finished", outcome)
        with self._lock:
            self._jobs.discard(job)

    # -- submitting work -----------------------------------------------------------------------------
    def search(self, query: str, k: int, deadline: Deadline) -> Job:
        """Top-``k`` ``[(path, score)]`` of ``query`` against the index."""
        job = self.admit("search", deadline, (query, k))
        self._text.put(job)
        return job

    def embed_video(self, source: str | bytes, name: str, deadline: Deadline) -> Job:
        """``(embedding [E], tokens [Q, D] or None)`` of one video."""
        job = self.admit("embed", deadline, (source, name))
        self._decode_q.put(job)
        return job

    def chat(self, source: str | bytes, question: str, max_new_tokens: int, deadline: Deadline,
             emit: Callable[[str], None]) -> Job:
        """Generate an answer; each piece goes to ``emit`` (on the generation thread) as it is produced."""
        job = self.admit("chat", deadline, (source, question, max_new_tokens, emit))
        self._chat_q.put(job)
        return job

    def rag_chat(self, question: str, k: int, max_new_tokens: int, deadline: Deadline,
                 emit: Callable[[str], None], on_clips: Callable[[Any], None]) -> Job:
        """Answer about the top-``k`` clips of the collection: ``on_clips`` receives the
        :class:`~vidlang.serve.rag.CollectionAnswer` (clips used and skipped) before the first piece goes to
        ``emit``."""
        if self.rag is None:
            raise HttpError(400, "no video collection to answer about: start the server with --index")
        job = self.admit("rag", deadline, (question, k, max_new_tokens, emit, on_clips))
        self._chat_q.put(job)
        return job

    # -- stopping ------------------------------------------------------------------------------------
    def refuse_new(self) -> None:
        """From now on every new job gets 503 (the server is stopping); jobs in flight go on."""
        with self._lock:
            self._closed = True

    def cancel_all(self, reason: str = "the server is shutting down") -> int:
        """Cancel every job in flight; returns how many."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    def close(self, join_s: float = 2.0) -> None:
        """Refuse new jobs, cancel those in flight, stop the threads; waits up to ``join_s`` for them (a stage
        still running after that is left to its daemon thread)."""
        self.refuse_new()
        self.cancel_all()
        for _ in range(max(1, self.config.workers)):
            self._decode_q.put(None)
        self._chat_q.put(None)
        self._text.close()
        self._clips.close()
        if self._pool is not None:
            self._pool.close()
        end = time.monotonic() + join_s
        for th in [*self._threads, self._text.thread, self._clips.thread]:
            th.join(max(0.0, end - time.monotonic()))

    # -- stages --------------------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        while (job := self._decode_q.get()) is not None:
            if not job.start():
                continue
            source, name = job.payload
            with self._lock:
                self._decoding += 1
            try:
                decode = self._pool.decode_video if self._pool is not None else self.bundle.decode_video
                clip, audio = decode(source, name, max_pixels=self.config.max_pixels,
                                     max_seconds=self.config.max_video_s)
                if job.alive():
                    self._clips.put(job, (clip, audio))
            except Exception as err:  # VideoDecodeError and friends: answered as 4xx by the route
                job.done(error=err)
            finally:
                with self._lock:
                    self._decoding -= 1

    def _run_clips(self, items: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        import torch

        clips = torch.stack([clip for clip, _ in items])  # [B, T, 3, S, S]
        out = self.bundle.encode_clips(clips, [audio for _, audio in items])
        tokens = out.tokens if out.tokens is not None else [None] * len(items)
        return list(zip(out.embeds, tokens, strict=True))

    def _run_text(self, items: Sequence[tuple[str, int]]) -> list[list[tuple[str, float]]]:
        embeds = self.text_bundle.embed_texts([q for q, _ in items])  # [B, E]
        k_max = max(k for _, k in items)
        hits = self.index.search_batch(embeds, k_max)  # stable ranking: a top-k is the top-k_max's prefix
        return [h[:k] for h, (_, k) in zip(hits, items, strict=True)]

    def _chat_loop(self) -> None:
        while (job := self._chat_q.get()) is not None:
            if not job.start():
                continue
            try:
                with self.bundle.chat_lock:
                    pieces = self._start_answer(job)
                    if pieces is None:  # cancelled while retrieving / decoding
                        job.alive()
                        continue
                    emit = job.payload[3]
                    for piece in _iterate(pieces):
                        if not job.alive():
                            break
                        emit(piece)
                    else:
                        job.done()
            except Exception as err:  # handed to the request
                job.done(error=err)

    def _start_answer(self, job: Job) -> Any:
        """The answer's pieces of a ``chat`` or ``rag`` job (None when it was cancelled meanwhile)."""
        if job.kind == "rag":
            from vidlang.serve.rag import answer_collection

            question, k, max_new, _, on_clips = job.payload
            out = answer_collection(self.bundle, self.rag, question, k, max_new_tokens=max_new, stream=True,
                                    max_pixels=self.config.max_pixels, max_seconds=self.config.max_video_s,
                                    alive=job.alive)
            if out is None:
                return None
            on_clips(out)
            return out.answer
        source, question, max_new, _ = job.payload
        return self.bundle.answer(source, question, max_new_tokens=max_new, stream=True,
                                  max_pixels=self.config.max_pixels, max_seconds=self.config.max_video_s)


def _iterate(pieces: Any) -> Iterator[str]:
    yield from ([pieces] if isinstance(pieces, str) else pieces)


class Batcher:
    """A thread that runs ``run(items) -> results`` over batches of queued jobs (see the module docstring)."""

    def __init__(self, name: str, run: Callable[[list[Any]], list[Any]], window_s: float, max_batch: int,
                 on_event: Callable[[str, Any], None], more: Callable[[], bool] | None = None) -> None:
        """``more()``: whether work that could join a batch is on its way (None: assume so); when not, the
        batcher does not wait for the window with an empty queue."""
        self.name, self.run, self.window_s, self.max_batch = name, run, window_s, max(1, max_batch)
        self.on_event, self.more = on_event, more
        self._q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"vidlang-batch-{name}", daemon=True)
        self.thread.start()

    def put(self, job: Job, item: Any = None) -> None:
        self._q.put((job, job.payload if item is None else item))

    def close(self) -> None:
        self._q.put(None)

    def _collect(self, first: tuple[Job, Any]) -> list[tuple[Job, Any]] | None:
        batch, end = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = end - time.monotonic()
            wait = left > 0 and (self.more is None or self.more())
            try:
                entry = self._q.get(timeout=min(left, 0.001) if self.more else left) if wait else self._q.get_nowait()
            except queue.Empty:
                if wait:
                    continue
                break
            if entry is None:
                self._q.put(None)  # stop after this batch
                break
            batch.append(entry)
        return batch

    def _loop(self) -> None:
        while (first := self._q.get()) is not None:
            batch = [(job, item) for job, item in self._collect(first) if _take(job)]
            if not batch:
                continue
            self.on_event(f"batch_{self.name}", len(batch))
            try:
                results = self.run([item for _, item in batch])
            except Exception as err:  # every job of the batch gets the error
                for job, _ in batch:
                    job.done(error=err)
                continue
            for (job, _), result in zip(batch, results, strict=True):
                job.done(result)


def _take(job: Job) -> bool:
    """A job entering a batch: a search job starts here, a video job is already running (decoded)."""
    return job.start() if job.state == QUEUED else job.alive()

"""Streaming from video2dataset / WebDataset shards, with explicit epoch semantics.

Shards are read sequentially (tar streaming, videos decoded from bytes in memory, nothing
extracted) by each DataLoader worker; samples pass through a per-worker **shuffle buffer**
(of raw bytes, decoded after leaving it), are decoded, transformed and **batched inside the
worker**, so the number of batches per epoch is exact and known (``len(dataset)``). Use a
DataLoader with ``batch_size=None`` (:func:`make_streaming_loader`).

Epoch semantics (``epoch`` set with :meth:`StreamingVideoDataset.set_epoch`, which the
loader made by :func:`make_streaming_loader` forwards from Lightning automatically):

* **exact** (``resampled=False``, default; evaluation and single-process training): every
  sample of every shard exactly once per epoch. The shard list is shuffled with
  ``(seed, epoch)`` when training (among shards of equal size, so that every rank and worker
  keeps the same sample count and ``len`` is the same in every epoch), then split: rank ``r``
  takes ``shards[r::world_size]``, its worker ``w`` takes ``[w::num_workers]`` of those.
  Needs ``len(shards) >= world_size * num_workers`` (else :class:`ValueError`: write more,
  smaller shards, or use fewer workers).
  ``samples_per_epoch`` is derived from the shards' sample counts (``{shard}_stats.json`` or a
  header scan). *Training* with ``world_size > 1``: ranks would see different counts, which hangs
  DDP, so each rank stops at the smallest rank's count (the samples this leaves out are counted and
  logged). *Evaluation* serves every sample of every shard: ranks may yield different numbers of
  batches (evaluation has no per-step collective; the tasks gather at the end of the epoch).
  A sample that fails to decode -- or that a truncated shard holds only in part or lost after the
  cut (the record names the shard and member; see
  :func:`~vidlang.data.formats.webdataset.iter_shard`) -- is counted. In *evaluation* it is skipped:
  its key goes to the next batch's ``skipped`` list (never a replacement: that would change the
  gallery). In *training* the worker serves a fresh decode (new random crop/frames) of its last good
  sample in its place, so every rank keeps its step count (a rank short of steps hangs DDP); if no
  sample has been served yet, the replacement follows the next good one.
* **resampled** (``resampled=True``; large-scale DDP training): each worker draws shards *with
  replacement* (seeded by seed, epoch, rank, worker), an endless stream; an epoch is exactly
  ``samples_per_epoch`` samples over all ranks (default: the shards' total count), split evenly
  among ranks and workers. Within an epoch a sample can appear several times or not at all.
  A sample that fails to decode is counted and replaced by the next one of the stream.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from vidlang.data.badsamples import BadSamplePolicy, BadSampleTracker, DecodeTimeout, SkippedSample, time_limit
from vidlang.data.collate import collate_samples
from vidlang.data.datasets import SharedEpoch, load_clip, mix_seed, pick_captions
from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS
from vidlang.data.formats.webdataset import (
    VIDEO_EXTS,
    BrokenSample,
    expand_shards,
    iter_shard,
    sample_from_parts,
    shard_sample_count,
)
from vidlang.data.sample import VideoEntry, VideoSample
from vidlang.data.shm_ring import RING_SPARE_SLOTS, BatchRing, RingDataLoader

log = logging.getLogger(__name__)


def iter_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Stream ``{"__key__", "__shard__", ext: bytes, ...}`` groups of consecutive members of one tar.

    A truncated shard yields its complete samples, then for each sample that is cut or lost
    ``{"__key__", "__shard__", "__member__", "__broken__": reason}`` (see
    :func:`~vidlang.data.formats.webdataset.iter_shard`); the consumer counts those as bad samples.
    """
    for s in iter_shard(path, lambda ext: True):
        if isinstance(s, BrokenSample):
            yield {"__key__": s.key, "__shard__": path, "__member__": s.member, "__broken__": s.reason}
        else:
            yield {"__key__": s.key, "__shard__": path, **s.parts}


def shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle with a bounded buffer; ``size <= 1`` keeps the order. Every item exactly once."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = rng.randrange(len(buf))
        buf[j], it = it, buf[j]
        yield it
    rng.shuffle(buf)
    yield from buf


def split_quota(total: int, parts: int, caps: Sequence[int] | None = None) -> list[int]:
    """Split ``total`` into ``parts`` near-equal integers (first ones get the remainder), capped by ``caps``."""
    base = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    if caps is None:
        return base
    if sum(caps) < total:
        raise ValueError(f"cannot take {total} samples from {sum(caps)}")
    out = [0] * parts  # proportional to caps, then fill the remainder
    for i, c in enumerate(caps):
        out[i] = c * total // max(sum(caps), 1)
    i = 0
    while sum(out) < total:
        if out[i % parts] < caps[i % parts]:
            out[i % parts] += 1
        i += 1
    return out


class StreamingVideoDataset(IterableDataset):
    """Batches of the collate contract streamed from shards (module docstring for epoch semantics)."""

    def __init__(
        self,
        shards: str | list[str],
        sampler: Any,
        transform: Any = None,
        training: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        backend: str = "auto",
        decode_audio: bool = False,
        audio_sample_rate: int = 16000,
        resize_short_side: int | None = None,
        policy: BadSamplePolicy | None = None,
        caption_mode: str | None = None,
        split: str = "train",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.shards = expand_shards(shards)
        self.counts = [shard_sample_count(s) for s in self.shards]
        self.sampler, self.transform, self.training = sampler, transform, training
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.buffer, self.resampled, self.seed = int(shuffle_buffer) if training else 0, resampled, seed
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.backend, self.resize_short_side, self.max_pixels = backend, resize_short_side, max_pixels
        self.audio_sample_rate = audio_sample_rate if decode_audio else None
        self.policy = policy or BadSamplePolicy()
        self.ring: BatchRing | None = None  # set by make_streaming_loader when it has workers
        self.caption_mode, self.split = caption_mode, split
        self.epoch = SharedEpoch()
        total = sum(self.counts)
        if not resampled and samples_per_epoch not in (None, total):
            raise ValueError(f"exact mode: an epoch is all {total} samples of the shards; use resampled=True "
                             f"for a fixed samples_per_epoch ({samples_per_epoch})")
        self.samples_per_epoch = int(samples_per_epoch or total)
        n_parts = self.world_size * max(self.num_workers, 1)
        if not resampled and len(self.shards) < n_parts:
            raise ValueError(f"exact mode needs at least world_size x num_workers = {n_parts} shards, got "
                             f"{len(self.shards)}; write smaller shards, use fewer workers, or resampled=True")

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    # ---------------------------------------------------------------- plan of an epoch
    def _exact_plan(self, epoch: int) -> tuple[list[list[list[int]]], list[list[int]]]:
        """Shard ids and sample quotas per (rank, worker) for ``epoch``.

        Slots are ordered by shard size and dealt round-robin to ranks, then workers; each epoch
        permutes shards only among slots of equal size and shuffles each worker's list, so every
        (rank, worker) holds the same number of samples in every epoch (a constant ``len``).
        """
        order = list(range(len(self.shards)))  # eval: the shards' own order
        if self.training:
            order.sort(key=lambda i: (self.counts[i], i))
        workers = max(self.num_workers, 1)
        rng = random.Random(mix_seed(self.seed, "shards", epoch))
        if self.training:
            for size in sorted(set(self.counts)):
                slots = [k for k, i in enumerate(order) if self.counts[i] == size]
                ids = [order[k] for k in slots]
                rng.shuffle(ids)
                for k, i in zip(slots, ids, strict=True):
                    order[k] = i
        shards = [[order[r :: self.world_size][w::workers] for w in range(workers)] for r in range(self.world_size)]
        if self.training:
            for rank in shards:
                for ws in rank:
                    rng.shuffle(ws)
        counts = [[sum(self.counts[i] for i in ws) for ws in rank] for rank in shards]
        if not self.training:  # evaluation: every sample; ranks may differ
            return shards, counts
        per_rank = min(sum(c) for c in counts)
        quotas = [split_quota(per_rank, workers, c) for c in counts]
        return shards, quotas

    def rank_samples(self, epoch: int = 0) -> int:
        """Samples this rank yields in ``epoch`` (evaluation: before bad-sample skips)."""
        if self.resampled:
            return split_quota(self.samples_per_epoch, self.world_size)[self.rank]
        return sum(self._exact_plan(epoch)[1][self.rank])

    def _worker_quotas(self, epoch: int) -> list[int]:
        workers = max(self.num_workers, 1)
        if self.resampled:
            return split_quota(self.rank_samples(epoch), workers)
        return self._exact_plan(epoch)[1][self.rank]

    def __len__(self) -> int:
        """Batches this rank yields per epoch (each worker batches its own samples; last batch may be short)."""
        return sum(math.ceil(q / self.batch_size) for q in self._worker_quotas(self.epoch.get()))

    # ---------------------------------------------------------------- iteration
    def _raw_stream(self, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        if not self.resampled:
            for sid in self._exact_plan(epoch)[0][self.rank][worker]:
                yield from iter_tar_samples(self.shards[sid])
            return
        rng = random.Random(mix_seed(self.seed, "resample", epoch, self.rank, worker))
        while True:
            yield from iter_tar_samples(self.shards[rng.randrange(len(self.shards))])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        if (info.num_workers if info else 0) != self.num_workers:
            raise RuntimeError(f"StreamingVideoDataset was built for num_workers={self.num_workers} but runs "
                               f"with {info.num_workers if info else 0}; pass the DataLoader's num_workers")
        epoch = self.epoch.get()
        quota = self._worker_quotas(epoch)[worker]
        if not self.resampled and self.world_size > 1:
            planned = sum(self.counts[i] for i in self._exact_plan(epoch)[0][self.rank][worker])
            if planned > quota:
                log.warning("epoch %d rank %d worker %d: %d samples not served this epoch, to keep ranks equal",
                            epoch, self.rank, worker, planned - quota)
        rng = random.Random(mix_seed(self.seed, "buffer", epoch, self.rank, worker))
        stream = shuffle_buffer(self._raw_stream(epoch, worker), self.buffer, rng)
        yield from self._batches(self._decoded(stream, epoch, worker, quota))

    def _decoded(
        self, stream: Iterator[dict[str, Any]], epoch: int, worker: int, quota: int
    ) -> Iterator[VideoSample | SkippedSample]:
        """Decoded samples of ``stream`` up to ``quota``; failures are counted and handled as the module
        docstring says (evaluation: :class:`SkippedSample` markers; exact training: repeats of a good sample)."""
        tracker = self._tracker()
        served, owed, last_good, n = 0, 0, None, 0
        # exact training must serve its quota (equal steps on every rank); resampled streams never end
        repeat = self.training and not self.resampled
        replacement = "repeat of a good sample" if repeat else ("next in stream" if self.training else None)
        for raw in stream:
            if served >= quota:
                return
            n += 1
            sample = self._try_decode(raw, epoch, worker, n, tracker, replacement)
            if isinstance(sample, SkippedSample):
                owed += repeat
                if not self.training:
                    yield sample
                continue
            served += 1
            last_good = raw
            yield sample
            while owed and served < quota:  # replacements for earlier failures, right after a good sample
                n += 1
                again = self._try_decode(raw, epoch, worker, n, tracker, replacement)
                if isinstance(again, SkippedSample):
                    break
                owed, served = owed - 1, served + 1
                yield again
        while repeat and owed and last_good is not None and served < quota:  # failures at the end of the stream
            n += 1
            again = self._try_decode(last_good, epoch, worker, n, tracker, replacement)
            if isinstance(again, SkippedSample):
                return
            owed, served = owed - 1, served + 1
            yield again

    def _try_decode(
        self, raw: dict[str, Any], epoch: int, worker: int, n: int, tracker: BadSampleTracker, replacement: str | None
    ) -> VideoSample | SkippedSample:
        """One raw sample decoded, or a :class:`SkippedSample` after recording the failure."""
        from vidlang.data.decoding import VideoDecodeError

        key = raw["__key__"].rsplit("/", 1)[-1]
        path = f"{raw['__shard__']}::{key}"
        if "__broken__" in raw:  # a sample a truncated shard holds only in part, or lost after the cut
            member = f"{raw['__shard__']}::{raw['__member__']}"
            tracker.failure(epoch, path, key, member, raw["__broken__"], replacement)
            return SkippedSample(key, member, raw["__broken__"])
        try:
            sample = self._decode(raw, key, path, mix_seed(self.seed, self.rank, epoch, worker, n))
        except (VideoDecodeError, OSError, DecodeTimeout, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
            tracker.failure(epoch, path, key, path, reason, replacement)
            return SkippedSample(key, path, reason)
        tracker.success(epoch)
        return sample

    def _tracker(self) -> BadSampleTracker:
        if not hasattr(self, "_tracker_obj"):
            self._tracker_obj = BadSampleTracker(self.policy, self.rank, self.split)
        return self._tracker_obj

    def _decode(self, raw: dict[str, Any], key: str, path: str, seed: int) -> VideoSample:
        video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
        if video_ext is None:
            raise OSError(f"{path}: no video member ({'/'.join(VIDEO_EXTS)})")
        s = sample_from_parts(key, raw, raw["__shard__"])
        entry = VideoEntry(path, key, s["captions"], s["window"], s["label"], s["eval_captions"], s["meta"])
        g = torch.Generator().manual_seed(seed)
        with time_limit(self.policy.decode_timeout_s, path):
            video, audio, has_audio, frame_mask = load_clip(
                entry, raw[video_ext], self.sampler, training=self.training, generator=g, backend=self.backend,
                resize_short_side=self.resize_short_side, audio_sample_rate=self.audio_sample_rate,
                max_pixels=self.max_pixels,
            )
        mode = self.caption_mode or ("random" if self.training else entry.eval_captions)
        captions = pick_captions(entry.captions, mode, g)
        if self.transform is not None:
            video, captions = self.transform(video, captions, g)
        return VideoSample(video, key, captions, entry.window, entry.label, audio, path, has_audio, frame_mask)

    def _batches(self, samples: Iterator[VideoSample | SkippedSample]) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` served samples; skipped markers ride along (``batch["skipped"]``) without
        taking a place (a trailing run of them comes as a batch of its own with no video)."""
        batch: list[VideoSample | SkippedSample] = []
        served = 0
        for s in samples:
            batch.append(s)
            served += not isinstance(s, SkippedSample)
            if served == self.batch_size:
                yield collate_samples(batch, self.ring)
                batch, served = [], 0
        if batch:
            yield collate_samples(batch, self.ring)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank or 0, world_size or 1


class _EpochSampler(Sampler):
    """The loader's endless dummy sampler (as for any iterable dataset), with ``set_epoch`` forwarded to the dataset."""

    def __init__(self, dataset: StreamingVideoDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def make_streaming_loader(dataset: StreamingVideoDataset, **loader_kwargs: Any) -> DataLoader:
    """A DataLoader for a streaming dataset (``batch_size=None``; batches come from the workers)."""
    workers = loader_kwargs.pop("num_workers", dataset.num_workers)
    if workers != dataset.num_workers:
        raise ValueError(f"the dataset was built for num_workers={dataset.num_workers}, the loader asks for {workers}")
    prefetch = loader_kwargs.get("prefetch_factor") or 2
    dataset.ring = BatchRing(workers, slots=prefetch + RING_SPARE_SLOTS) if workers else None
    loader = RingDataLoader(dataset, batch_size=None, num_workers=workers, **loader_kwargs)
    object.__setattr__(loader, "sampler", _EpochSampler(dataset))  # so Lightning's set_epoch reaches the dataset
    return loader

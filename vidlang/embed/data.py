"""Data of ``vidlang embed``: entries of a data config or a folder, served in planned batches per rank.

:class:`EmbedDataModule` gives Lightning's predict loop one loader per rank. Rank 0 lists the shards not yet
on disk (:class:`~vidlang.embed.plan.ShardPlan`) and broadcasts the list, each rank takes its round-robin share
and reads it in batches that never cross a shard. Videos are decoded by the evaluation path of the data
pipeline (:class:`~vidlang.data.datasets.VideoTextDataset`, ``training=False``): the eval sampler and transform of
the data config, and the bad-sample policy -- a video that fails to load is left out of its batch and reported
(``skipped``), never replaced or zero-filled. Text-only runs read no video at all.

Batch (from :func:`collate_planned`): the batch contract of :mod:`vidlang.data.collate` for the loaded samples,
plus ``index`` (entry index of each loaded row, ``[B]`` list) and ``skipped_rows`` (``[(entry index, reason)]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vidlang.data.badsamples import BadSamplePolicy, SkippedSample
from vidlang.data.config import DecodeConfig, LoaderConfig, SamplingConfig, TransformConfig
from vidlang.data.sample import VideoEntry
from vidlang.data.worker_memory import KeepFreedMemory
from vidlang.embed.plan import ShardPlan
from vidlang.errors import ConfigError


def folder_entries(root: str | os.PathLike) -> list[VideoEntry]:
    """Every video under ``root`` (the extensions of ``vidlang search``), key = path relative to ``root``."""
    from vidlang.serve.index import scan_videos

    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"--videos {root}: not a folder")
    entries = [VideoEntry(str(base / rel), rel) for rel in scan_videos(base)]
    if not entries:
        raise ConfigError(f"--videos {root}: no video files in it")
    return entries


def config_entries(spec: dict[str, Any]) -> list[VideoEntry]:
    """The entries of one split spec ``{"format": NAME, **format args}`` (any registered format)."""
    from vidlang.data.formats import build_index

    spec = dict(spec)
    if "format" not in spec:
        raise ConfigError(f"data split {spec}: needs a 'format' key")
    fmt = spec.pop("format")
    entries = build_index(fmt, **spec).entries
    if not entries:
        raise ConfigError(f"data split (format {fmt}): no entries")
    return entries


@dataclass(frozen=True)
class TextItem:
    """A text-only item: no video decoded."""

    key: str
    path: str
    captions: list[str]


class PlannedDataset(Dataset):
    """Entry index -> ``(index, VideoSample | SkippedSample | TextItem)``."""

    def __init__(self, entries: Sequence[VideoEntry], videos: Dataset | None) -> None:
        self.entries, self.videos = entries, videos

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        if self.videos is None:
            e = self.entries[index]
            return index, TextItem(e.key, e.path, list(e.captions))
        return index, self.videos[index]


def collate_planned(items: Sequence[tuple[int, Any]]) -> dict[str, Any]:
    """``(index, sample)`` pairs -> the batch of the module docstring."""
    from vidlang.data.collate import collate_samples

    if not items:  # the placeholder batch of a rank with nothing to do
        return {"video": None, "captions": [], "key": [], "index": [], "skipped_rows": []}
    skipped = [(i, s.reason) for i, s in items if isinstance(s, SkippedSample)]
    loaded = [(i, s) for i, s in items if not isinstance(s, SkippedSample)]
    if loaded and isinstance(loaded[0][1], TextItem):
        batch: dict[str, Any] = {"video": None, "captions": [c for _, s in loaded for c in s.captions[:1]],
                                 "key": [s.key for _, s in loaded]}
    else:
        batch = collate_samples([s for _, s in items])
    batch["index"] = [i for i, _ in loaded]
    batch["skipped_rows"] = skipped
    return batch


class PlannedBatches(Sampler):
    """A fixed list of batches (entry indices), as a batch sampler."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EmbedDataModule(pl.LightningDataModule):
    """Entries + the clip settings -> the predict loader of each rank (module docstring)."""

    def __init__(self, entries: Sequence[VideoEntry], plan: ShardPlan, out: str | os.PathLike,
                 sampling: SamplingConfig, transform: TransformConfig, loader: LoaderConfig, decode: DecodeConfig,
                 bad_samples: BadSamplePolicy, video: bool = True, seed: int = 0) -> None:
        super().__init__()
        if len(entries) != plan.count:
            raise ValueError(f"{len(entries)} entries for a plan of {plan.count}")
        self.entries, self.plan, self.out = list(entries), plan, Path(out)
        self.sampling, self.transform, self.loader, self.decode = sampling, transform, loader, decode
        self.bad_samples, self.video, self.seed = bad_samples, video, seed
        self.assigned: list[int] = []  # this rank's shards (set by predict_dataloader)
        self.run: dict[str, Any] | None = None  # the run's identity (plan.check_run), written by rank 0

    def _dist(self) -> tuple[int, int, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, trainer.strategy

    def pending_shards(self) -> list[int]:
        """The shards not on disk, as rank 0 sees them (every rank calls this: a collective)."""
        from vidlang.embed.plan import check_run
        from vidlang.io import _remove_stale

        rank, world, strategy = self._dist()
        pending = None
        if rank == 0:
            if self.run is not None:
                check_run(self.out, self.run)
            self.out.mkdir(parents=True, exist_ok=True)
            pending = self.plan.pending(self.out)
        if self.out.is_dir():
            _remove_stale(self.out)  # temporary files of this host's killed writers
        return list(strategy.broadcast(pending, src=0)) if strategy is not None and world > 1 else \
            list(pending or [])  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        rank, world, _ = self._dist()
        self.assigned = ShardPlan.split(self.pending_shards(), rank, world)
        # a rank with no shard still gets one empty batch: Lightning refuses a loader of length 0 under DDP
        batches = self.plan.batches(self.assigned, self.loader.batch(False)) or [[]]
        videos = None
        if self.video:
            from vidlang.data.datasets import VideoTextDataset

            d = self.decode
            videos = VideoTextDataset(
                self.entries, self.sampling.build(False), self.transform.build(False), training=False,
                backend=d.backend, decode_audio=d.audio, audio_sample_rate=d.audio_sample_rate,
                resize_short_side=d.resize_short_side, seed=self.seed, rank=rank, policy=self.bad_samples,
                caption_mode="first", split="predict", max_pixels=d.max_pixels)
        workers = self.loader.num_workers if self.video else 0
        kw: dict[str, Any] = dict(num_workers=workers, timeout=self.loader.timeout_s if workers else 0,
                                  pin_memory=self.loader.pin_memory and torch.cuda.is_available())
        if workers:
            kw["prefetch_factor"] = self.loader.prefetch_factor
            kw["worker_init_fn"] = partial(_seed_worker, seed=self.seed, rank=rank)
            if self.loader.keep_freed_memory:
                kw["worker_init_fn"] = KeepFreedMemory(kw["worker_init_fn"])
        return DataLoader(PlannedDataset(self.entries, videos), batch_sampler=PlannedBatches(batches),
                          collate_fn=collate_planned, **kw)


def _seed_worker(worker_id: int, seed: int, rank: int) -> None:
    from vidlang.data.datamodule import seed_worker

    seed_worker(worker_id, seed, rank)

"""``VideoDataModule``: formats -> datasets -> loaders for train / val / test, from a typed config.

Each split is a dict ``{"format": NAME, **format_args}`` (see :data:`vidlang.data.formats.FORMATS`),
e.g. in YAML for LightningCLI::

    data:
      train: {format: webvid, csv: data/webvid_train.csv, video_root: data}
      val: {format: msrvtt, csv: data/MSRVTT_JSFUSION_test.csv, video_root: data/videos}
      num_frames: 8
      image_size: 224

Batches follow :mod:`vidlang.data.collate` (``video`` stays uint8; the task normalises on the
device in ``on_after_batch_transfer`` with :func:`vidlang.data.transforms.normalize`).

Seeding and workers: decoders are opened inside ``__getitem__`` (in the workers, never before
the fork); the main process only opens files with PyAV for the preflight check. Per-sample
randomness is seeded by (seed, rank, epoch, index), so it does not depend on the number of
workers; ``worker_init_fn`` also seeds ``random``/``numpy``/``torch`` of each worker from
(seed, rank, worker id, epoch at worker start) for third-party code. With persistent workers
the epoch reaches the workers through shared memory (``set_epoch``, called by Lightning via
the sampler). In training, ranks split the shuffled index without padding (no duplicated samples):
the last ``len % world_size`` samples of each epoch's permutation are left out so that every rank
runs the same number of steps (logged). In evaluation nothing is left out: the index is padded by
repeating its first samples until every rank has the same number (>= 1, so no rank skips the
evaluation loop and leaves the others waiting in a collective); the tasks drop those repeats when
they gather (``num_videos`` counts each video once).

GPU decode: ``decode_device="cuda"`` decodes with torchcodec on the GPU in the main process
(``num_workers`` forced to 0: CUDA contexts do not survive a fork), frames stay on the GPU
for the transforms; without a GPU it falls back to CPU decoding with a warning.
"""

from __future__ import annotations

import logging
import random
import tempfile
import warnings
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from vidlang.data.badsamples import BadSamplePolicy, make_callback, preflight
from vidlang.data.collate import collate_samples
from vidlang.data.datasets import VideoTextDataset, mix_seed
from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS
from vidlang.data.formats import build_index
from vidlang.data.sample import FormatIndex
from vidlang.data.sampling import build_sampler
from vidlang.data.shm_ring import RING_SPARE_SLOTS, BatchRing, RingDataLoader
from vidlang.data.streaming import StreamingVideoDataset, make_streaming_loader
from vidlang.data.transforms import ClipTransform
from vidlang.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class EpochSampler(DistributedSampler):
    """Rank split: training drops the tail, evaluation pads with repeats (see module docs); ``set_epoch`` also
    reaches the dataset's workers."""

    def __init__(self, dataset: Any, shuffle: bool, seed: int, rank: int, world_size: int, drop_tail: bool) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_tail)
        n = len(dataset)
        # drop_tail: the largest multiple of world_size <= n; else the smallest >= n (padded with repeats)
        self.total = n - n % world_size if drop_tail else -(-n // world_size) * world_size
        if drop_tail and n % world_size:
            log.info("each epoch leaves out %d of %d samples so that %d ranks take equal steps",
                     n % world_size, n, world_size)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        if self.total > n:  # evaluation padding: repeat from the start (cyclically when n < world_size)
            order = (order * -(-self.total // n))[: self.total]
        return iter(order[: self.total][self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` of a DataLoader worker from (seed, rank, worker, epoch)."""
    info = get_worker_info()
    epoch = info.dataset.epoch.get() if info is not None and hasattr(info.dataset, "epoch") else 0
    s = mix_seed(seed, rank, worker_id, epoch)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def resolve_decode_device(device: str) -> str:
    """``cuda`` when requested and present; otherwise ``cpu`` (with a warning if cuda was asked for)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn("decode_device='cuda' but no CUDA GPU is available: decoding on the CPU instead", stacklevel=2)
        return "cpu"
    return device


class VideoDataModule(pl.LightningDataModule):
    """Video-text / recognition data for train, val and test (module docstring)."""

    def __init__(
        self,
        train: dict[str, Any] | None = None,
        val: dict[str, Any] | None = None,
        test: dict[str, Any] | None = None,
        num_frames: int = 8,
        sampler: str = "segment",
        sampler_args: dict[str, Any] | None = None,
        eval_sampler: str | None = None,
        eval_sampler_args: dict[str, Any] | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        three_crop: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        backend: str = "auto",
        decode_device: str = "cpu",
        resize_short_side: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_audio: bool = False,
        audio_sample_rate: int = 16000,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        bad_sample_dir: str | None = None,
        max_skip_rate: float = 0.05,
        max_retries: int = 10,
        decode_timeout_s: float = 60.0,
        loader_timeout_s: float = 600.0,
        preflight_entries: int = 64,
    ) -> None:
        """Build from config (every argument is a LightningCLI option).

        Args:
            train, val, test: ``{"format": NAME, **format args}`` per split (None = no such split).
            num_frames: frames per clip (T).
            sampler, sampler_args: training frame sampler (:data:`vidlang.data.sampling.SAMPLERS`).
            eval_sampler, eval_sampler_args: evaluation sampler (default: the training one), e.g. ``multiview``.
            image_size: square crop size; crop_scale / crop_ratio: random-resized-crop ranges (training).
            hflip: horizontal-flip probability (0: direction words would lie; captions are swapped when on).
            three_crop: evaluation with 3 spatial crops (V -> 3V views).
            batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, prefetch_factor: loaders.
            backend: decoding backend; decode_device: ``cpu`` or ``cuda`` (main-process GPU decode).
            resize_short_side: resize at decode time (speed); decode_audio, audio_sample_rate: audio track.
            max_pixels: largest frame (width x height) decoded; a video with bigger frames is a bad sample,
                refused from its metadata before decoding (``null``: no limit).
            streaming, shuffle_buffer, resampled, samples_per_epoch: shard streaming (webdataset splits).
            seed: base seed (per rank, worker, epoch and sample).
            bad_sample_dir, max_skip_rate, max_retries, decode_timeout_s, preflight_entries: the bad-sample
                policy (:mod:`vidlang.data.badsamples`); loader_timeout_s: DataLoader batch timeout (0 = none).
        """
        super().__init__()
        for key, value, low in (("num_frames", num_frames, 1), ("batch_size", batch_size, 1),
                                ("eval_batch_size", eval_batch_size, 1), ("image_size", image_size, 1),
                                ("num_workers", num_workers, 0)):  # fmt: skip
            if value is not None and value < low:
                raise ConfigError(f"data.{key} must be >= {low}, got {value}")
        self.save_hyperparameters()
        self.splits = {"train": train, "val": val, "test": test}
        for name, spec in self.splits.items():
            if spec is not None and "format" not in spec:
                raise ConfigError(f"data.{name}: a split needs a 'format' key, one of the registered formats")
        self.decode_device = resolve_decode_device(decode_device)
        self.num_workers = num_workers
        self.backend = "torchcodec" if self.decode_device != "cpu" and backend == "auto" else backend
        if self.decode_device != "cpu" and num_workers > 0:
            warnings.warn("GPU decoding runs in the main process: num_workers set to 0", stacklevel=2)
            self.num_workers = 0
        self.policy = BadSamplePolicy(bad_sample_dir, max_skip_rate, max_retries, decode_timeout_s=decode_timeout_s,
                                      preflight_entries=preflight_entries)
        self.indices: dict[str, FormatIndex] = {}
        self.datasets: dict[str, Any] = {}
        self._callback: Any = None

    # ---------------------------------------------------------------- building
    @property
    def classes(self) -> list[str] | None:
        """Class names of the first split that has them (recognition data)."""
        return next((ix.classes for ix in self.indices.values() if ix.classes is not None), None)

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _sampler(self, training: bool) -> Any:
        h = self.hparams
        name, args = h.sampler, dict(h.sampler_args or {})
        if not training and h.eval_sampler is not None:
            name, args = h.eval_sampler, dict(h.eval_sampler_args or {})
        if name == "fps":
            args.setdefault("max_frames", h.num_frames)
        else:
            args.setdefault("num_frames", h.num_frames)
        return build_sampler(name, **args)

    def _transform(self, training: bool) -> ClipTransform:
        h = self.hparams
        if training:
            return ClipTransform(h.image_size, "train", h.crop_scale, h.crop_ratio, h.hflip)
        return ClipTransform(h.image_size, "three_crop" if h.three_crop else "eval")

    def _common(self, training: bool) -> dict[str, Any]:
        h = self.hparams
        return dict(sampler=self._sampler(training), transform=self._transform(training), training=training,
                    backend=self.backend, decode_audio=h.decode_audio, audio_sample_rate=h.audio_sample_rate,
                    resize_short_side=h.resize_short_side, seed=h.seed, policy=self.policy, max_pixels=h.max_pixels)

    def _build(self, split: str) -> Any:
        spec = dict(self.splits[split])
        fmt = spec.pop("format")
        training = split == "train"
        h = self.hparams
        rank, world = self._dist()
        if h.streaming and fmt == "webdataset":
            return StreamingVideoDataset(
                spec["shards"], batch_size=h.batch_size if training else (h.eval_batch_size or h.batch_size),
                num_workers=self.num_workers, shuffle_buffer=h.shuffle_buffer, resampled=h.resampled and training,
                samples_per_epoch=h.samples_per_epoch if training else None, rank=rank, world_size=world,
                split=split, **self._common(training))
        self.indices[split] = build_index(fmt, **spec)
        entries = self.indices[split].entries
        return VideoTextDataset(entries, device=self.decode_device, rank=rank, split=split, **self._common(training))

    def setup(self, stage: str | None = None) -> None:
        if self.policy.report_dir is None:
            self.policy.report_dir = tempfile.mkdtemp(prefix="vidlang_bad_samples_")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if self.splits[split] is not None and split not in self.datasets:
                self.datasets[split] = self._build(split)
                ds = self.datasets[split]
                if split == "train" and isinstance(ds, VideoTextDataset):
                    preflight(ds.entries, self.policy, backend="pyav")
        self._attach_callback()

    def _attach_callback(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._callback is not None:
            return
        trackers = [ds.tracker for ds in self.datasets.values() if isinstance(ds, VideoTextDataset)]
        self._callback = make_callback(self.policy, trackers)
        trainer.callbacks.append(self._callback)

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets.values():
            ds.set_epoch(epoch)

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            if self.splits[split] is None:
                raise ValueError(f"no '{split}' split configured (data.{split})")
            self.setup(None)
        ds, h = self.datasets[split], self.hparams
        rank, world = self._dist()
        workers = self.num_workers
        kw: dict[str, Any] = dict(
            num_workers=workers, pin_memory=h.pin_memory and self.decode_device == "cpu" and torch.cuda.is_available(),
            worker_init_fn=partial(seed_worker, seed=h.seed, rank=rank) if workers else None,
            persistent_workers=h.persistent_workers and workers > 0, timeout=h.loader_timeout_s if workers else 0,
        )
        if workers:
            kw["prefetch_factor"] = h.prefetch_factor
        if isinstance(ds, StreamingVideoDataset):
            return make_streaming_loader(ds, **kw)
        training = split == "train"
        sampler = EpochSampler(ds, shuffle=training, seed=h.seed, rank=rank, world_size=world, drop_tail=training)
        bs = h.batch_size if training else (h.eval_batch_size or h.batch_size)
        if not workers:
            return DataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=collate_samples, **kw)
        ring = BatchRing(workers, slots=h.prefetch_factor + RING_SPARE_SLOTS)
        return RingDataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=partial(collate_samples, ring=ring), **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

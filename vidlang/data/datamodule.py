"""``VideoDataModule``: formats -> datasets -> loaders for train / val / test, from a typed config.

Each split is a dict ``{"format": NAME, **format_args}`` (see :data:`vidlang.data.formats.FORMATS`); the
other settings come in typed groups (:mod:`vidlang.data.config`), e.g. in YAML for LightningCLI::

    data:
      train: {format: webvid, csv: data/webvid_train.csv, video_root: data}
      val: {format: msrvtt, csv: data/MSRVTT_JSFUSION_test.csv, video_root: data/videos}
      sampling: {num_frames: 8, eval_num_frames: 16}
      transform: {image_size: 224}
      loader: {batch_size: 32, num_workers: 8}

Training clips have ``sampling.num_frames`` frames, validation and test clips ``sampling.eval_num_frames``
(default: the same). Splits of still images (formats whose index is ``still_images``, e.g. ``image_captions``)
are read with the ``image`` backend as one-frame clips.

Joint training (Frozen in Time): ``train_mix`` lists further training sources, each a split like ``train`` with
an optional ``batch_size``; their batches are interleaved with ``train``'s, one batch of each source in turn,
each batch from one source (:class:`vidlang.data.mixing.TrainStream`; an epoch ends with the shortest source).
:meth:`VideoDataModule.set_train_frames` changes the training frame count of the video sources between epochs
(the frame curriculum, :class:`vidlang.data.curriculum.FrameCurriculum`); evaluation keeps its count.

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

GPU decode: ``decode.device: cuda`` decodes with torchcodec on the GPU in the main process
(``loader.num_workers`` forced to 0: CUDA contexts do not survive a fork), frames stay on the GPU
for the transforms; without a GPU it falls back to CPU decoding with a warning.
"""

from __future__ import annotations

import logging
import random
import tempfile
import warnings
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from vidlang.config import check_min
from vidlang.data.badsamples import BadSamplePolicy, make_callback, preflight
from vidlang.data.collate import collate_samples
from vidlang.data.config import (
    DATA_MOVED,
    DecodeConfig,
    LoaderConfig,
    SamplingConfig,
    StreamingConfig,
    TransformConfig,
    as_config,
)
from vidlang.data.datasets import VideoTextDataset, mix_seed
from vidlang.data.decoding.image import IMAGE_BACKEND
from vidlang.data.formats import build_index
from vidlang.data.mixing import TrainStream
from vidlang.data.sample import FormatIndex
from vidlang.data.shm_ring import RING_SPARE_SLOTS, BatchRing, RingDataLoader
from vidlang.data.streaming import StreamingVideoDataset, make_streaming_loader
from vidlang.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


GROUP_TYPES: dict[str, type] = {"sampling": SamplingConfig, "transform": TransformConfig, "loader": LoaderConfig,
                                 "decode": DecodeConfig, "streaming": StreamingConfig, "bad_samples": BadSamplePolicy}


def check_parsed_groups(data: Any) -> None:
    """Raise :class:`ConfigError` for a group given as a plain value in a parsed ``data`` section (e.g. the old
    ``streaming: true``), see :func:`vidlang.config.check_parsed_groups`."""
    from vidlang.config import check_parsed_groups as check

    check(data, GROUP_TYPES, "data", DATA_MOVED)


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
        warnings.warn(f"data.decode.device={device!r} but no CUDA GPU is available: decoding on the CPU instead",
                      stacklevel=2)
        return "cpu"
    return device


class VideoDataModule(pl.LightningDataModule):
    """Video-text / recognition data for train, val and test (module docstring)."""

    def __init__(
        self,
        train: dict[str, Any] | None = None,
        val: dict[str, Any] | None = None,
        test: dict[str, Any] | None = None,
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008  (frozen: a shared default is safe)
        transform: TransformConfig = TransformConfig(),  # noqa: B008
        loader: LoaderConfig = LoaderConfig(),  # noqa: B008
        decode: DecodeConfig = DecodeConfig(),  # noqa: B008
        streaming: StreamingConfig = StreamingConfig(),  # noqa: B008
        bad_samples: BadSamplePolicy = BadSamplePolicy(),  # noqa: B008  (copied: setup sets its report_dir)
        seed: int = 0,
        train_mix: list[dict[str, Any]] | None = None,
    ) -> None:
        """Build from config (every argument is a LightningCLI option; the groups are :mod:`vidlang.data.config`).

        Args:
            train, val, test: ``{"format": NAME, **format args}`` per split (None = no such split).
            sampling: frames per clip (train / eval) and the frame samplers.
            transform: crop size, training augmentation, three-crop evaluation.
            loader: batch sizes and DataLoader workers.
            decode: backend, device, decode-time resize, pixel limit, audio.
            streaming: shard streaming of ``webdataset`` splits.
            bad_samples: the bad-sample policy (:mod:`vidlang.data.badsamples`).
            seed: base seed (per rank, worker, epoch and sample).
            train_mix: further training sources ``{"format": NAME, **format args, "batch_size": N (optional)}``,
                interleaved with ``train`` batch by batch (module docstring).

        Each group may also be given as a mapping of its fields (e.g. from YAML loaded in Python).
        """
        super().__init__()
        self.sampling = as_config(SamplingConfig, sampling, "sampling")
        self.transform = as_config(TransformConfig, transform, "transform")
        self.loader = as_config(LoaderConfig, loader, "loader")
        self.decode = as_config(DecodeConfig, decode, "decode")
        self.streaming = as_config(StreamingConfig, streaming, "streaming")
        self.bad_samples = replace(as_config(BadSamplePolicy, bad_samples, "bad_samples"))  # our own copy
        self.seed = seed
        self.splits = {"train": train, "val": val, "test": test}
        self.train_mix = [dict(spec) for spec in train_mix or []]
        if self.train_mix and train is None:
            raise ConfigError("data.train_mix: the extra training sources need a data.train split")
        named = [*self.splits.items(), *((f"train_mix[{i}]", s) for i, s in enumerate(self.train_mix))]
        for name, spec in named:
            if spec is not None and "format" not in spec:
                raise ConfigError(f"data.{name}: a split needs a 'format' key, one of the registered formats")
        for i, spec in enumerate(self.train_mix):
            check_min(f"data.train_mix[{i}]", 1, batch_size=spec.get("batch_size"))
        # plain values only: the hyper-parameters go into checkpoints, which must not pickle vidlang classes
        self.save_hyperparameters({**self.splits, **{g: asdict(getattr(self, g)) for g in GROUP_TYPES}, "seed": seed,
                                   "train_mix": self.train_mix})
        self.decode_device = resolve_decode_device(self.decode.device)
        self.num_workers = self.loader.num_workers
        self.backend = "torchcodec" if self.decode_device != "cpu" and self.decode.backend == "auto" else \
            self.decode.backend  # fmt: skip
        if self.decode_device != "cpu" and self.num_workers > 0:
            warnings.warn("GPU decoding runs in the main process: num_workers set to 0", stacklevel=2)
            self.num_workers = 0
        self.indices: dict[str, FormatIndex] = {}
        self.datasets: dict[str, Any] = {}
        self._callback: Any = None
        self.frames_version = 0  # bumped by set_train_frames
        self._train_stream: TrainStream | None = None
        self._plain_train_loader = False

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

    def _common(self, training: bool) -> dict[str, Any]:
        d = self.decode
        return dict(sampler=self.sampling.build(training), transform=self.transform.build(training),
                    training=training, backend=self.backend, decode_audio=d.audio,
                    audio_sample_rate=d.audio_sample_rate, resize_short_side=d.resize_short_side, seed=self.seed,
                    policy=self.bad_samples, max_pixels=d.max_pixels)  # fmt: skip

    def _spec(self, split: str) -> dict[str, Any]:
        """The format spec of ``split``: ``train``, ``val``, ``test`` or ``train_mix[i]`` (without its batch size)."""
        if split.startswith("train_mix["):
            spec = dict(self.train_mix[int(split[len("train_mix[") : -1])])
            spec.pop("batch_size", None)
            return spec
        return dict(self.splits[split])

    def _build(self, split: str) -> Any:
        spec = self._spec(split)
        fmt = spec.pop("format")
        training = split.startswith("train")
        st = self.streaming
        rank, world = self._dist()
        if st.enabled and fmt == "webdataset":
            return StreamingVideoDataset(
                spec["shards"], batch_size=self.loader.batch(training), num_workers=self.num_workers,
                shuffle_buffer=st.shuffle_buffer, resampled=st.resampled and training,
                samples_per_epoch=st.samples_per_epoch if training else None, rank=rank, world_size=world,
                split=split, **self._common(training))
        index = self.indices[split] = build_index(fmt, **spec)
        common = self._common(training)
        if index.still_images:  # images: one frame per clip, whatever the frame count (or curriculum) says
            common.update(backend=IMAGE_BACKEND, sampler=self._image_sampling().build(training))
        # every training source reports its bad samples as "train" (one count per epoch and stage)
        return VideoTextDataset(index.entries, device=self.decode_device, rank=rank,
                                split="train" if training else split, **common)  # fmt: skip

    def _image_sampling(self) -> SamplingConfig:
        return replace(self.sampling, num_frames=1, eval_num_frames=None, sampler="segment", sampler_args={},
                       eval_sampler=None, eval_sampler_args={})  # fmt: skip

    def _train_sources(self) -> list[str]:
        return ["train", *(f"train_mix[{i}]" for i in range(len(self.train_mix)))] if self.splits["train"] else []

    def set_train_frames(self, num_frames: int) -> None:
        """Training clips of the video sources get ``num_frames`` frames from the next epoch's first batch on (a
        frame curriculum); evaluation keeps the count it had. Image sources stay at one frame. The training
        DataLoaders are built again (new workers) when the count changes."""
        check_min("data.sampling", 1, num_frames=num_frames)
        if self._plain_train_loader:
            raise RuntimeError("set_train_frames: the training DataLoader was already handed out; call it before "
                               "train_dataloader() (a FrameCurriculum does it in its setup)")
        if self._train_stream is None:
            self._train_stream = TrainStream(self._train_loaders, lambda: self.frames_version)
        if num_frames == self.sampling.num_frames and self.sampling.eval_num_frames is not None:
            return
        self.sampling = replace(self.sampling, num_frames=num_frames, eval_num_frames=self.sampling.frames(False))
        self.frames_version += 1
        for split in self._train_sources():
            ds = self.datasets.get(split)
            if isinstance(ds, StreamingVideoDataset):
                raise ConfigError("set_train_frames (a frame curriculum) works with indexed data, not streamed shards")
            if ds is not None and not self.indices[split].still_images:
                ds.sampler = self.sampling.build(True)

    def setup(self, stage: str | None = None) -> None:
        if self.bad_samples.report_dir is None:
            self.bad_samples.report_dir = tempfile.mkdtemp(prefix="vidlang_bad_samples_")  # our copy (see __init__)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        splits = [s for s in (wanted.get(stage, SPLITS) if stage else SPLITS) if self.splits[s] is not None]
        if "train" in splits:
            splits[splits.index("train") : splits.index("train") + 1] = self._train_sources()
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._build(split)
                ds = self.datasets[split]
                if split.startswith("train") and isinstance(ds, VideoTextDataset):
                    backend = IMAGE_BACKEND if self.indices[split].still_images else "pyav"
                    preflight(ds.entries, self.bad_samples, backend=backend)
        self._attach_callback()

    def _attach_callback(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._callback is not None:
            return
        trackers = [ds.tracker for ds in self.datasets.values() if isinstance(ds, VideoTextDataset)]
        self._callback = make_callback(self.bad_samples, trackers)
        trainer.callbacks.append(self._callback)

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets.values():
            ds.set_epoch(epoch)

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            if not split.startswith("train_mix") and self.splits[split] is None:
                raise ValueError(f"no '{split}' split configured (data.{split})")
            self.setup(None)
        ds, cfg = self.datasets[split], self.loader
        rank, world = self._dist()
        workers = self.num_workers
        pin = cfg.pin_memory and self.decode_device == "cpu" and torch.cuda.is_available()
        kw: dict[str, Any] = dict(
            num_workers=workers, pin_memory=pin,
            worker_init_fn=partial(seed_worker, seed=self.seed, rank=rank) if workers else None,
            persistent_workers=cfg.persistent_workers and workers > 0, timeout=cfg.timeout_s if workers else 0,
        )
        if workers:
            kw.update(prefetch_factor=cfg.prefetch_factor, keep_freed_memory=cfg.keep_freed_memory)
        if isinstance(ds, StreamingVideoDataset):
            return make_streaming_loader(ds, **kw)
        training = split.startswith("train")
        sampler = EpochSampler(ds, shuffle=training, seed=self.seed, rank=rank, world_size=world, drop_tail=training)
        bs = cfg.batch(training)
        if split.startswith("train_mix["):
            bs = self.train_mix[int(split[len("train_mix[") : -1])].get("batch_size", bs)
        if not workers:
            return DataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=collate_samples, **kw)
        ring = BatchRing(workers, slots=cfg.prefetch_factor + RING_SPARE_SLOTS)
        return RingDataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=partial(collate_samples, ring=ring), **kw)

    def _train_loaders(self) -> list[DataLoader]:
        return [self._loader(split) for split in self._train_sources()]

    def train_dataloader(self) -> DataLoader | TrainStream:
        """The training DataLoader, or a :class:`TrainStream` over every training source when there are several
        or when the frame count may change (:meth:`set_train_frames`)."""
        if self._train_stream is None and self.train_mix:
            self._train_stream = TrainStream(self._train_loaders, lambda: self.frames_version)
        if self._train_stream is not None:
            return self._train_stream
        self._plain_train_loader = True
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

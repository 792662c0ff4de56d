"""The typed settings groups of :class:`~vidlang.data.datamodule.VideoDataModule`.

Each group is a frozen dataclass, one YAML mapping under ``data:`` and one group of LightningCLI options
(``--data.loader.batch_size 4``); an unknown key inside a group is a parse error::

    data:
      train: {format: webvid, csv: data/webvid_train.csv, video_root: data}
      sampling: {num_frames: 8, eval_num_frames: 16, sampler: segment}
      transform: {image_size: 224}
      loader: {batch_size: 32, num_workers: 8}
      decode: {resize_short_side: 256}
      bad_samples: {report_dir: runs/bad_samples}

The bad-sample group is :class:`vidlang.data.badsamples.BadSamplePolicy` itself (its settings are the policy).
Values are checked when a group is built: a bad one raises :class:`~vidlang.errors.ConfigError` naming the
option (``data.<group>.<key>``) and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vidlang.config import MovedKeys, as_group, check_min
from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS
from vidlang.errors import ConfigError

C = TypeVar("C")


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames make a clip.

    Args:
        num_frames: frames per clip T in training.
        eval_num_frames: frames per clip in validation and test (None: ``num_frames``); papers often train on
            fewer frames than they test on.
        sampler, sampler_args: training frame sampler (:data:`vidlang.data.sampling.SAMPLERS`) and its arguments.
        eval_sampler, eval_sampler_args: evaluation sampler (None: the training one), e.g. ``multiview``.
        short_video: ``repeat`` (repeat frames of a clip shorter than T) or ``mask`` (each frame once, the rest
            padding marked in the batch's ``video_mask``; CLIP4Clip), both splits (:mod:`vidlang.data.sampling`).
        frame_order, eval_frame_order: ``ordinary``, ``reverse`` or ``random`` order of a clip's frames in
            training / evaluation, independently (CLIP4Clip's ``--train_frame_order`` / ``--eval_frame_order``).
    """

    num_frames: int = 8
    eval_num_frames: int | None = None
    sampler: str = "segment"
    sampler_args: dict[str, Any] = field(default_factory=dict)
    eval_sampler: str | None = None
    eval_sampler_args: dict[str, Any] = field(default_factory=dict)
    short_video: str = "repeat"
    frame_order: str = "ordinary"
    eval_frame_order: str = "ordinary"

    def __post_init__(self) -> None:
        from vidlang.data.sampling import FRAME_ORDERS, SHORT_VIDEO_MODES

        check_min("data.sampling", 1, num_frames=self.num_frames, eval_num_frames=self.eval_num_frames)
        choices = {"short_video": SHORT_VIDEO_MODES, "frame_order": FRAME_ORDERS, "eval_frame_order": FRAME_ORDERS}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"data.sampling.{key} must be one of {', '.join(allowed)}, got {value!r}")

    def frames(self, training: bool) -> int:
        """Frames per clip in training or evaluation."""
        return self.num_frames if training or self.eval_num_frames is None else self.eval_num_frames

    def build(self, training: bool) -> Any:
        """The frame sampler of training or evaluation (the frame count filled in unless its arguments set it)."""
        from vidlang.data.sampling import build_sampler

        name, args = self.sampler, dict(self.sampler_args)
        if not training and self.eval_sampler is not None:
            name, args = self.eval_sampler, dict(self.eval_sampler_args)
        args.setdefault("max_frames" if name == "fps" else "num_frames", self.frames(training))
        order = self.frame_order if training else self.eval_frame_order
        return build_sampler(name, short_video=self.short_video, frame_order=order, **args)


@dataclass(frozen=True)
class TransformConfig:
    """Spatial transforms (:class:`vidlang.data.transforms.ClipTransform`).

    Args:
        image_size: square crop size.
        crop_scale, crop_ratio: random-resized-crop ranges (training).
        hflip: horizontal-flip probability in training (0: direction words would lie; captions are swapped when on).
        three_crop: evaluation with 3 spatial crops (V -> 3V views).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    three_crop: bool = False

    def __post_init__(self) -> None:
        check_min("data.transform", 1, image_size=self.image_size)
        # YAML lists become tuples (a frozen dataclass: set through object.__setattr__)
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))

    def build(self, training: bool) -> Any:
        from vidlang.data.transforms import ClipTransform

        if training:
            return ClipTransform(self.image_size, "train", self.crop_scale, self.crop_ratio, self.hflip)
        return ClipTransform(self.image_size, "three_crop" if self.three_crop else "eval")


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoader settings.

    Args:
        batch_size: training batch size; eval_batch_size: validation / test (None: ``batch_size``).
        num_workers, persistent_workers, pin_memory, prefetch_factor: as in :class:`torch.utils.data.DataLoader`.
        timeout_s: the DataLoader's batch timeout with workers (0 = none), the last guard against a hang.
        keep_freed_memory: workers keep the memory they free for the next clip instead of returning it to the
            OS and page-faulting it back (:mod:`vidlang.data.worker_memory`; glibc only; costs each worker up to
            64 MB of resident memory).
    """

    batch_size: int = 8
    eval_batch_size: int | None = None
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool = True
    prefetch_factor: int = 2
    timeout_s: float = 600.0
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        check_min("data.loader", 1, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                   prefetch_factor=self.prefetch_factor)  # fmt: skip
        check_min("data.loader", 0, num_workers=self.num_workers, timeout_s=self.timeout_s)

    def batch(self, training: bool) -> int:
        """Batch size in training or evaluation."""
        return self.batch_size if training or self.eval_batch_size is None else self.eval_batch_size


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding (:mod:`vidlang.data.decoding`).

    Args:
        backend: decoding backend (``auto``: the best available).
        device: ``cpu`` or ``cuda`` (torchcodec on the GPU in the main process; workers forced to 0).
        resize_short_side: resize at decode time (speed; None: full size).
        max_pixels: largest frame (width x height) decoded; a video with bigger frames is a bad sample, refused
            from its metadata before decoding (None: no limit).
        audio, audio_sample_rate: decode the audio track too, resampled to this rate.
    """

    backend: str = "auto"
    device: str = "cpu"
    resize_short_side: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    audio: bool = False
    audio_sample_rate: int = 16000

    def __post_init__(self) -> None:
        check_min("data.decode", 1, resize_short_side=self.resize_short_side, max_pixels=self.max_pixels,
                   audio_sample_rate=self.audio_sample_rate)  # fmt: skip


@dataclass(frozen=True)
class StreamingConfig:
    """Shard streaming of ``webdataset`` splits (:mod:`vidlang.data.streaming`).

    Args:
        enabled: stream the shards (else a ``webdataset`` split is indexed and read like any other format).
        shuffle_buffer: samples held for shuffling.
        resampled: draw shards with replacement in training (an epoch is ``samples_per_epoch`` samples).
        samples_per_epoch: training epoch length when resampled.
    """

    enabled: bool = False
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_min("data.streaming", 1, samples_per_epoch=self.samples_per_epoch)
        check_min("data.streaming", 0, shuffle_buffer=self.shuffle_buffer)


# The flat VideoDataModule arguments before the groups -> where they live now (for a one-line hint).
MOVED_KEYS: dict[str, str] = {
    **{k: f"sampling.{k}" for k in ("num_frames", "sampler", "sampler_args", "eval_sampler", "eval_sampler_args")},
    **{k: f"transform.{k}" for k in ("image_size", "crop_scale", "crop_ratio", "hflip", "three_crop")},
    **{k: f"loader.{k}" for k in ("batch_size", "eval_batch_size", "num_workers", "persistent_workers", "pin_memory",
                                   "prefetch_factor")},
    "loader_timeout_s": "loader.timeout_s",
    **{k: f"decode.{k}" for k in ("backend", "resize_short_side", "max_pixels", "audio_sample_rate")},
    "decode_device": "decode.device",
    "decode_audio": "decode.audio",
    "streaming": "streaming.enabled",
    **{k: f"streaming.{k}" for k in ("shuffle_buffer", "resampled", "samples_per_epoch")},
    "bad_sample_dir": "bad_samples.report_dir",
    **{k: f"bad_samples.{k}" for k in ("max_skip_rate", "max_retries", "decode_timeout_s", "preflight_entries")},
}


DATA_MOVED = MovedKeys("data", "data settings", MOVED_KEYS)
moved_keys_hint = DATA_MOVED.hint  # message naming data.<flat key> -> where it is now, else ""


def as_config(cls: type[C], value: C | Mapping[str, Any] | None, group: str) -> C:
    """``value`` as the ``data.<group>`` group (:func:`vidlang.config.as_group`): an instance, a mapping of its
    fields (e.g. loaded from YAML) or None for the defaults."""
    return as_group(cls, value, f"data.{group}", moved=DATA_MOVED)

"""Map-style video-text dataset over index entries.

Decoders are opened inside ``__getitem__`` (so inside DataLoader workers, never before a
fork: decord / torchcodec state is not fork-safe) and closed after each item.

Randomness (frame offsets, crop box, flip, caption choice) comes from a generator seeded by
``(seed, rank, epoch, index, attempt)``: a training sample is reproducible whatever the
number of workers, and differs between epochs. The epoch lives in shared memory
(:class:`SharedEpoch`) so that persistent workers see ``set_epoch``.

Caption choice: training -> one random caption of the entry; evaluation -> all captions, or
the first for entries whose captions are alternatives of one item (``eval_captions="first"``,
HowToCaption windows). ``caption_mode`` overrides this (``random``/``first``/``all``).

Bad samples (:mod:`vidlang.data.badsamples`): in training a sample that fails to load is replaced by
a deterministic other index; in evaluation (``training=False``) it is never replaced (a stand-in would
change the gallery): ``__getitem__`` returns a :class:`SkippedSample`, which the collate leaves out of
the batch. Either way the failure is recorded and counted.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from vidlang.data.badsamples import (
    BadSampleError,
    BadSamplePolicy,
    BadSampleTracker,
    DecodeTimeout,
    SkippedSample,
    time_limit,
)
from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS
from vidlang.data.sample import VideoEntry, VideoSample

Transform = Callable[[torch.Tensor, list[str], torch.Generator], tuple[torch.Tensor, list[str]]]


class SharedEpoch:
    """An epoch counter in shared memory, visible to (persistent) DataLoader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.get_context().Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def get(self) -> int:
        return int(self._value.value)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers/strings (stable across processes and runs)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def pick_captions(captions: list[str], mode: str, generator: torch.Generator | None) -> list[str]:
    if not captions or mode == "all":
        return list(captions)
    if mode == "first":
        return captions[:1]
    if mode == "random":
        return [captions[int(torch.randint(len(captions), (1,), generator=generator))]]
    raise ValueError(f"caption_mode must be random, first or all, got {mode!r}")


def load_clip(
    entry: VideoEntry,
    source: Any,
    sampler: Any,
    *,
    training: bool,
    generator: torch.Generator | None,
    backend: str = "auto",
    device: str = "cpu",
    resize_short_side: int | None = None,
    audio_sample_rate: int | None = None,
    max_audio_seconds: float = 30.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    record: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, bool, torch.Tensor | None]:
    """Decode ``uint8 [V, T, C, H, W]`` (+ mono audio of the clip's span, has_audio, and the bool frame mask
    ``[V, T]`` of ``short_video: mask`` samplers, else None) from one entry; ``record`` receives the sampled
    frame indices (:func:`~vidlang.data.sampling.sample_clip_masked`)."""
    from vidlang.data.decoding import VideoDecodeError, open_video
    from vidlang.data.sampling import sample_clip_masked

    opts = dict(device=device, resize_short_side=resize_short_side, max_pixels=max_pixels)
    with open_video(source, backend, **opts) as reader:
        try:
            video, frame_mask = sample_clip_masked(reader, sampler, training, generator, entry.window, record)
        except ValueError as e:  # e.g. a caption window outside the video
            raise VideoDecodeError(entry.path, "sampler", str(e)) from None
        has_audio = bool(reader.metadata.has_audio)
        audio = None
        if audio_sample_rate and has_audio:
            audio = reader.get_audio(audio_sample_rate)
            if audio is not None:
                start = entry.window[0] if entry.window else 0.0
                a = max(0, int(start * audio_sample_rate))
                audio = audio[a : a + int(max_audio_seconds * audio_sample_rate)].float().cpu()
    return video, audio, has_audio, frame_mask


class VideoTextDataset(Dataset):
    """Entries -> :class:`VideoSample` (uint8 ``[V, T, C, H, W]`` after ``transform``), with the bad-sample policy
    (training: replaced; evaluation: a :class:`SkippedSample`, see the module docstring)."""

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        sampler: Any,
        transform: Transform | None = None,
        training: bool = False,
        backend: str = "auto",
        decode_audio: bool = False,
        audio_sample_rate: int = 16000,
        resize_short_side: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        rank: int = 0,
        policy: BadSamplePolicy | None = None,
        caption_mode: str | None = None,
        split: str = "train",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not entries:
            raise ValueError("VideoTextDataset: no entries")
        self.entries, self.sampler, self.transform = list(entries), sampler, transform
        self.training, self.backend, self.device = training, backend, device
        self.audio_sample_rate = audio_sample_rate if decode_audio else None
        self.resize_short_side, self.seed, self.rank = resize_short_side, seed, rank
        self.max_pixels = max_pixels
        self.policy = policy or BadSamplePolicy()
        self.caption_mode = caption_mode
        self.epoch = SharedEpoch()
        self.tracker = BadSampleTracker(self.policy, rank, split)  # split: names the records of bad samples

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _captions(self, entry: VideoEntry, g: torch.Generator) -> list[str]:
        mode = self.caption_mode or ("random" if self.training else entry.eval_captions)
        return pick_captions(entry.captions, mode, g)

    def load(self, index: int, attempt: int = 0) -> VideoSample:
        """Decode one entry (raises on failure; no policy)."""
        entry = self.entries[index]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.epoch.get(), index, attempt))
        source = entry.open_source()
        record: dict[str, Any] = {}
        with time_limit(self.policy.decode_timeout_s, entry.path):
            video, audio, has_audio, frame_mask = load_clip(
                entry, source, self.sampler, training=self.training, generator=g, backend=self.backend,
                device=self.device, resize_short_side=self.resize_short_side, audio_sample_rate=self.audio_sample_rate,
                max_pixels=self.max_pixels, record=record,
            )
        captions = self._captions(entry, g)
        if self.transform is not None:
            video, captions = self.transform(video, captions, g)
        return VideoSample(video, entry.key, captions, entry.window, entry.label, audio, entry.path, has_audio,
                           frame_mask, record.get("frame_indices"), dict(entry.meta))

    def replacement(self, index: int, attempt: int) -> int:
        """A deterministic index different from ``index`` for retry ``attempt`` (>= 1)."""
        n = len(self.entries)
        if n == 1:
            return index
        g = torch.Generator().manual_seed(mix_seed(self.seed, "replace", self.epoch.get(), index, attempt))
        r = int(torch.randint(n - 1, (1,), generator=g))
        return r if r < index else r + 1

    def __getitem__(self, index: int) -> VideoSample | SkippedSample:
        from vidlang.data.decoding import VideoDecodeError

        current = index
        epoch = self.epoch.get()
        for attempt in range(self.policy.max_retries + 1):
            try:
                sample = self.load(current, attempt)
            except (VideoDecodeError, OSError, DecodeTimeout) as e:
                entry, reason = self.entries[current], f"{type(e).__name__}: {e}"
                if not self.training:  # evaluation: skip, never replace
                    self.tracker.failure(epoch, current, entry.key, entry.path, reason, None)
                    return SkippedSample(entry.key, entry.path, reason)
                nxt = self.replacement(index, attempt + 1)
                self.tracker.failure(epoch, current, entry.key, entry.path, reason, nxt)
                current = nxt
                continue
            self.tracker.success(epoch)
            return sample
        worker = get_worker_info()
        where = f" (worker {worker.id})" if worker else ""
        last = self.tracker.failures[-1]
        raise BadSampleError(
            f"index {index}{where}: {self.policy.max_retries + 1} samples in a row failed to load "
            f"(last: {last['path']}: {last['reason']}); check the video root / paths of the manifest"
        )

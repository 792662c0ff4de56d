"""Collate :class:`~vidlang.data.sample.VideoSample` lists into the batch contract.

Batch (``B`` videos, ``A`` captions in all)::

    video:         uint8 [B, T, C, H, W]   single view; [B, V, T, C, H, W] when samples carry V > 1 views
    captions:      list[str]               length A, every caption of every sample, in sample order
    caption_index: int64 [A]               caption a belongs to video caption_index[a]
    label:         int64 [B]               -1 = no label (or a label set: multi-label sample)
    label_set:     int64 [B, L]            only if a sample has a label tuple (multi-label data): its class
                                           indices, -1 padded (an int label counts as a set of one)
    key:           list[str]               length B
    path:          list[str]               length B
    window:        float64 [B, 2]          NaN where a sample has no window
    audio:         float32 [B, S]          only if any sample carries audio; zero-padded
    audio_lengths: int64 [B]
    audio_mask:    bool [B]                False = no audio track (row is all zeros)
    video_mask:    bool [B, T]             only if a sample carries a frame mask (sampling ``short_video: mask``):
                                           False = padding slot of a short clip; [B, V, T] with V > 1 views;
                                           rows of samples without a mask are all True
    skipped:       list[str]               keys of the samples left out (:class:`SkippedSample`, evaluation)
    frame_indices: int64 [B, V', T]        only if every sample carries them (map-style datasets): the decoded
                                           frame indices (V' temporal views), which the run record hashes
    meta:          list[dict]              only if a sample has a non-empty ``meta`` (conversations, questions of
                                           chat data: :mod:`vidlang.data.formats.instruct`, ``videoqa``)

Evaluation datasets return a :class:`~vidlang.data.badsamples.SkippedSample` for a sample that failed to
load: it is left out (``B`` counts the loaded samples only). When every sample of a batch was skipped the
batch is empty: ``video`` is ``None``, the lists are empty and the tensors have 0 rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import get_worker_info

from vidlang.data.badsamples import SkippedSample
from vidlang.data.sample import VideoSample
from vidlang.data.shm_ring import BatchRing, seal_batch


def collate_samples(samples: Sequence[VideoSample | SkippedSample], ring: BatchRing | None = None) -> dict[str, Any]:
    """Stack samples into a batch dict (module docstring). All videos must share ``[V, T, C, H, W]``;
    :class:`SkippedSample` items are left out (their keys go to ``skipped``).

    ``ring``: reusable shared-memory slots for the video inside DataLoader workers (:mod:`vidlang.data.shm_ring`;
    the batch then carries a slot tag that :class:`~vidlang.data.shm_ring.RingDataLoader` releases).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    skipped = [s.key for s in samples if isinstance(s, SkippedSample)]
    samples = [s for s in samples if not isinstance(s, SkippedSample)]
    if not samples:
        return empty_batch(skipped)
    shapes = {tuple(s.video.shape) for s in samples}
    if len(shapes) != 1:
        detail = ", ".join(f"{s.key}: {tuple(s.video.shape)}" for s in samples[:4])
        raise ValueError(f"videos of a batch must share one shape (crop to a fixed size first); got {detail}")
    video, slot = stack_videos([s.video for s in samples], ring)  # [B, V, T, C, H, W]
    if video.shape[1] == 1:
        video = video[:, 0]  # [B, T, C, H, W]
    captions: list[str] = []
    owner: list[int] = []
    for b, s in enumerate(samples):
        captions.extend(s.captions)
        owner.extend([b] * len(s.captions))
    batch: dict[str, Any] = {
        "video": video,
        "captions": captions,
        "caption_index": torch.tensor(owner, dtype=torch.long),
        "label": torch.tensor([-1 if s.label is None or isinstance(s.label, (tuple, list)) else int(s.label)
                               for s in samples], dtype=torch.long),
        "key": [s.key for s in samples],
        "path": [s.path for s in samples],
        "window": torch.tensor(
            [list(s.window) if s.window is not None else [math.nan, math.nan] for s in samples], dtype=torch.float64
        ),
    }
    batch["skipped"] = skipped
    if any(isinstance(s.label, (tuple, list)) for s in samples):
        batch["label_set"] = _label_sets(samples)
    if any(s.audio is not None for s in samples):
        batch.update(_collate_audio(samples, video.device))
    if all(s.frame_indices is not None for s in samples) and len({tuple(s.frame_indices.shape)
                                                                    for s in samples}) == 1:
        batch["frame_indices"] = torch.stack([s.frame_indices.long().cpu() for s in samples])
    if any(s.meta for s in samples):
        batch["meta"] = [dict(s.meta) for s in samples]
    if any(s.frame_mask is not None for s in samples):
        batch["video_mask"] = _video_mask(samples, tuple(video.shape[1:-3]))  # (T,) or (V, T)
    return batch if slot is None else seal_batch(batch, slot)


def _video_mask(samples: Sequence[VideoSample], shape: tuple[int, ...]) -> torch.Tensor:
    """bool ``[B, T]`` (or ``[B, V, T]``) of the samples' frame masks; all True for a sample without one."""
    out = torch.ones(len(samples), *shape, dtype=torch.bool)
    for b, s in enumerate(samples):
        if s.frame_mask is not None:
            out[b] = s.frame_mask.reshape(shape)
    return out


def empty_batch(skipped: Sequence[str]) -> dict[str, Any]:
    """The batch of a list whose every sample was skipped (module docstring)."""
    return {
        "video": None,
        "captions": [],
        "caption_index": torch.zeros(0, dtype=torch.long),
        "label": torch.zeros(0, dtype=torch.long),
        "key": [],
        "path": [],
        "window": torch.zeros(0, 2, dtype=torch.float64),
        "skipped": list(skipped),
    }


def stack_videos(
    videos: Sequence[torch.Tensor], ring: BatchRing | None = None
) -> tuple[torch.Tensor, tuple[Any, ...] | None]:
    """Stack equal-shape ``uint8 [V, T, C, H, W]`` clips into ``[B, V, T, C, H, W]``, keeping their memory layout.

    Decoders hand out channels-last frames (C has stride 1); a plain ``torch.stack`` would transpose
    every clip to channels-first (~4x slower than a copy). The batch keeps the clips' layout instead
    (the model's first op, :func:`~vidlang.data.transforms.normalize`, returns contiguous floats). Inside
    a DataLoader worker the batch is written straight into shared memory (a reusable ``ring`` slot when
    given, else a fresh segment), so that sending it to the main process costs no further copy.
    Returns the batch and its ring slot tag (``None`` outside a slot).
    """
    first = videos[0]
    channels_last = first.dim() >= 3 and first.shape[-3] > 1 and first.stride(-3) == 1
    shape = (len(videos), *first.shape)
    alloc = (*shape[:-3], shape[-2], shape[-1], shape[-3]) if channels_last else shape  # [B, V, T, H, W, C] or as is
    slot = None
    if get_worker_info() is not None and first.device.type == "cpu":
        if ring is not None:
            out, slot = ring.empty(alloc, first.dtype)
        else:
            storage = torch.UntypedStorage._new_shared(math.prod(alloc) * first.element_size())
            out = torch.empty(0, dtype=first.dtype).set_(storage, 0, alloc)
    else:
        out = torch.empty(alloc, dtype=first.dtype, device=first.device)
    if channels_last:
        n = out.dim()
        out = out.permute(*range(n - 3), n - 1, n - 3, n - 2)  # back to [B, V, T, C, H, W] (C stride 1)
    for b, v in enumerate(videos):
        out[b].copy_(v)
    return out, slot


def _label_sets(samples: Sequence[VideoSample]) -> torch.Tensor:
    """``int64 [B, L]`` class indices of each sample's label set, ``-1`` padded (multi-label data)."""
    sets = [list(s.label) if isinstance(s.label, (tuple, list)) else [] if s.label is None else [int(s.label)]
            for s in samples]
    out = torch.full((len(sets), max(1, *map(len, sets))), -1, dtype=torch.long)
    for b, labels in enumerate(sets):
        out[b, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return out


def _collate_audio(samples: Sequence[VideoSample], device: torch.device) -> dict[str, torch.Tensor]:
    lengths = [0 if s.audio is None else int(s.audio.numel()) for s in samples]
    audio = torch.zeros(len(samples), max(max(lengths), 1), dtype=torch.float32)  # [B, S]
    for b, s in enumerate(samples):
        if s.audio is not None:
            audio[b, : lengths[b]] = s.audio.float().cpu()
    return {
        "audio": audio,
        "audio_lengths": torch.tensor(lengths, dtype=torch.long),
        "audio_mask": torch.tensor([s.audio is not None for s in samples], dtype=torch.bool),
    }
